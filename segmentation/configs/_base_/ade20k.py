# ADE20K as mmseg 1.x sets it up (512x512 crops, reduce_zero_label; the data in data/ade/ADEChallengeData2016,
# relative to the working directory, as in detection/), with one change: --aug-test resizes to the test scale
# (2048, 512) x 0.5..1.75 (+ flip), as mmseg 0.x's aug-test did (the published "ms+flip" column).
# test.py recomputes these scales from the test pipeline's Resize, so they follow a changed test scale.
_base_ = 'mmseg::_base_/datasets/ade20k.py'

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
