# The tiny shapes dataset of tools/make_tiny_coco.py (3 classes, 128x128 images, boxes and polygon masks), laid
# out like COCO under data/tiny_coco/ (relative to the working directory, detection/). Any input is resized to fit
# 128x128. For trying the scripts on CPU in minutes; not a benchmark.
_base_ = 'mmdet::_base_/datasets/coco_instance.py'  # its loaders, samplers and COCO metric

data_root = 'data/tiny_coco/'
metainfo = dict(classes=('square', 'disc', 'triangle'))
img_scale = (128, 128)

train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='Resize', scale=img_scale, keep_ratio=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackDetInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=img_scale, keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='PackDetInputs', meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor')),
]
tiny_dataset = dict(data_root=data_root, metainfo=metainfo)
train_dataloader = dict(
    num_workers=0, persistent_workers=False,
    dataset=dict(**tiny_dataset, filter_cfg=dict(min_size=8), pipeline=train_pipeline))  # images of 8 px and more
val_dataloader = dict(batch_size=2, num_workers=0, persistent_workers=False,
                      dataset=dict(**tiny_dataset, pipeline=test_pipeline))
test_dataloader = val_dataloader

val_evaluator = dict(  # classwise: a table of AP per class, with the classes' names
    ann_file=data_root + 'annotations/instances_val2017.json', classwise=True)
test_evaluator = val_evaluator
