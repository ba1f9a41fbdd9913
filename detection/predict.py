"""Detect objects in your own images with a trained detector (mmdet's ``DetInferencer``):

    python predict.py INPUT [INPUT ...] configs/X.py --weights work_dirs/X/epoch_12.pth --out-dir outputs

INPUT: image files, folders (recursive) or globs. Writes ``outputs/vis/`` (boxes, masks, class names and scores
drawn; ``--score-thr``, default 0.3) and ``outputs/preds/<image>.json`` (every detection: labels, names, scores,
boxes, RLE masks). ``--device cpu|cuda``. See ``scalablevit/mm/predict.py``.
"""
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))  # the repository root, for `scalablevit`
from scalablevit.cli import run_mm_command  # noqa: E402


def command(argv):
    from scalablevit.mm.predict import predict_main  # here: run_mm_command has checked the OpenMMLab stack
    return predict_main(argv, 'detection')


if __name__ == '__main__':
    sys.exit(run_mm_command(command, sys.argv[1:]))
