# The first runs' schedule: 10 epochs (500 iterations of 8 images on 400 images; Mask R-CNN's), AdamW at 1e-3 after
# a 20-iteration warm-up, cosine decay to 1e-5 by the last epoch; validation every 5 epochs, one checkpoint at the end.
_base_ = './tiny_schedule.py'

max_epochs = 10
train_cfg = dict(max_epochs=max_epochs, val_interval=5)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.1, by_epoch=False, begin=0, end=20),
    dict(type='CosineAnnealingLR', by_epoch=True, begin=0, end=max_epochs, T_max=max_epochs, eta_min=1e-5),
]
default_hooks = dict(logger=dict(interval=10), checkpoint=dict(interval=max_epochs, max_keep_ckpts=1))
log_processor = dict(window_size=10)
