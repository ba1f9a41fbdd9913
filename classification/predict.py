"""Top-k predictions of a classification checkpoint on your own images.

    python predict.py photo.jpg holidays/ 'scans/**/*.png' --checkpoint ./digits/checkpoint_best.pth \\
        --results-file preds.json
    python predict.py photo.jpg --checkpoint scalable_vit_small.pth --model scalable_vit_small   # released weights

INPUT is an image, a folder (searched recursively for image files) or a glob pattern (``**`` recurses). Our own
checkpoints (written by ``main.py``) carry the model name and ``--model-kwargs``, the class names and the
evaluation preprocessing in ``ckpt['meta']``, so the checkpoint alone is enough, and every image goes through the
transform ``main.py --eval`` uses. A weights-only checkpoint (the released files) needs ``--model``; its labels
are ImageNet-1k's and its preprocessing the model's timm ``pretrained_cfg``. The preprocessing flags override
either. An image that cannot be read is reported by name and skipped; the rest are predicted.

``--results-file`` writes JSON: one object per image, ``{"image": path, "topk": [{"index": int, "label": str,
"prob": float}, ...]}``, in input order.
"""
import argparse
import json
import logging
import os
import sys
from contextlib import nullcontext
from typing import Any, Dict, List, Optional, Sequence, Tuple

import timm
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

import scalablevit  # registers scalable_vit_small/base/large with timm
from scalablevit.checkpoint import atomic_write, load_checkpoint, load_state_dict_strict
from scalablevit.cli import AMP_DTYPES, ParseKwargs, collect_images
from scalablevit.errors import UserError, run_main

# isort: split
from datasets import build_eval_transform, read_image

_logger = logging.getLogger('predict')

PREPROCESS_KEYS = ('input_size', 'interpolation', 'crop_pct', 'crop_mode', 'mean', 'std')


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser('ScalableViT classification predictions', add_help=False)
    parser.add_argument('inputs', nargs='+', metavar='INPUT', help='image file, folder (recursive) or glob pattern')
    parser.add_argument('--checkpoint', required=True, help='checkpoint written by main.py, or a weights file')
    parser.add_argument('--results-file', default=None, help='write the predictions here as JSON')
    parser.add_argument('--topk', default=5, type=int, help='classes per image (default 5)')
    parser.add_argument('--batch-size', default=32, type=int)
    parser.add_argument('--num-workers', default=0, type=int, help='data loading processes')
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--amp', action='store_true', help='autocast (float16 on CUDA, bfloat16 on CPU)')
    parser.add_argument('--amp-dtype', default=None, choices=tuple(AMP_DTYPES))
    parser.add_argument('--ema', action='store_true', help="use the checkpoint's model_ema weights")
    parser.add_argument('--quiet', action='store_true', help='no per-image line on stdout')

    group = parser.add_argument_group('Model (recorded in our checkpoints; required for weights-only files)')
    group.add_argument('--model', default=None, help='timm model name, e.g. scalable_vit_small')
    group.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs, metavar='KEY=VALUE',
                       help='extra model arguments, merged over the recorded ones')
    group.add_argument('--num-classes', default=None, type=int,
                       help='classes of a weights-only checkpoint (default: the model default, 1000)')
    group.add_argument('--class-names', default=None,
                       help='text file, one label per line (default: recorded, else ImageNet-1k for 1000 classes)')

    group = parser.add_argument_group('Preprocessing (default: what the checkpoint was evaluated with)')
    group.add_argument('--input-size', default=None, type=int, help='square input size')
    group.add_argument('--interpolation', default=None, choices=('bilinear', 'bicubic', 'nearest', 'lanczos'))
    group.add_argument('--crop-pct', default=None, type=float, help='resize to input_size / crop_pct, then crop')
    group.add_argument('--crop-mode', default=None, choices=('center', 'squash', 'border'))
    group.add_argument('--mean', default=None, type=float, nargs=3, metavar='M')
    group.add_argument('--std', default=None, type=float, nargs=3, metavar='S')
    return parser


# ---------------------------------------------------------------------------------------------------------------------
# Inputs

class ImageFiles(Dataset):
    """Paths -> (index, tensor or None, error or None): an unreadable file becomes an error, not an exception."""

    def __init__(self, paths: Sequence[str], transform):
        self.paths = list(paths)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> Tuple[int, Optional[torch.Tensor], Optional[str]]:
        try:
            return i, self.transform(read_image(self.paths[i])), None
        except UserError as e:
            return i, None, str(e)


def _collate(items):
    good = [(i, x) for i, x, err in items if err is None]
    bad = [(i, err) for i, _, err in items if err is not None]
    if not good:
        return [], None, bad
    return [i for i, _ in good], torch.stack([x for _, x in good]), bad


# ---------------------------------------------------------------------------------------------------------------------
# Model, labels, preprocessing

def _read_class_names(path: str) -> List[str]:
    if not os.path.isfile(path):
        raise UserError(f'--class-names {path}: file not found (expected one label per line)')
    with open(path) as f:
        return [line.rstrip('\n') for line in f if line.strip()]


def build_model(args: argparse.Namespace) -> Tuple[torch.nn.Module, List[str], Dict[str, Any]]:
    """The model with the checkpoint's weights (strict), the class names and the preprocessing config."""
    checkpoint = load_checkpoint(args.checkpoint)
    meta = checkpoint.get('meta') if isinstance(checkpoint.get('meta'), dict) else None
    if meta is not None:
        name = args.model or meta['model']
        kwargs = {**meta.get('model_kwargs', {}), **args.model_kwargs}
        num_classes = args.num_classes or meta['num_classes']
        class_names = list(meta.get('class_names') or [])
    else:
        if not args.model:
            raise UserError(f'{args.checkpoint} records no model (no "meta" entry: a released or weights-only '
                             f'file); give --model NAME, e.g. --model scalable_vit_small')
        name, kwargs, num_classes, class_names = args.model, dict(args.model_kwargs), args.num_classes, []
    if num_classes is not None:
        kwargs['num_classes'] = num_classes
    try:
        model = timm.create_model(name, pretrained=False, **kwargs)
    except (RuntimeError, TypeError, ValueError, AssertionError) as e:
        raise UserError(f'cannot build model {name} with {kwargs}: {str(e).splitlines()[0]}') from e

    source = args.checkpoint
    if args.ema:
        if not isinstance(checkpoint.get('model_ema'), dict):
            raise UserError(f'--ema: {args.checkpoint} has no model_ema weights')
        checkpoint, source = checkpoint['model_ema'], f'{args.checkpoint} (model_ema)'
    load_state_dict_strict(model, scalablevit.unwrap_state_dict(checkpoint), source,
                           hint='check --model / --model-kwargs / --num-classes')

    n = getattr(model, 'num_classes', None) or model.get_classifier().out_features
    if args.class_names:
        class_names = _read_class_names(args.class_names)
    elif not class_names:
        class_names = timm.data.ImageNetInfo().label_descriptions() if n == 1000 else [str(i) for i in range(n)]
    if len(class_names) != n:
        raise UserError(f'{len(class_names)} class names for a model with {n} classes')

    cfg = dict(meta['pretrained_cfg']) if meta is not None and 'pretrained_cfg' in meta else \
        {k: v for k, v in timm.data.resolve_data_config(model=model).items()}
    overrides = dict(interpolation=args.interpolation, crop_pct=args.crop_pct, crop_mode=args.crop_mode,
                     mean=args.mean, std=args.std)
    if args.input_size is not None:
        overrides['input_size'] = (3, args.input_size, args.input_size)
    cfg.update({k: v for k, v in overrides.items() if v is not None})
    return model, class_names, {k: cfg[k] for k in PREPROCESS_KEYS if k in cfg}


# ---------------------------------------------------------------------------------------------------------------------

@torch.no_grad()
def predict(args: argparse.Namespace) -> List[Dict[str, Any]]:
    if args.topk < 1:
        raise UserError(f'--topk must be at least 1, got {args.topk}')
    paths = collect_images(args.inputs)
    device = torch.device(args.device)
    model, class_names, cfg = build_model(args)
    model.to(device).eval()
    name = getattr(model, 'pretrained_cfg', {}).get('architecture', type(model).__name__)
    _logger.info(f'{len(paths)} images; model {name} with {len(class_names)} classes; '
                 f'preprocessing {cfg}')
    amp_dtype = None
    if args.amp or args.amp_dtype:
        amp_dtype = AMP_DTYPES[args.amp_dtype or ('float16' if device.type == 'cuda' else 'bfloat16')]
    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else nullcontext()

    loader = DataLoader(ImageFiles(paths, build_eval_transform(cfg)), batch_size=args.batch_size, shuffle=False,
                        num_workers=args.num_workers, collate_fn=_collate, pin_memory=device.type == 'cuda')
    k = min(args.topk, len(class_names))
    results: Dict[int, Dict[str, Any]] = {}
    skipped = []
    for indices, images, bad in tqdm(loader, desc='predict', unit='batch', file=sys.stderr, dynamic_ncols=True):
        for i, err in bad:
            skipped.append(paths[i])
            tqdm.write(f'skipped {err}', file=sys.stderr)
        if images is None:
            continue
        with autocast:
            logits = model(images.to(device, non_blocking=True))
        probs, top = logits.float().softmax(dim=-1).topk(k, dim=-1)
        for i, p_row, t_row in zip(indices, probs.tolist(), top.tolist()):
            results[i] = dict(image=paths[i], topk=[dict(index=t, label=class_names[t], prob=p)
                                                    for t, p in zip(t_row, p_row)])
    ordered = [results[i] for i in sorted(results)]
    if not args.quiet:
        for r in ordered:
            best = r['topk'][0]
            print(f'{r["image"]}: {best["label"]} ({best["prob"]:.3f})')
    if args.results_file:
        atomic_write(args.results_file, json.dumps(ordered, indent=1))
    _logger.info(f'predicted {len(ordered)} images, skipped {len(skipped)} unreadable'
                 + (f'; results in {args.results_file}' if args.results_file else ''))
    if not ordered:
        raise UserError('none of the images could be read (see the "skipped" lines above)')
    return ordered


def cli(argv=None) -> int:
    parser = argparse.ArgumentParser('ScalableViT classification predictions', parents=[get_args_parser()])
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format='%(asctime)s %(message)s', datefmt='%H:%M:%S')
    return run_main(predict, args)


if __name__ == '__main__':
    sys.exit(cli())
