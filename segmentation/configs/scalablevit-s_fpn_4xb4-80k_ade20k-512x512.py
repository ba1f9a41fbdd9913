# ScalableViT-S + Semantic FPN on ADE20K: 512x512 crops, 80k iterations, 4 GPUs x 4 images, AdamW 1e-4,
# weight decay 1e-4, poly 0.9 down to 0 (the recipe of PVT and Twins, which the paper compares against).
_base_ = [
    'mmseg::_base_/models/fpn_r50.py', '_base_/ade20k.py',
    '_base_/scalablevit_runtime.py', 'mmseg::_base_/schedules/schedule_80k.py'
]

crop_size = (512, 512)
data_preprocessor = dict(size=crop_size)
model = dict(
    data_preprocessor=data_preprocessor,
    pretrained=None,
    backbone={{_base_.scalablevit_s}},
    neck=dict(in_channels=[64, 128, 256, 512]),
    decode_head=dict(num_classes=150))

optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=0.0001, weight_decay=0.0001),
    clip_grad=None)
param_scheduler = [dict(type='PolyLR', eta_min=0.0, power=0.9, begin=0, end=80000, by_epoch=False)]

train_dataloader = dict(batch_size=4, num_workers=4)
val_dataloader = dict(batch_size=1, num_workers=4)
test_dataloader = val_dataloader
auto_scale_lr = dict(enable=False, base_batch_size=16)
train_cfg = dict(type='ResumableIterBasedTrainLoop')  # resumes without re-reading the batches trained on
