# mmdet's runtime with a few epochs on the tiny dataset: short warm-up, AdamW at 1e-3 (training from scratch),
# a checkpoint each epoch, a log line every 4 iterations.
_base_ = './scalablevit_runtime.py'

max_epochs = 4
train_cfg = dict(type='ResumableEpochBasedTrainLoop', max_epochs=max_epochs, val_interval=max_epochs)
val_cfg = dict(type='ValLoop')
test_cfg = dict(type='TestLoop')
param_scheduler = [dict(type='LinearLR', start_factor=0.1, by_epoch=False, begin=0, end=10)]
optim_wrapper = dict(
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=1e-3, betas=(0.9, 0.999), weight_decay=0.05),
    paramwise_cfg=dict(custom_keys={'norm': dict(decay_mult=0.), 'pos_block': dict(decay_mult=0.)}),
    clip_grad=dict(max_norm=10.))
auto_scale_lr = dict(enable=False, base_batch_size=16)

default_hooks = dict(logger=dict(interval=4), checkpoint=dict(interval=1, max_keep_ckpts=2))
log_processor = dict(window_size=4)

randomness = dict(seed=0)
