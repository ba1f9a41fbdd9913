# ADE20K as mmseg 1.x sets it up (512x512 crops, reduce_zero_label), with two changes:
# * the data lives in segmentation/data/ade/ADEChallengeData2016 whatever the working directory;
# * --aug-test resizes to (2048, 512) x 0.5..1.75 (+ flip) as mmseg 0.x's aug-test did, the seed's "ms+flip".
_base_ = 'mmseg::_base_/datasets/ade20k.py'

data_root = '{{fileDirname}}/../../data/ade/ADEChallengeData2016'
train_dataloader = dict(dataset=dict(data_root=data_root))
val_dataloader = dict(dataset=dict(data_root=data_root))
test_dataloader = val_dataloader

img_ratios = [0.5, 0.75, 1.0, 1.25, 1.5, 1.75]
tta_pipeline = [
    dict(type='LoadImageFromFile', backend_args=None),
    dict(
        type='TestTimeAug',
        transforms=[
            [dict(type='Resize', scale=(int(2048 * r), int(512 * r)), keep_ratio=True) for r in img_ratios],
            [dict(type='RandomFlip', prob=0., direction='horizontal'),
             dict(type='RandomFlip', prob=1., direction='horizontal')],
            [dict(type='LoadAnnotations')],
            [dict(type='PackSegInputs')],
        ])
]
