"""Test a detector: ``python test.py configs/X.py CHECKPOINT [--eval mAP] [--out results.pkl] [--tta]``.

COCO bbox (and segm) mAP comes from the config's ``test_evaluator``; ``--eval`` is accepted for the 2.x command
lines. Several processes: ``bash dist_test.sh configs/X.py CHECKPOINT GPUS --eval mAP``.
"""
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))  # the repository root, for `scalablevit`
from scalablevit.mm_tools import test_main  # noqa: E402


def add_args(parser):
    parser.add_argument('--out', help='also dump the raw predictions to this .pkl file')


def before_test(runner, args):
    if args.out:
        from mmengine.evaluator import DumpResults
        if not args.out.endswith(('.pkl', '.pickle')):
            raise SystemExit('error: --out must be a .pkl or .pickle file')
        runner.test_evaluator.metrics.append(DumpResults(out_file_path=args.out))


if __name__ == '__main__':
    test_main(sys.argv[1:], osp.dirname(osp.abspath(__file__)), 'Test a ScalableViT detector (mmdetection 3.x)',
              add_args=add_args, before_test=before_test)
