"""Where one point of an image looks: ScalableViT's attention maps per stage, as a PNG grid.

    python tools/attention_map.py photo.jpg --checkpoint classification/digits/checkpoint_best.pth --point 0.5 0.3
    python tools/attention_map.py photo.jpg --checkpoint scalable_vit_small.pth --model scalable_vit_small

For the query token under ``--point X Y`` (fractions of the model input's width and height; default the centre),
one row per stage:

* IWSA: the attention of the query over the tokens of its own ``ws x ws`` window (the rest of the map is not
  attended; the local interactive module's 3x3 conv, which links windows, is not attention and is not drawn);
* SSA: the attention of the query over the whole map, whose keys are the map reduced ``sr_ratio`` times (each key
  covers ``sr_ratio x sr_ratio`` tokens, drawn as such a block).

Each map is the softmax row of the last IWSA / SSA block of the stage (``--block first`` for the first), averaged
over heads (``--head N`` for one), upsampled to the input and laid over it. The image is preprocessed as the
checkpoint was evaluated (``meta['pretrained_cfg']`` of ``classification/main.py`` checkpoints, else the model's
timm ``pretrained_cfg``); ``--input-size`` overrides the size. The maps come from the plain attention path
(``set_fused_attn(False)``), read with forward hooks; the model is not changed.
"""
import argparse
import math
import os
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from timm.data import create_transform, resolve_data_config

import scalablevit
from scalablevit import InteractiveWindowAttention, ScalableSelfAttention
from scalablevit.checkpoint import load_checkpoint, load_state_dict_strict
from scalablevit.errors import UserError, run_main

# ---------------------------------------------------------------------------------------------------------------------
# Capture

class AttentionRecorder:
    """Forward hooks that keep, for every SSA / IWSA module, its input map size and its attention probabilities
    (the input of ``attn_drop``, which the plain path applies to the softmax)."""

    def __init__(self, model: nn.Module):
        self.modules = [(name, m) for name, m in model.named_modules()
                        if isinstance(m, (ScalableSelfAttention, InteractiveWindowAttention))]
        if not self.modules:
            raise UserError(f'{type(model).__name__} has no ScalableViT attention modules')
        self.sizes: Dict[str, Tuple[int, int]] = {}
        self.probs: Dict[str, torch.Tensor] = {}
        self._handles = []
        for name, m in self.modules:
            self._handles.append(m.register_forward_pre_hook(self._size_hook(name)))
            self._handles.append(m.attn_drop.register_forward_hook(self._probs_hook(name)))

    def _size_hook(self, name):
        def hook(module, args):
            self.sizes[name] = tuple(int(s) for s in args[1])
        return hook

    def _probs_hook(self, name):
        def hook(module, args, output):
            self.probs[name] = args[0].detach()
        return hook

    def remove(self):
        for h in self._handles:
            h.remove()


def _stage_and_block(name: str) -> Tuple[int, int]:
    parts = name.split('.')  # stages.{i}.{j}.attn
    return int(parts[1]), int(parts[2])


def query_token(point: Sequence[float], size: Tuple[int, int]) -> Tuple[int, int]:
    """(row, col) of the token under ``point`` (x, y fractions) on a map of ``size`` (H, W)."""
    H, W = size
    return min(int(point[1] * H), H - 1), min(int(point[0] * W), W - 1)


def ssa_row(module: ScalableSelfAttention, probs: torch.Tensor, size: Tuple[int, int], point: Sequence[float],
            head: Optional[int]) -> torch.Tensor:
    """The query's attention over the map, (H, W): each reduced key spread over its ``r x r`` tokens."""
    H, W = size
    r = module.sr_ratio
    y, x = query_token(point, size)
    row = probs[0, :, y * W + x]  # (h, M)
    row = row.mean(0) if head is None else row[head]
    Hr, Wr = math.ceil(H / r), math.ceil(W / r)
    grid = row.reshape(Hr, Wr)  # keys of the padded, reduced map
    # (H, W) share of the query's attention: a key's weight split evenly over the tokens it covers
    return grid.repeat_interleave(r, 0).repeat_interleave(r, 1)[:H, :W] / (r * r)


def iwsa_row(module: InteractiveWindowAttention, probs: torch.Tensor, size: Tuple[int, int],
             point: Sequence[float], head: Optional[int]) -> torch.Tensor:
    """The query's attention over the tokens of its window, (H, W), zero outside the window."""
    H, W = size
    ws = module.ws
    wg = math.ceil(W / ws)
    y, x = query_token(point, size)
    window = (y // ws) * wg + x // ws  # windows are ordered row by row (B = 1)
    row = probs[window, :, (y % ws) * ws + x % ws]  # (h, ws * ws)
    row = row.mean(0) if head is None else row[head]
    out = torch.zeros(math.ceil(H / ws) * ws, wg * ws)
    top, left = (y // ws) * ws, (x // ws) * ws
    out[top:top + ws, left:left + ws] = row.reshape(ws, ws)
    return out[:H, :W]


def window_mask(size: Tuple[int, int], ws: int, point: Sequence[float]) -> torch.Tensor:
    """(H, W) bool, True on the tokens of the query's window."""
    y, x = query_token(point, size)
    mask = torch.zeros(size, dtype=torch.bool)
    mask[(y // ws) * ws:(y // ws + 1) * ws, (x // ws) * ws:(x // ws + 1) * ws] = True
    return mask


@torch.no_grad()
def attention_maps(model: nn.Module, image: torch.Tensor, point: Sequence[float] = (0.5, 0.5),
                   block: str = 'last', head: Optional[int] = None) -> List[Dict[str, Any]]:
    """For a (1, 3, H, W) input: per stage and kind ('IWSA', 'SSA'), the query's attention map on the stage's
    token grid (``map``, sums to 1 over the map), with ``stage``, ``block`` and ``size``."""
    if image.dim() != 4 or image.shape[0] != 1:
        raise UserError(f'expected one image (1, 3, H, W), got {tuple(image.shape)}')
    recorder = AttentionRecorder(model)
    fused = [(m, m.fused_attn) for _, m in recorder.modules]
    try:
        for m, _ in fused:
            m.fused_attn = False  # the plain path computes the probabilities the hooks read
        model.eval()
        model.forward_intermediates(image, intermediates_only=True)
    finally:
        recorder.remove()
        for m, was in fused:
            m.fused_attn = was
    chosen: Dict[Tuple[int, str], Tuple[int, str, nn.Module]] = {}
    for name, m in recorder.modules:
        if name not in recorder.probs:
            continue
        stage, j = _stage_and_block(name)
        kind = 'IWSA' if isinstance(m, InteractiveWindowAttention) else 'SSA'
        if (stage, kind) not in chosen or block == 'last':
            chosen[(stage, kind)] = (j, name, m)
    out = []
    for (stage, kind), (j, name, m) in sorted(chosen.items()):
        size, probs = recorder.sizes[name], recorder.probs[name]
        if head is not None and not 0 <= head < m.num_heads:
            raise UserError(f'--head {head}: stage {stage} has {m.num_heads} heads')
        fn = iwsa_row if kind == 'IWSA' else ssa_row
        item = dict(stage=stage, kind=kind, block=j, size=size, map=fn(m, probs, size, point, head),
                    query=query_token(point, size), reduction=getattr(m, 'sr_ratio', None),
                    window=getattr(m, 'ws', None))
        if kind == 'IWSA':
            item['window_mask'] = window_mask(size, m.ws, point)
        out.append(item)
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Model and image

def build_model(args: argparse.Namespace) -> Tuple[nn.Module, Dict[str, Any]]:
    checkpoint = load_checkpoint(args.checkpoint)
    meta = checkpoint.get('meta') if isinstance(checkpoint.get('meta'), dict) else {}
    name = args.model or meta.get('model')
    if not name:
        raise UserError(f'{args.checkpoint} records no model (a released or weights-only file); give --model NAME')
    kwargs = dict(meta.get('model_kwargs') or {})
    if meta.get('num_classes') is not None:
        kwargs['num_classes'] = meta['num_classes']
    try:
        model = timm.create_model(name, pretrained=False, **kwargs)
    except (RuntimeError, TypeError, ValueError, AssertionError) as e:
        raise UserError(f'cannot build model {name} with {kwargs}: {str(e).splitlines()[0]}') from e
    load_state_dict_strict(model, scalablevit.unwrap_state_dict(checkpoint), args.checkpoint, hint='check --model')
    cfg = dict(meta['pretrained_cfg']) if meta.get('pretrained_cfg') else dict(resolve_data_config(model=model))
    if args.input_size:
        cfg['input_size'] = (3, args.input_size, args.input_size)
    return model.eval(), cfg


def load_image(path: str, cfg: Dict[str, Any]) -> Tuple[torch.Tensor, torch.Tensor]:
    """(normalised input (1, 3, H, W), the same crop as RGB in [0, 1] for drawing)."""
    try:
        with open(path, 'rb') as f:
            img = Image.open(f).convert('RGB')
    except (OSError, ValueError) as e:
        raise UserError(f'cannot read image {path}: {e}') from e
    transform = create_transform(input_size=tuple(cfg['input_size']), is_training=False,
                                 interpolation=cfg['interpolation'], crop_pct=cfg['crop_pct'],
                                 crop_mode=cfg.get('crop_mode', 'center'), mean=tuple(cfg['mean']),
                                 std=tuple(cfg['std']))
    x = transform(img)
    mean = torch.tensor(cfg['mean']).view(3, 1, 1)
    std = torch.tensor(cfg['std']).view(3, 1, 1)
    return x[None], (x * std + mean).clamp(0, 1)


def draw(maps: List[Dict[str, Any]], shown: torch.Tensor, point: Sequence[float], out: str, title: str = ''):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    import numpy as np

    stages = sorted({m['stage'] for m in maps})
    kinds = [k for k in ('IWSA', 'SSA') if any(m['kind'] == k for m in maps)]
    H, W = shown.shape[-2:]
    fig, axes = plt.subplots(len(stages), 1 + len(kinds), figsize=(3.0 * (1 + len(kinds)), 3.0 * len(stages)),
                             squeeze=False)
    px, py = point[0] * W - 0.5, point[1] * H - 0.5
    picture = shown.permute(1, 2, 0).numpy()
    for r, stage in enumerate(stages):
        ax = axes[r, 0]
        ax.imshow(picture)
        ax.plot([px], [py], marker='x', color='red', markersize=9, mew=2)
        ax.set_title(f'stage {stage}: query', fontsize=9)
        for c, kind in enumerate(kinds, 1):
            ax = axes[r, c]
            found = [m for m in maps if m['stage'] == stage and m['kind'] == kind]
            if not found:
                ax.set_visible(False)
                continue
            m = found[0]
            heat = F.interpolate(m['map'][None, None], size=(H, W), mode='nearest')[0, 0].numpy()
            ax.imshow(picture)
            if kind == 'IWSA':  # outside the query's window: not attended, left uncoloured
                outside = F.interpolate(m['window_mask'][None, None].float(), size=(H, W), mode='nearest')[0, 0]
                heat = np.ma.masked_where(outside.numpy() < 0.5, heat)
            ax.imshow(heat, cmap='inferno', alpha=0.65)
            ax.plot([px], [py], marker='x', color='cyan', markersize=7, mew=1.5)
            h, w = m['size']
            detail = f'window {m["window"]}' if kind == 'IWSA' else f'keys reduced x{m["reduction"]}'
            ax.set_title(f'{kind}, block {m["block"]}: {h}x{w} map, {detail}', fontsize=8)
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser('ScalableViT attention maps', add_help=False)
    parser.add_argument('image')
    parser.add_argument('--checkpoint', required=True, help='classification checkpoint (ours, released, timm)')
    parser.add_argument('--model', default=None, help='timm model name (needed for weights-only files)')
    parser.add_argument('--point', nargs=2, type=float, default=(0.5, 0.5), metavar=('X', 'Y'),
                        help='query point as fractions of the input width and height (default: 0.5 0.5)')
    parser.add_argument('--block', choices=('last', 'first'), default='last', help='which block of each stage')
    parser.add_argument('--head', type=int, default=None, help='one head instead of the mean over heads')
    parser.add_argument('--input-size', type=int, default=None, help='square input size (default: recorded)')
    parser.add_argument('--out', default='attention.png')
    return parser


def main(args: argparse.Namespace):
    if not all(0.0 <= p <= 1.0 for p in args.point):
        raise UserError(f'--point {args.point[0]} {args.point[1]}: give fractions of width and height in [0, 1]')
    if not args.out.lower().endswith('.png'):
        raise UserError(f'--out {args.out}: name a .png file')
    model, cfg = build_model(args)
    x, shown = load_image(args.image, cfg)
    maps = attention_maps(model, x, args.point, args.block, args.head)
    draw(maps, shown, args.point, args.out, title=f'{os.path.basename(args.image)}, query at '
                                                  f'({args.point[0]:.2f}, {args.point[1]:.2f})')
    print(f'wrote {args.out}: {len(maps)} maps, stages {sorted({m["stage"] for m in maps})}')


def cli(argv=None) -> int:
    parser = argparse.ArgumentParser('ScalableViT attention maps', parents=[get_args_parser()],
                                     description=__doc__.split('\n\n')[0])
    return run_main(main, parser.parse_args(argv))


if __name__ == '__main__':
    sys.exit(cli())
