_base_ = './scalablevit-s_fpn_4xb4-80k_ade20k-512x512.py'

pretrained = 'pretrained/scalable_vit_large.pth'
model = dict(
    backbone=dict(arch='l', init_cfg=dict(checkpoint=pretrained)),
    neck=dict(in_channels=[128, 256, 512, 1024]))
