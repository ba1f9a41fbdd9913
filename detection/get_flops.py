"""Parameters and FLOPs of a detector: ``python get_flops.py configs/X.py [--shape 800 1280]``.

FLOPs are multiply-adds (the papers' convention, as mmcv's and fvcore's counters count them) of one forward pass
on one image of the given size (H W, as mmdet's get_flops reads it; the published table uses 1280x800, i.e.
``--shape 800 1280``), measured with ``torch.utils.flop_counter``
on the plain attention path: backbone, neck and heads; for two-stage detectors the RPN, the box head on the RPN's
proposals and the mask head on the first 100 boxes (as mmdet's ``forward_dummy`` did). Two numbers are printed:
all matrix products, and without the attention products (``q @ k^T``, ``attn @ v``), which mmcv's counter (used
for the published tables of PVT, Twins and Swin-era detectors) does not see.
"""
import argparse
import logging
import os.path as osp
import sys
from typing import Optional, Sequence

import torch

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))  # the repository root, for `scalablevit`

from scalablevit.info import count_macs, count_params  # noqa: E402
from scalablevit.mm_tools import check_mm_stack  # noqa: E402

_logger = logging.getLogger('get_flops')


def build_detector(config: str, cfg_options: Optional[dict] = None):
    from mmdet.registry import MODELS
    from mmengine.config import Config
    from mmengine.registry import init_default_scope

    cfg = Config.fromfile(config)
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    if cfg.get('custom_imports'):
        from mmengine.utils import import_modules_from_strings
        import_modules_from_strings(**cfg.custom_imports)
    init_default_scope(cfg.get('default_scope', 'mmdet'))
    cfg.model.backbone.init_cfg = None  # no pretrained file needed to count
    return MODELS.build(cfg.model)


def detector_flops(model: torch.nn.Module, height: int = 800, width: int = 1280):
    """(all multiply-adds, multiply-adds without the attention products) of one forward pass."""
    from mmdet.structures import DetDataSample

    x = torch.zeros(1, 3, height, width)
    sample = DetDataSample(metainfo=dict(img_shape=(height, width), ori_shape=(height, width),
                                         pad_shape=(height, width), batch_input_shape=(height, width),
                                         scale_factor=(1., 1.)))
    total, attention = count_macs(model, lambda: model(x, [sample], mode='tensor'))
    return total, total - attention


def main(argv: Optional[Sequence[str]] = None):
    from mmengine.config import DictAction

    parser = argparse.ArgumentParser(description='Parameters and FLOPs (multiply-adds) of a detector config')
    parser.add_argument('config')
    parser.add_argument('--shape', type=int, nargs='+', default=[800, 1280], metavar='H [W]',
                        help='input height and width (default: 800 1280); one number: a square')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction)
    args = parser.parse_args(argv)
    if len(args.shape) > 2:
        parser.error('--shape takes H or H W')
    height, width = args.shape[0], args.shape[-1]
    if not osp.isfile(args.config):
        raise SystemExit(f'error: config file not found: {args.config}')
    check_mm_stack()
    logging.basicConfig(level=logging.INFO, format='%(message)s')
    model = build_detector(args.config, args.cfg_options)
    params = count_params(model)
    backbone = count_params(model.backbone)
    total, no_attn = detector_flops(model, height, width)
    _logger.info('%s\n  params: %.2f M (backbone %.2f M)\n  FLOPs at %dx%d (W x H): %.1f G (%.1f G without the '
                 'attention products)', osp.basename(args.config), params / 1e6, backbone / 1e6, width, height,
                 total / 1e9, no_attn / 1e9)
    return dict(flops=total, attention_flops=total - no_attn, params=params, shape=(height, width))


if __name__ == '__main__':
    main()
