"""Segment your own images with a trained segmenter (mmseg's ``MMSegInferencer``):

    python predict.py INPUT [INPUT ...] configs/X.py --weights work_dirs/X/iter_80000.pth --out-dir outputs

INPUT: image files, folders (recursive) or globs. Writes ``outputs/vis/`` (the class colour overlay with class
names; ``--opacity``) and ``outputs/preds/<image>.png`` (label map: pixel value = class index) with
``<image>.json`` (per class present: name, area, COCO RLE mask). ``--device cpu|cuda``. See
``scalablevit/mm/predict.py``.
"""
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))  # the repository root, for `scalablevit`
from scalablevit.cli import run_mm_command  # noqa: E402


def command(argv):
    from scalablevit.mm.predict import predict_main  # here: run_mm_command has checked the OpenMMLab stack
    return predict_main(argv, 'segmentation')


if __name__ == '__main__':
    sys.exit(run_mm_command(command, sys.argv[1:]))
