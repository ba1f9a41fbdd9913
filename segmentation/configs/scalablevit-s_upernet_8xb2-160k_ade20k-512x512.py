# ScalableViT-S + UperNet on ADE20K: 512x512 crops, 160k iterations, 8 GPUs x 2 images, AdamW 6e-5, weight
# decay 0.01 (none on norms and pos_block), 1500-iteration linear warm-up then poly 1.0; auxiliary FCN head on
# stage 3 (Twins' / Swin's recipe).
_base_ = [
    'mmseg::_base_/models/upernet_r50.py', '_base_/ade20k.py',
    '_base_/scalablevit_runtime.py', 'mmseg::_base_/schedules/schedule_160k.py'
]

crop_size = (512, 512)
data_preprocessor = dict(size=crop_size)
model = dict(
    data_preprocessor=data_preprocessor,
    pretrained=None,
    backbone={{_base_.scalablevit_s}},
    decode_head=dict(in_channels=[64, 128, 256, 512], num_classes=150),
    auxiliary_head=dict(in_channels=256, num_classes=150))

optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=0.00006, betas=(0.9, 0.999), weight_decay=0.01),
    paramwise_cfg=dict(custom_keys={'pos_block': dict(decay_mult=0.), 'norm': dict(decay_mult=0.)}))
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-6, by_epoch=False, begin=0, end=1500),
    dict(type='PolyLR', eta_min=0.0, power=1.0, begin=1500, end=160000, by_epoch=False),
]

train_dataloader = dict(batch_size=2, num_workers=2)
val_dataloader = dict(batch_size=1, num_workers=4)
test_dataloader = val_dataloader
auto_scale_lr = dict(enable=False, base_batch_size=16)
train_cfg = dict(type='ResumableIterBasedTrainLoop')  # resumes without re-reading the batches trained on
