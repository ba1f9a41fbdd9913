"""Parameters and FLOPs of the ScalableViT variants.

    python -m scalablevit.info                  # S, B, L at 224
    python -m scalablevit.info --img-size 256 --models scalable_vit_small

FLOPs follow the papers' convention (one multiply-add = one FLOP, as fvcore counts them) and are measured with
``torch.utils.flop_counter`` on the plain attention path, so every matmul is seen: convolutions, linears and
the attention products. Norms, activations and softmax are not counted (as in fvcore).

:func:`count_macs` is the one counter of the project, for the backbone and for whole detectors and segmentors
(``detection/get_flops.py``, ``segmentation/get_flops.py``, ``benchmarks/throughput.py`` use it):

    macs = count_macs(model, 224)                                    # a zero batch of one 224x224 image
    macs = count_macs(model, (800, 1280))                            # (H, W)
    macs = count_macs(detector, lambda: detector(x, [sample], mode='tensor'))  # any forward pass
    macs.total, macs.without_attention, macs.attention               # multiply-adds
"""
import argparse
from contextlib import contextmanager
from typing import Any, Callable, Dict, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = ['MacCount', 'PUBLISHED', 'count_macs', 'count_macs_by_op', 'count_params', 'describe', 'plain_attention',
           'table']

# Published numbers (paper / released README) and the released code's parameter counts, for the table.
PUBLISHED = {
    'scalable_vit_small': dict(params_m=32.4, gflops=4.2, top1=83.1, released_params_m=32.00),
    'scalable_vit_base': dict(params_m=81.9, gflops=8.6, top1=84.1, released_params_m=81.88),
    'scalable_vit_large': dict(params_m=104.9, gflops=14.7, top1=84.4, released_params_m=109.29),
}


class MacCount(NamedTuple):
    """Multiply-adds of one forward pass: ``total`` and, of those, the ``attention`` products.

    Counters of the mmcv 1.x era (the detection and segmentation tables of the paper and its peers, and the
    classification FLOPs of many papers) did not see the attention products: ``without_attention`` is that number.
    """
    total: int
    attention: int

    @property
    def without_attention(self) -> int:
        return self.total - self.attention


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
def count_macs_by_op(
        model: nn.Module,
        inputs: Union[int, Tuple[int, int], torch.Tensor, Callable[[], Any]] = 224,
        in_chans: int = 3,
) -> Dict[str, int]:
    """Multiply-adds of one forward pass, per aten op (``'aten.addmm'``, ``'aten.mm'``: Linear layers;
    ``'aten.bmm'``: the attention products; ``'aten.convolution'``; ...). Same arguments and conventions as
    :func:`count_macs`, which sums these."""
    if callable(inputs) and not isinstance(inputs, torch.Tensor):
        run = inputs
    else:
        if isinstance(inputs, torch.Tensor):
            x = inputs
        else:
            size = (inputs, inputs) if isinstance(inputs, int) else tuple(inputs)
            if len(size) != 2:
                raise ValueError(f'inputs must be an int, (H, W), a tensor or a callable, got {inputs!r}')
            param = next(model.parameters(), None)
            device = param.device if param is not None else None
            dtype = param.dtype if param is not None and param.is_floating_point() else None
            x = torch.zeros(1, in_chans, *size, device=device, dtype=dtype)

        def run():
            return model(x)

    was_training = model.training
    model.eval()
    try:
        with plain_attention(model), FlopCounterMode(display=False) as counter:
            run()
    finally:
        model.train(was_training)
    return {str(op): n // 2 for op, n in counter.get_flop_counts().get('Global', {}).items()}


def count_macs(
        model: nn.Module,
        inputs: Union[int, Tuple[int, int], torch.Tensor, Callable[[], Any]] = 224,
        in_chans: int = 3,
) -> MacCount:
    """Multiply-adds of one forward pass of ``model`` in eval mode, with attention on the plain path.

    Args:
        model: any module; it is put in eval mode (and back), and every ``fused_attn`` flag is switched off for
            the count, so that the attention products are seen.
        inputs: the image size of a zero batch of one image (``int`` or ``(H, W)``) passed as ``model(x)``; or
            that batch itself (a tensor); or a callable without arguments that runs the forward pass (for models
            whose forward takes more than images, e.g. ``lambda: detector(x, [sample], mode='tensor')``).
        in_chans: channels of the zero batch.

    Returns:
        ``MacCount(total, attention)``; ``.without_attention`` is ``total - attention``. Per op:
        :func:`count_macs_by_op`.

    On the plain path the two attention products (``q @ k^T``, ``attn @ v``) are the only batched matmuls
    (``aten.bmm``); convolutions and linears go through convolution / mm / addmm.
    """
    ops = count_macs_by_op(model, inputs, in_chans)
    return MacCount(total=sum(ops.values()), attention=ops.get('aten.bmm', 0))


def describe(model: nn.Module, input_size: Union[int, Tuple[int, int]] = 224, in_chans: int = 3) -> str:
    """One line: parameters (M) and GFLOPs at ``input_size``; used by the training scripts at start-up."""
    size = input_size if isinstance(input_size, int) else 'x'.join(map(str, input_size))
    return (f'params: {count_params(model) / 1e6:.2f}M, '
            f'FLOPs at {size}: {count_macs(model, input_size, in_chans).total / 1e9:.2f}G')


def table(models: Sequence[str], img_size: int = 224) -> str:
    """The README's table for ``models`` (any timm names); '-' where no published or released figure exists."""
    import timm  # the entry points are registered: this module is part of the package

    rows = ['| model | params, ours (M) | params, released code (M) | params, published (M) | GFLOPs, ours '
            '| GFLOPs, ours without attention products | GFLOPs, published | top-1, published |',
            '| --- | --- | --- | --- | --- | --- | --- | --- |']
    for name in models:
        model = timm.create_model(name)
        macs = count_macs(model, img_size)
        known = PUBLISHED.get(name, {})
        pub = {k: f'{known[k]:.2f}' if k == 'released_params_m' else f'{known[k]:g}' for k in known}
        rows.append(
            f'| {name} | {count_params(model) / 1e6:.2f} | {pub.get("released_params_m", "-")} | '
            f'{pub.get("params_m", "-")} | {macs.total / 1e9:.2f} | {macs.without_attention / 1e9:.2f} | '
            f'{pub.get("gflops", "-")} | {pub.get("top1", "-")} |')
    return '\n'.join(rows)


def main(argv: Optional[Sequence[str]] = None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--models', nargs='+', default=list(PUBLISHED),
                        help='timm model names (default: the three ScalableViT sizes)')
    parser.add_argument('--img-size', type=int, default=224)
    args = parser.parse_args(argv)
    import timm

    unknown = [m for m in args.models if not timm.is_model(m)]
    if unknown:
        parser.error(f'unknown model(s): {", ".join(unknown)}; choose from timm.list_models() (ScalableViT: '
                     f'{", ".join(PUBLISHED)})')
    print(f'Parameters and FLOPs (multiply-adds) at {args.img_size}x{args.img_size}')
    print(table(args.models, args.img_size))


if __name__ == '__main__':
    main()
