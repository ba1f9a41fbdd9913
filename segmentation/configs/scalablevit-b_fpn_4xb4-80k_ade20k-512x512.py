_base_ = './scalablevit-s_fpn_4xb4-80k_ade20k-512x512.py'

pretrained = 'pretrained/scalable_vit_base.pth'
model = dict(
    backbone=dict(arch='b', init_cfg=dict(checkpoint=pretrained)),
    neck=dict(in_channels=[96, 192, 384, 768]))
