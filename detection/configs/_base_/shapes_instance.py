# The first runs' data: the shapes scenes of tools/make_tiny_coco.py (3 classes, 128x128, boxes and polygon
# masks), 400 train and 100 held-out val images under data/shapes/ (README, "First run"), 8 images a batch.
_base_ = './tiny_coco_instance.py'

data_root = 'data/shapes/'
train_dataloader = dict(batch_size=8, dataset=dict(data_root=data_root))
val_dataloader = dict(batch_size=8, dataset=dict(data_root=data_root))
test_dataloader = val_dataloader
val_evaluator = dict(ann_file=data_root + 'annotations/instances_val2017.json')
test_evaluator = val_evaluator
