"""Test a ScalableViT segmenter: ``python test.py configs/X.py CHECKPOINT --eval mIoU [--aug-test]``.

``--aug-test`` is multi-scale (0.5-1.75 x the test scale) + flip testing with the config's ``tta_model`` /
``tta_pipeline``. Your own data: ``--data-root DIR --classes a,b,c`` (README, "Your own data set").
Multi-GPU: ``bash tools/dist_test.sh configs/X.py CHECKPOINT GPUS [--aug-test] --eval mIoU``.
"""
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))  # the repository root, for `scalablevit`
from scalablevit.cli import run_mm_command  # noqa: E402


def command(argv):
    from scalablevit.mm.runner import test_main  # here: run_mm_command has checked the OpenMMLab stack
    return test_main(argv, 'segmentation', osp.dirname(osp.abspath(__file__)))


if __name__ == '__main__':
    sys.exit(run_mm_command(command, sys.argv[1:]))
