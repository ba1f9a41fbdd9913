# Mask R-CNN with the small ScalableViT: the structure of mask-rcnn_scalablevit-s_fpn_1x_coco.py with a narrow
# neck and heads, for the tiny configs and the first run (configs/tiny/).
_base_ = ['mmdet::_base_/models/mask-rcnn_r50_fpn.py', './scalablevit-tiny.py']

channels = 64
model = dict(
    backbone=dict(
        _delete_=True, type='ScalableViTBackbone', arch={{_base_.tiny_arch}}, out_indices=(0, 1, 2, 3),
        drop_path_rate=0.1, init_cfg=None),
    neck=dict(in_channels=[32, 64, 96, 128], out_channels=channels),
    rpn_head=dict(in_channels=channels, feat_channels=channels),
    roi_head=dict(
        bbox_roi_extractor=dict(out_channels=channels),
        bbox_head=dict(in_channels=channels, fc_out_channels=256, num_classes=3),
        mask_roi_extractor=dict(out_channels=channels),
        mask_head=dict(in_channels=channels, conv_out_channels=channels, num_classes=3)),
    train_cfg=dict(rpn_proposal=dict(nms_pre=500, max_per_img=300), rcnn=dict(sampler=dict(num=128))),
    test_cfg=dict(rpn=dict(nms_pre=300, max_per_img=100), rcnn=dict(score_thr=0.01)))
