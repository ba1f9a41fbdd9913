# The Semantic FPN config shrunk to run in seconds on CPU: a 4-stage ScalableViT of 0.65M parameters, 64x64 images
# from tools/make_tiny_ade.py, 40 iterations. Everything else (model type, losses, data set class, IoUMetric,
# --aug-test) is the real config's.
#   python tools/make_tiny_ade.py && python train.py configs/tiny/scalablevit-tiny_fpn_1xb2-40_tiny-ade-64x64.py
_base_ = '../scalablevit-s_fpn_4xb4-80k_ade20k-512x512.py'

data_root = '{{fileDirname}}/../../data/tiny_ade/ADEChallengeData2016'
crop_size = (64, 64)
max_iters = 40
tiny_arch = dict(
    _delete_=True, embed_dims=(16, 32, 64, 128), num_heads=(1, 2, 4, 8), depths=(2, 2, 2, 2),
    sr_ratios=(8, 4, 2, 1), c_ratios=(1.25, 1.25, 1.25, 1))
model = dict(
    data_preprocessor=dict(size=crop_size),
    backbone=dict(arch=tiny_arch, drop_path_rate=0.0, init_cfg=None),
    neck=dict(in_channels=[16, 32, 64, 128], out_channels=32),
    decode_head=dict(in_channels=[32, 32, 32, 32], channels=16, dropout_ratio=0.0))

train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackSegInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=crop_size, keep_ratio=True),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='PackSegInputs'),
]
img_ratios = [0.5, 0.75, 1.0, 1.25, 1.5, 1.75]
tta_pipeline = [
    dict(type='LoadImageFromFile', backend_args=None),
    dict(
        type='TestTimeAug',
        transforms=[
            [dict(type='Resize', scale=(int(64 * r), int(64 * r)), keep_ratio=True) for r in img_ratios],
            [dict(type='RandomFlip', prob=0., direction='horizontal'),
             dict(type='RandomFlip', prob=1., direction='horizontal')],
            [dict(type='LoadAnnotations')],
            [dict(type='PackSegInputs')],
        ])
]
train_dataloader = dict(
    batch_size=2, num_workers=0, persistent_workers=False,
    dataset=dict(data_root=data_root, pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=1, num_workers=0, persistent_workers=False,
    dataset=dict(data_root=data_root, pipeline=test_pipeline))
test_dataloader = val_dataloader

optim_wrapper = dict(optimizer=dict(lr=0.0005))
param_scheduler = [dict(type='PolyLR', eta_min=0.0, power=0.9, begin=0, end=max_iters, by_epoch=False)]
train_cfg = dict(max_iters=max_iters, val_interval=max_iters)
default_hooks = dict(
    logger=dict(interval=10),
    checkpoint=dict(interval=max_iters))
randomness = dict(seed=0)
