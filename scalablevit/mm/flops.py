"""Parameters and FLOPs of a detection / segmentation config: ``detection|segmentation/get_flops.py``.

FLOPs are multiply-adds (the papers' convention, as mmcv's and fvcore's counters count them) of one inference
forward pass on one image, counted with ``torch.utils.flop_counter`` (:func:`scalablevit.info.count_macs`) on the
plain attention path: convolutions, linear layers and the attention products (norms, activations, softmax and
resizing are not counted). Detectors run backbone, neck and heads (two-stage: the RPN, the box head on its
proposals and the mask head on the first 100 boxes, as mmdet's ``forward_dummy`` did); segmenters backbone, neck
and decode head (the auxiliary head only trains). Two totals are printed: all products, and without the attention
products (``q @ k^T``, ``attn @ v``), which is what mmcv 1.x's counter saw and the published tables report.
"""
import argparse
import os.path as osp
from typing import List, Optional

from mmengine.config import DictAction

from ..info import count_macs, count_params
from .config import build_model, read_config
from .tasks import get_task

__all__ = ['flops_main']


def flops_main(argv: Optional[List[str]], task) -> dict:
    task = get_task(task)
    h, w = task.flops_shape
    parser = argparse.ArgumentParser(description=f'Parameters and FLOPs (multiply-adds) of a {task.name} config')
    parser.add_argument('config', help='config file')
    parser.add_argument('--shape', type=int, nargs='+', default=[h, w], metavar='H [W]',
                        help=f'input height and width (default: {h} {w}, as mmdet/mmseg read it); one number: a square')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction, help='override config settings, key=value')
    args = parser.parse_args(argv)
    if len(args.shape) > 2:
        parser.error('--shape takes H or H W')
    shape = (args.shape[0], args.shape[-1])
    cfg = read_config(args.config, args.cfg_options)
    task.check_scope(cfg)
    model = build_model(cfg, task).eval()
    macs = count_macs(model, task.dummy_forward(model, shape))
    params = count_params(model)
    parts = ', '.join(f'{name} {count_params(m) / 1e6:.2f} M' for name, m in task.flops_parts(model))
    print(f'{osp.basename(args.config)}\n'
          f'  params: {params / 1e6:.2f} M ({parts})\n'
          f'  FLOPs at {shape[1]}x{shape[0]} (W x H): {macs.total / 1e9:.1f} G ({macs.without_attention / 1e9:.1f} G '
          f'without the attention products)')
    return dict(macs=macs, params=params, shape=shape)
