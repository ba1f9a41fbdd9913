# RetinaNet with a small ScalableViT on the tiny shapes dataset (python tools/make_tiny_coco.py first):
#   bash dist_train.sh configs/tiny/retinanet_scalablevit-tiny_fpn_tiny-coco.py 1
# Same structure as retinanet_scalablevit-s_fpn_1x_coco.py, with narrow neck and head.
_base_ = [
    '../_base_/models/retinanet_scalablevit-tiny_fpn.py',
    '../_base_/tiny_coco_instance.py',
    '../_base_/tiny_schedule.py',
]

val_evaluator = dict(metric='bbox')
test_evaluator = val_evaluator
