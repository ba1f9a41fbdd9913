"""Test a detector: ``python test.py configs/X.py CHECKPOINT [--eval mAP] [--out results.pkl] [--score-thr T]``.

COCO bbox (and segm) mAP comes from the config's ``test_evaluator``; ``--eval`` (mAP, bbox, segm) is checked
against it, for the 2.x command lines. Your own data: ``--data-root DIR --classes a,b,c``. Several processes:
``bash dist_test.sh configs/X.py CHECKPOINT GPUS --eval mAP``.
"""
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))  # the repository root, for `scalablevit`
from scalablevit.cli import run_mm_command  # noqa: E402


def command(argv):
    from scalablevit.mm.runner import test_main  # here: run_mm_command has checked the OpenMMLab stack
    return test_main(argv, 'detection', osp.dirname(osp.abspath(__file__)))


if __name__ == '__main__':
    sys.exit(run_mm_command(command, sys.argv[1:]))
