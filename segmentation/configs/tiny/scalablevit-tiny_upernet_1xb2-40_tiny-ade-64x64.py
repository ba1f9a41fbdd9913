# UperNet as in scalablevit-s_upernet_8xb2-160k_ade20k-512x512.py (auxiliary head kept), shrunk to run in seconds
# on CPU like the Semantic FPN config next to it.
#   python tools/make_tiny_ade.py && python train.py configs/tiny/scalablevit-tiny_upernet_1xb2-40_tiny-ade-64x64.py
_base_ = ['mmseg::_base_/models/upernet_r50.py', '../_base_/tiny_ade.py']

model = dict(
    data_preprocessor=dict(size={{_base_.crop_size}}),
    pretrained=None,
    backbone={{_base_.tiny_backbone}},
    decode_head=dict(in_channels=[16, 32, 64, 128], channels=32, dropout_ratio=0.0, num_classes=150),
    auxiliary_head=dict(in_channels=64, channels=16, dropout_ratio=0.0, num_classes=150))

optim_wrapper = dict(
    _delete_=True, type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=0.0005, betas=(0.9, 0.999), weight_decay=0.01),
    paramwise_cfg=dict(custom_keys={'pos_block': dict(decay_mult=0.), 'norm': dict(decay_mult=0.)}))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.1, by_epoch=False, begin=0, end=5),
    dict(type='PolyLR', eta_min=0.0, power=1.0, begin=5, end={{_base_.max_iters}}, by_epoch=False),
]
