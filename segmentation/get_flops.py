"""Parameters and FLOPs of a segmenter config: ``python get_flops.py configs/X.py [--shape H W]``.

FLOPs are multiply-adds (the papers' convention) of one inference forward pass (backbone, neck, decode head; the
auxiliary head only trains) at 512x2048 by default, counted with ``torch.utils.flop_counter``: convolutions,
linear layers and the attention products (norms, activations, softmax and resizing are not counted). Two totals are
printed: all of them, and without the attention products. The second is what mmcv 1.x's ``get_flops`` counted
(hooks on conv/linear modules do not see the ``q @ k^T`` and ``attn @ v`` matmuls) and what the published
FLOPs column reports: 172.7G for Semantic FPN-S and 929.3G for UperNet-S at 512x2048 against the published 174G and
931G (mmcv also counted norms and activations).
"""
import argparse
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))  # the repository, if not pip-installed

from typing import Tuple  # noqa: E402

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

from scalablevit.info import count_macs, count_params  # noqa: E402


def build_segmentor(config: str, cfg_options=None) -> nn.Module:
    """The config's model on CPU, without loading its pretrained backbone."""
    from mmengine.config import Config

    from scalablevit.mm_tools import adapt_cfg_to_device, check_mm_stack

    if not osp.isfile(config):
        raise SystemExit(f'error: config file not found: {config}')
    check_mm_stack()
    from mmseg.registry import MODELS
    from mmseg.utils import register_all_modules

    register_all_modules()
    cfg = Config.fromfile(config)
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    cfg = adapt_cfg_to_device(cfg, 'cpu')
    cfg.model.backbone.init_cfg = None
    return MODELS.build(cfg.model)


def segmentor_flops(segmentor: nn.Module, shape: Tuple[int, int]) -> Tuple[int, int]:
    """(all multiply-adds, attention products) of ``segmentor(x, mode='tensor')`` on one 3 x H x W image."""
    x = torch.zeros(1, 3, *shape)
    return count_macs(segmentor, lambda: segmentor(x, mode='tensor'))


def main(argv=None):
    from mmengine.config import DictAction

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('config', help='config file')
    parser.add_argument('--shape', type=int, nargs='+', default=[512, 2048],
                        help='input height and width (default: 512 2048; mmseg reads H W); one number: a square')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction, help='override config settings, key=value')
    args = parser.parse_args(argv)
    if len(args.shape) not in (1, 2):
        parser.error('--shape takes H or H W')
    shape = (args.shape[0], args.shape[-1])

    model = build_segmentor(args.config, args.cfg_options).eval()
    parts = [(name, getattr(model, name)) for name in ('backbone', 'neck', 'decode_head', 'auxiliary_head')
             if isinstance(getattr(model, name, None), nn.Module)]
    params = count_params(model)
    flops, attn = segmentor_flops(model, shape)
    line = '=' * 60
    print(line)
    print(f'config: {args.config}')
    print(f'input shape: 3x{shape[0]}x{shape[1]}')
    print(f'FLOPs (multiply-adds): {flops / 1e9:.1f} G; without attention products (mmcv 1.x, published tables): '
          f'{(flops - attn) / 1e9:.1f} G')
    print(f'params: {params / 1e6:.2f} M ('
          + ', '.join(f'{name} {count_params(m) / 1e6:.2f}' for name, m in parts) + ')')
    print(line)
    return dict(flops=flops, attention_flops=attn, params=params, shape=shape)


if __name__ == '__main__':
    main()
