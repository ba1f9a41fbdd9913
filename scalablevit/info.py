"""Parameters and FLOPs of the ScalableViT variants.

    python -m scalablevit.info                  # S, B, L at 224
    python -m scalablevit.info --img-size 256 --models scalable_vit_small

FLOPs follow the papers' convention (one multiply-add = one FLOP, as fvcore counts them) and are measured with
``torch.utils.flop_counter`` on the plain attention path, so every matmul is seen: convolutions, linears and
the attention products. Norms, activations and softmax are not counted (as in fvcore). :func:`count_macs` is
the one counter of the project: ``detection/get_flops.py`` and ``segmentation/get_flops.py`` use it too.
"""
import argparse
import logging
from contextlib import contextmanager
from typing import Any, Callable, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

_logger = logging.getLogger(__name__)

# Published numbers (paper / seed README) and the released code's parameter counts, for the table.
PUBLISHED = {
    'scalable_vit_small': dict(params_m=32.4, gflops=4.2, top1=83.1, released_params_m=32.00),
    'scalable_vit_base': dict(params_m=81.9, gflops=8.6, top1=84.1, released_params_m=81.88),
    'scalable_vit_large': dict(params_m=104.9, gflops=14.7, top1=84.4, released_params_m=109.29),
}


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


@contextmanager
def plain_attention(model: nn.Module):
    """Every module with a ``fused_attn`` flag on the plain path (explicit matmuls), restored afterwards."""
    previous = {m: m.fused_attn for m in model.modules() if hasattr(m, 'fused_attn')}
    try:
        for m in previous:
            m.fused_attn = False
        yield model
    finally:
        for m, flag in previous.items():
            m.fused_attn = flag


@torch.no_grad()
def count_macs(model: nn.Module, run: Callable[[], Any]) -> Tuple[int, int]:
    """(all multiply-adds, of which attention products) of ``run()``, a forward pass of ``model``, in eval mode.

    Attention runs on the plain path, where its two products (``q @ k^T``, ``attn @ v``) are the only batched
    matmuls (``aten.bmm``); convolutions and linears go through convolution / mm / addmm. Counters of the
    mmcv 1.x era (the detection and segmentation tables of the paper and its peers) did not see the attention
    products, so both numbers are returned.
    """
    was_training = model.training
    model.eval()
    try:
        with plain_attention(model), FlopCounterMode(display=False) as counter:
            run()
    finally:
        model.train(was_training)
    ops = {str(op): n // 2 for op, n in counter.get_flop_counts().get('Global', {}).items()}
    return sum(ops.values()), ops.get('aten.bmm', 0)


def count_flops(
        model: nn.Module,
        input_size: Union[int, Tuple[int, int]] = 224,
        in_chans: int = 3,
        device: Optional[Union[str, torch.device]] = None,
) -> int:
    """Multiply-adds of one forward pass on one image of ``input_size`` (int or (H, W))."""
    if isinstance(input_size, int):
        input_size = (input_size, input_size)
    if device is None:
        device = next(model.parameters()).device
    x = torch.zeros(1, in_chans, *input_size, device=device)
    return count_macs(model, lambda: model(x))[0]


def describe(model: nn.Module, input_size: Union[int, Tuple[int, int]] = 224, in_chans: int = 3) -> str:
    """One line: parameters (M) and GFLOPs at ``input_size``; used by the training scripts at start-up."""
    size = input_size if isinstance(input_size, int) else 'x'.join(map(str, input_size))
    return (f'params: {count_params(model) / 1e6:.2f}M, '
            f'FLOPs at {size}: {count_flops(model, input_size, in_chans) / 1e9:.2f}G')


def table(models: Sequence[str], img_size: int = 224) -> str:
    import timm

    import scalablevit  # noqa: F401  (registers the entry points)

    rows = ['| model | params (M) | released code (M) | published (M) | GFLOPs | GFLOPs without attention products '
            '| published GFLOPs |', '| --- | --- | --- | --- | --- | --- | --- |']
    for name in models:
        model = timm.create_model(name)
        x = torch.zeros(1, 3, img_size, img_size)
        total, attention = count_macs(model, lambda: model(x))
        pub = {k: f'{v:g}' for k, v in PUBLISHED.get(name, {}).items()}
        rows.append(
            f'| {name} | {count_params(model) / 1e6:.2f} | {PUBLISHED[name]["released_params_m"]:.2f} | '
            f'{pub.get("params_m", "-")} | {total / 1e9:.2f} | {(total - attention) / 1e9:.2f} | '
            f'{pub.get("gflops", "-")} |')
    return '\n'.join(rows)


def main(argv: Optional[Sequence[str]] = None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--models', nargs='+', default=list(PUBLISHED))
    parser.add_argument('--img-size', type=int, default=224)
    args = parser.parse_args(argv)
    print(f'ScalableViT at {args.img_size}x{args.img_size} (FLOPs = multiply-adds)')
    print(table(args.models, args.img_size))


if __name__ == '__main__':
    main()
