# The UperNet first run (README, "First run"): the structure of scalablevit-s_upernet_8xb2-160k_ade20k-512x512.py
# (auxiliary head on stage 3 kept) with the small ScalableViT and a 64-channel head, on the shapes scenes
# (configs/_base_/shapes_ade.py).
_base_ = ['mmseg::_base_/models/upernet_r50.py', '../_base_/shapes_ade.py']

model = dict(
    data_preprocessor=dict(size={{_base_.crop_size}}),
    pretrained=None,
    backbone={{_base_.shapes_backbone}},
    decode_head=dict(in_channels=[32, 64, 96, 128], channels=64, dropout_ratio=0.0, num_classes=4),
    auxiliary_head=dict(in_channels=96, channels=32, dropout_ratio=0.0, num_classes=4))
