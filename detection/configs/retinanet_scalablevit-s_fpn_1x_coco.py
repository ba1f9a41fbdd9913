# RetinaNet with ScalableViT-S, 1x schedule, single scale (1333x800). The anchor config of the RetinaNet family:
# the other sizes and the 3x schedule inherit it and change a few lines.
_base_ = [
    'mmdet::_base_/models/retinanet_r50_fpn.py',
    'mmdet::_base_/datasets/coco_detection.py',
    './_base_/scalablevit_adamw_1x.py',
]

model = dict(
    backbone=dict(
        _delete_=True,
        type='ScalableViTBackbone',
        arch='s',
        out_indices=(1, 2, 3),  # stride 8-32: RetinaNet's FPN starts at stage 2; stage 4's conv is not built
        drop_path_rate=0.2,
        init_cfg=dict(type='Pretrained', checkpoint={{_base_.pretrained}})),
    neck=dict(in_channels=[128, 256, 512], start_level=0, add_extra_convs='on_input', num_outs=5))

optim_wrapper = dict(optimizer=dict(lr=1e-4))
