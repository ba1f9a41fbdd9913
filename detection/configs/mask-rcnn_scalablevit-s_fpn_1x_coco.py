# Mask R-CNN with ScalableViT-S, 1x schedule, single scale (1333x800). The anchor config of the Mask R-CNN
# family: the other sizes and the 3x schedule inherit it and change a few lines.
_base_ = [
    'mmdet::_base_/models/mask-rcnn_r50_fpn.py',
    'mmdet::_base_/datasets/coco_instance.py',
    './_base_/scalablevit_adamw_1x.py',
]

model = dict(backbone={{_base_.scalablevit_s}}, neck=dict(in_channels=[64, 128, 256, 512]))

optim_wrapper = dict(optimizer=dict(lr=2e-4))
