# What every ScalableViT detector shares: the backbone's registration and the AdamW 1x schedule of the paper's
# peers (PVT, Twins, Swin on mmdet): 12 epochs, lr steps after epochs 8 and 11, 500 iterations of linear warm-up,
# no weight decay on norms and on the positional convs (`pos_block`). Batch: 8 GPUs x 2 images. A run stopped by
# a signal resumes mid-epoch (ResumableEpochBasedTrainLoop).
_base_ = './scalablevit_runtime.py'

max_epochs = 12
train_cfg = dict(type='ResumableEpochBasedTrainLoop', max_epochs=max_epochs, val_interval=1)
val_cfg = dict(type='ValLoop')
test_cfg = dict(type='TestLoop')

param_scheduler = [
    dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=500),
    dict(type='MultiStepLR', begin=0, end=max_epochs, by_epoch=True, milestones=[8, 11], gamma=0.1),
]

optim_wrapper = dict(
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=1e-4, betas=(0.9, 0.999), weight_decay=0.05),
    paramwise_cfg=dict(custom_keys={'norm': dict(decay_mult=0.), 'pos_block': dict(decay_mult=0.)}))

# `--auto-scale-lr` scales the lr by (GPUs x images per GPU) / 16.
auto_scale_lr = dict(enable=False, base_batch_size=16)
