"""Parameters and FLOPs of a segmenter config: ``python get_flops.py configs/X.py [--shape H W]``.

FLOPs are multiply-adds (the papers' convention) of one inference forward pass (backbone, neck, decode head; the
auxiliary head only trains) at 512x2048 by default, counted with ``torch.utils.flop_counter``: convolutions,
linear layers and the attention products (norms, activations, softmax and resizing are not counted). Two totals are
printed: all of them, and without the attention products. The second is what mmcv 1.x's ``get_flops`` counted
(hooks on conv/linear modules do not see the ``q @ k^T`` and ``attn @ v`` matmuls) and what the published
FLOPs column reports: 172.7G for Semantic FPN-S and 929.3G for UperNet-S at 512x2048 against the published 174G and
931G (mmcv also counted norms and activations).
"""
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))  # the repository root, for `scalablevit`
from scalablevit.cli import run_mm_command  # noqa: E402


def command(argv):
    from scalablevit.mm.flops import flops_main  # here: run_mm_command has checked the OpenMMLab stack
    return flops_main(argv, 'segmentation')


if __name__ == '__main__':
    sys.exit(run_mm_command(command, sys.argv[1:]))
