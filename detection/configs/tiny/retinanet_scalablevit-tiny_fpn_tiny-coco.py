# RetinaNet with a small ScalableViT on the tiny shapes dataset (python tools/make_tiny_coco.py first):
#   bash dist_train.sh configs/tiny/retinanet_scalablevit-tiny_fpn_tiny-coco.py 1
# Same structure as retinanet_scalablevit-s_fpn_1x_coco.py, with narrow neck and head.
_base_ = [
    'mmdet::_base_/models/retinanet_r50_fpn.py',
    '../_base_/tiny_coco_instance.py',
    '../_base_/tiny_schedule.py',
]

model = dict(
    backbone=dict(
        _delete_=True, type='ScalableViTBackbone', arch={{_base_.tiny_arch}}, out_indices=(1, 2, 3),
        drop_path_rate=0.1, init_cfg=None),
    neck=dict(in_channels=[64, 96, 128], out_channels=64, start_level=0, add_extra_convs='on_input', num_outs=5),
    bbox_head=dict(num_classes=3, in_channels=64, feat_channels=64, stacked_convs=2),
    test_cfg=dict(score_thr=0.01))  # an untrained detector scores below mmdet's 0.05 (no boxes: no mAP)

val_evaluator = dict(metric='bbox')
test_evaluator = val_evaluator
