# The Mask R-CNN first run (README, "First run"): the small ScalableViT on the 400 + 100 shapes scenes of
#   python tools/make_tiny_coco.py --out data/shapes --num-train 400 --num-val 100
# 10 epochs of 8 images, the first-run schedule (500 iterations; 12 epochs took 280 s of training, too close to
# 5 minutes on 2 cores). A lighter mask head (2 convs of 32 channels), 32 sampled RoIs and
# 100 proposals an image: scenes of 1-3 objects need no more, and with mmdet's 512 RoIs a batch and its
# 4 x 64-channel mask head, mmcv's CPU RoIAlign (its backward above all) took more than half of each iteration.
_base_ = [
    '../_base_/models/mask-rcnn_scalablevit-tiny_fpn.py',
    '../_base_/shapes_instance.py',
    '../_base_/shapes_schedule.py',
]

model = dict(
    roi_head=dict(mask_head=dict(num_convs=2, conv_out_channels=32)),
    train_cfg=dict(rpn_proposal=dict(max_per_img=100), rcnn=dict(sampler=dict(num=32))))

