# Mask R-CNN with ScalableViT-S, 1x schedule, single scale (1333x800). The anchor config of the Mask R-CNN
# family: the other sizes and the 3x schedule inherit it and change a few lines.
_base_ = [
    'mmdet::_base_/models/mask-rcnn_r50_fpn.py',
    'mmdet::_base_/datasets/coco_instance.py',
    'mmdet::_base_/default_runtime.py',
    './_base_/scalablevit_adamw_1x.py',
]

# ImageNet-1K weights: the released file or classification/'s checkpoint (see README, "Pretrained weights").
pretrained = 'pretrained/scalable_vit_small.pth'
model = dict(
    backbone=dict(
        _delete_=True,
        type='ScalableViTBackbone',
        arch='s',
        out_indices=(0, 1, 2, 3),
        drop_path_rate=0.2,
        frozen_stages=-1,
        with_cp=False,
        init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    neck=dict(in_channels=[64, 128, 256, 512]))

optim_wrapper = dict(optimizer=dict(lr=2e-4))
