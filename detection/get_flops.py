"""Parameters and FLOPs of a detector: ``python get_flops.py configs/X.py [--shape 800 1280]``.

FLOPs are multiply-adds (the papers' convention, as mmcv's and fvcore's counters count them) of one forward pass
on one image of the given size (H W, as mmdet's get_flops reads it; the published table uses 1280x800, i.e.
``--shape 800 1280``), measured with ``torch.utils.flop_counter``
on the plain attention path: backbone, neck and heads; for two-stage detectors the RPN, the box head on the RPN's
proposals and the mask head on the first 100 boxes (as mmdet's ``forward_dummy`` did). Two numbers are printed:
all matrix products, and without the attention products (``q @ k^T``, ``attn @ v``), which mmcv's counter (used
for the published tables of PVT, Twins and Swin-era detectors) does not see.
"""
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))  # the repository root, for `scalablevit`
from scalablevit.cli import run_mm_command  # noqa: E402


def command(argv):
    from scalablevit.mm.flops import flops_main  # here: run_mm_command has checked the OpenMMLab stack
    return flops_main(argv, 'detection')


if __name__ == '__main__':
    sys.exit(run_mm_command(command, sys.argv[1:]))
