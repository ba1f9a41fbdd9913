"""Test a ScalableViT segmenter: ``python test.py configs/X.py CHECKPOINT --eval mIoU [--aug-test]``.

``--aug-test`` is multi-scale (0.5-1.75 x the test scale) + flip testing with the config's ``tta_model`` /
``tta_pipeline``. Your own data: ``--data-root DIR --classes a,b,c`` (README, "Your own data set").
Multi-GPU: ``bash tools/dist_test.sh configs/X.py CHECKPOINT GPUS [--aug-test] --eval mIoU``.
"""
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))  # the repository, if not pip-installed

from scalablevit.mm_tools import test_main  # noqa: E402

if __name__ == '__main__':
    test_main(sys.argv[1:], osp.dirname(osp.abspath(__file__)), 'Test a ScalableViT segmenter (mmseg 1.x)')
