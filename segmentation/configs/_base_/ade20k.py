# ADE20K as mmseg 1.x sets it up (512x512 crops, reduce_zero_label; the data in data/ade/ADEChallengeData2016,
# relative to the working directory, as in detection/), with one change: --aug-test resizes to the test scale
# (2048, 512) x 0.5..1.75 (+ flip), as mmseg 0.x's aug-test did (the published "ms+flip" column).
# test.py recomputes these scales from the test pipeline's Resize, so they follow a changed test scale.
_base_ = 'mmseg::_base_/datasets/ade20k.py'
# The import comes after _base_, so that mmengine reads this file as a text config (and runs the import).
from scalablevit.mm.pipelines import ratio_tta_pipeline  # noqa: E402

img_ratios = [0.5, 0.75, 1.0, 1.25, 1.5, 1.75]
tta_pipeline = ratio_tta_pipeline((2048, 512), img_ratios)
