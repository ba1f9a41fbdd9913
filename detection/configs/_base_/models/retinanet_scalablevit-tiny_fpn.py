# RetinaNet with the small ScalableViT: the structure of retinanet_scalablevit-s_fpn_1x_coco.py with a narrow neck
# and head, for the tiny configs and the first run (configs/tiny/).
_base_ = ['mmdet::_base_/models/retinanet_r50_fpn.py', './scalablevit-tiny.py']

model = dict(
    backbone=dict(
        _delete_=True, type='ScalableViTBackbone', arch={{_base_.tiny_arch}}, out_indices=(1, 2, 3),
        drop_path_rate=0.1, init_cfg=None),
    neck=dict(in_channels=[64, 96, 128], out_channels=64, start_level=0, add_extra_convs='on_input', num_outs=5),
    bbox_head=dict(num_classes=3, in_channels=64, feat_channels=64, stacked_convs=2),
    test_cfg=dict(score_thr=0.01))  # an untrained detector scores below mmdet's 0.05 (no boxes: no mAP)
