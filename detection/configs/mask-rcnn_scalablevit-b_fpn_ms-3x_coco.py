_base_ = './mask-rcnn_scalablevit-s_fpn_ms-3x_coco.py'

pretrained = 'pretrained/scalable_vit_base.pth'
model = dict(
    backbone=dict(arch='b', drop_path_rate=0.3, init_cfg=dict(checkpoint=pretrained)),
    neck=dict(in_channels=[96, 192, 384, 768]))
