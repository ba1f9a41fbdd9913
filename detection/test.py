"""Test a detector: ``python test.py configs/X.py CHECKPOINT [--eval mAP] [--out results.pkl] [--score-thr T]``.

COCO bbox (and segm) mAP comes from the config's ``test_evaluator``; ``--eval`` (mAP, bbox, segm) is checked
against it, for the 2.x command lines. Your own data: ``--data-root DIR --classes a,b,c``. Several processes:
``bash dist_test.sh configs/X.py CHECKPOINT GPUS --eval mAP``.
"""
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))  # the repository root, for `scalablevit`
from scalablevit.mm_tools import SetupError, test_main  # noqa: E402


def add_args(parser):
    parser.add_argument('--out', help='also dump the raw predictions to this .pkl file')


def check_args(args):
    """Before anything is built."""
    if args.out and not args.out.endswith(('.pkl', '.pickle')):
        raise SetupError(f'--out {args.out}: must be a .pkl or .pickle file')


def before_test(runner, args):
    if args.out:
        from mmengine.evaluator import DumpResults
        runner.test_evaluator.metrics.append(DumpResults(out_file_path=args.out))


if __name__ == '__main__':
    test_main(sys.argv[1:], osp.dirname(osp.abspath(__file__)), 'Test a ScalableViT detector (mmdetection 3.x)',
              add_args=add_args, before_test=before_test, check_args=check_args)
