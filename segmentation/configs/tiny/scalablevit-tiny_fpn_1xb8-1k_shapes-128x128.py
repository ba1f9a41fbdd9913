# The Semantic FPN first run (README, "First run"): the structure of scalablevit-s_fpn_4xb4-80k_ade20k-512x512.py
# with the small ScalableViT and a 64-channel neck and head, on the shapes scenes (configs/_base_/shapes_ade.py).
_base_ = ['mmseg::_base_/models/fpn_r50.py', '../_base_/shapes_ade.py']

model = dict(
    data_preprocessor=dict(size={{_base_.crop_size}}),
    pretrained=None,
    backbone={{_base_.shapes_backbone}},
    neck=dict(in_channels=[32, 64, 96, 128], out_channels=64),
    decode_head=dict(in_channels=[64, 64, 64, 64], channels=64, dropout_ratio=0.0, num_classes=4))
