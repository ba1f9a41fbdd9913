# What the two segmentation first runs share (README, "First run"): the shapes scenes of
#   python tools/make_tiny_ade.py --shapes --out data/shapes --size 128 --train 400 --val 100
# in ADE20K's layout (labels 1 background, 2 square, 3 disc, 4 triangle; 0..3 after reduce_zero_label), 8 images a
# batch, 1000 iterations of AdamW at 1e-3 (20 of warm-up, then linear decay to 0), validation every 250, and the
# small ScalableViT of detection's first runs (the sizes of detection/configs/_base_/models/scalablevit-tiny.py),
# so that one --data-set SHAPES pretraining serves all four.
_base_ = './tiny_ade.py'
from scalablevit.mm.pipelines import fit_pipelines  # noqa: E402  (after _base_, see ade20k.py)

data_root = 'data/shapes/ADEChallengeData2016'
crop_size = (128, 128)
max_iters = 1000
shapes_arch = dict(embed_dims=(32, 64, 96, 128), num_heads=(1, 2, 3, 4), depths=(2, 2, 2, 2),
                   sr_ratios=(8, 4, 2, 1), c_ratios=(1.25, 1.25, 1.25, 1))
shapes_backbone = dict(_delete_=True, type='ScalableViTBackbone', arch=shapes_arch, out_indices=(0, 1, 2, 3),
                       drop_path_rate=0.0, init_cfg=None)

shapes_dataset = dict(type='BaseSegDataset', data_root=data_root, reduce_zero_label=True, img_suffix='.jpg',
                      seg_map_suffix='.png',
                      metainfo=dict(classes=('background', 'square', 'disc', 'triangle'),
                                    palette=[[0, 0, 0], [230, 25, 75], [60, 180, 75], [0, 130, 200]]))
train_pipeline, test_pipeline = fit_pipelines(crop_size)  # any input fits (the scenes are made at this size)
train_dataloader = dict(batch_size=8, dataset=dict(**shapes_dataset, pipeline=train_pipeline))
val_dataloader = dict(batch_size=8, dataset=dict(**shapes_dataset, pipeline=test_pipeline))
test_dataloader = val_dataloader

optim_wrapper = dict(
    _delete_=True, type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=1e-3, betas=(0.9, 0.999), weight_decay=0.01),
    paramwise_cfg=dict(custom_keys={'pos_block': dict(decay_mult=0.), 'norm': dict(decay_mult=0.)}))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.1, by_epoch=False, begin=0, end=20),
    dict(type='PolyLR', eta_min=0.0, power=1.0, begin=20, end=max_iters, by_epoch=False),
]
train_cfg = dict(max_iters=max_iters, val_interval=250)
default_hooks = dict(logger=dict(interval=25), checkpoint=dict(interval=max_iters, max_keep_ckpts=1))
