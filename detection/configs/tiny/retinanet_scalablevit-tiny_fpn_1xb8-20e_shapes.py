# The RetinaNet first run (README, "First run"): the small ScalableViT on the 400 + 100 shapes scenes of
#   python tools/make_tiny_coco.py --out data/shapes --num-train 400 --num-val 100
# 20 epochs of 8 images: the first-run schedule (configs/_base_/shapes_schedule.py) stretched, as a RetinaNet
# iteration costs half of Mask R-CNN's and its boxes gain most from the longer decay.
_base_ = [
    '../_base_/models/retinanet_scalablevit-tiny_fpn.py',
    '../_base_/shapes_instance.py',
    '../_base_/shapes_schedule.py',
]

max_epochs = 20
train_cfg = dict(max_epochs=max_epochs, val_interval=5)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.1, by_epoch=False, begin=0, end=20),
    dict(type='CosineAnnealingLR', by_epoch=True, begin=0, end=max_epochs, T_max=max_epochs, eta_min=1e-5),
]
default_hooks = dict(checkpoint=dict(interval=max_epochs))

val_evaluator = dict(metric='bbox')
test_evaluator = val_evaluator
