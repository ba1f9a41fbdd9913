# Semantic FPN as in scalablevit-s_fpn_4xb4-80k_ade20k-512x512.py, shrunk to run in seconds on CPU: the small
# ScalableViT, a narrow neck and head, 64x64 images from tools/make_tiny_ade.py, 40 iterations.
#   python tools/make_tiny_ade.py && python train.py configs/tiny/scalablevit-tiny_fpn_1xb2-40_tiny-ade-64x64.py
_base_ = ['mmseg::_base_/models/fpn_r50.py', '../_base_/tiny_ade.py']

model = dict(
    data_preprocessor=dict(size={{_base_.crop_size}}),
    pretrained=None,
    backbone={{_base_.tiny_backbone}},
    neck=dict(in_channels=[16, 32, 64, 128], out_channels=32),
    decode_head=dict(in_channels=[32, 32, 32, 32], channels=16, dropout_ratio=0.0, num_classes=150))

optim_wrapper = dict(
    _delete_=True, type='OptimWrapper', optimizer=dict(type='AdamW', lr=0.0005, weight_decay=0.0001), clip_grad=None)
param_scheduler = [dict(type='PolyLR', eta_min=0.0, power=0.9, begin=0, end={{_base_.max_iters}}, by_epoch=False)]
