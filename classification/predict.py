"""Top-k predictions of a classification checkpoint on your own images.

    python predict.py photo.jpg holidays/ 'scans/**/*.png' --checkpoint ./digits/checkpoint_best.pth \\
        --results-file preds.json
    python predict.py photo.jpg --checkpoint scalable_vit_small.pth --model scalable_vit_small   # released weights
    python predict.py photos/ --backend onnxruntime --checkpoint digits.onnx   # an export of tools/export.py
    python predict.py photos/ --backend openvino --checkpoint digits.xml      # OpenVINO IR (fp32 or int8)

INPUT is an image, a folder (searched recursively for image files) or a glob pattern (``**`` recurses). Our own
checkpoints (written by ``main.py``) carry the model name and ``--model-kwargs``, the class names and the
evaluation preprocessing in ``ckpt['meta']``, so the checkpoint alone is enough, and every image goes through the
transform ``main.py --eval`` uses. A weights-only checkpoint (the released files) needs ``--model``; its labels
are ImageNet-1k's and its preprocessing the model's timm ``pretrained_cfg``. The preprocessing flags override
either. An image that cannot be read is reported by name and skipped; the rest are predicted.

``--backend onnxruntime`` / ``openvino`` run a file written by ``tools/export.py`` (``.onnx``; ``.xml`` or ``.onnx``
for OpenVINO) with that engine: its class names and preprocessing are stored in it, no model code is built, and the
image size is the one fixed at export. ``--backend torch`` (default) builds the model from the checkpoint, or runs
an AOTInductor package (``.pt2``). Every batch logs a timing line (``batch i/n: B images, model M ms``) on stderr.

``--results-file`` writes JSON: one object per image, ``{"image": path, "topk": [{"index": int, "label": str,
"prob": float}, ...]}``, in input order.
"""
import argparse
import json
import logging
import os
import sys
import time
from contextlib import nullcontext
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from scalablevit.checkpoint import atomic_write
from scalablevit.cli import AMP_DTYPES, ParseKwargs, amp_dtype, collect_images
from scalablevit.errors import UserError, run_main
from scalablevit.serving import ExportedModel, load_classifier

# isort: split
from datasets import build_eval_transform, read_image

_logger = logging.getLogger('predict')

PREPROCESS_KEYS = ('input_size', 'interpolation', 'crop_pct', 'crop_mode', 'mean', 'std')


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser('ScalableViT classification predictions', add_help=False)
    parser.add_argument('inputs', nargs='+', metavar='INPUT', help='image file, folder (recursive) or glob pattern')
    parser.add_argument('--checkpoint', required=True,
                        help='checkpoint written by main.py, or a weights file; with an engine --backend, the file '
                             'tools/export.py wrote (.onnx, .xml, .pt2)')
    parser.add_argument('--backend', default='torch', choices=('torch', 'onnxruntime', 'openvino'),
                        help='torch (the model from the checkpoint, or a .pt2 package), or an inference engine '
                             'running an exported file')
    parser.add_argument('--threads', default=None, type=int, help='engine / torch threads (default: all cores)')
    parser.add_argument('--results-file', default=None, help='write the predictions here as JSON')
    parser.add_argument('--topk', default=5, type=int, help='classes per image (default 5)')
    parser.add_argument('--batch-size', default=32, type=int)
    parser.add_argument('--num-workers', default=0, type=int, help='data loading processes')
    parser.add_argument('--device', default=None, help='default: cuda if there is one (torch backend), else cpu')
    parser.add_argument('--amp', action='store_true',
                        help='autocast (float16 on CUDA, bfloat16 on CPU); with --backend openvino: bf16 inference')
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
    try:
        with open(path, encoding='utf-8') as f:
            return [line.rstrip('\n') for line in f if line.strip()]
    except UnicodeDecodeError as e:
        raise UserError(f'--class-names {path}: not UTF-8 text (byte {e.start}: {e.reason}); expected one label per '
                        f'line') from e


def _preprocessing(cfg: Dict[str, Any], args: argparse.Namespace) -> Dict[str, Any]:
    """The recorded preprocessing with the flags' overrides."""
    cfg = dict(cfg)
    overrides = dict(interpolation=args.interpolation, crop_pct=args.crop_pct, crop_mode=args.crop_mode,
                     mean=args.mean, std=args.std)
    if args.input_size is not None:
        overrides['input_size'] = (3, args.input_size, args.input_size)
    cfg.update({k: v for k, v in overrides.items() if v is not None})
    return {k: cfg[k] for k in PREPROCESS_KEYS if k in cfg}


def _labels(class_names: List[str], n: int, args: argparse.Namespace) -> List[str]:
    if args.class_names:
        class_names = _read_class_names(args.class_names)
    if len(class_names) != n:
        raise UserError(f'{len(class_names)} class names for a model with {n} classes')
    return class_names


def build_model(args: argparse.Namespace) -> Tuple[torch.nn.Module, List[str], Dict[str, Any]]:
    """The model with the checkpoint's weights (strict), the class names and the preprocessing config."""
    model, class_names, cfg = load_classifier(args.checkpoint, args.model, args.model_kwargs, args.num_classes,
                                              args.ema)
    n = getattr(model, 'num_classes', None) or model.get_classifier().out_features
    return model, _labels(class_names, n, args), _preprocessing(cfg, args)


def build_exported(args: argparse.Namespace) -> Tuple[ExportedModel, List[str], Dict[str, Any]]:
    """An export of tools/export.py run by ``args.backend``: the engine, its class names and preprocessing."""
    given = [f for f, v in (('--model', args.model), ('--model-kwargs', args.model_kwargs),
                            ('--num-classes', args.num_classes), ('--ema', args.ema)) if v]
    if given:
        raise UserError(f'{", ".join(given)}: the exported file {args.checkpoint} fixes the model; export again '
                        f'with tools/export.py to change it')
    if args.amp_dtype == 'float16':
        raise UserError('--amp-dtype float16: the engines run fp32 or bf16 (--amp) on CPU')
    precision = 'bf16' if (args.amp or args.amp_dtype) else 'fp32'
    engine = 'torch' if args.backend == 'torch' else args.backend
    runner = ExportedModel(args.checkpoint, engine, threads=args.threads, precision=precision)
    if runner.meta.get('kind') != 'classifier':
        raise UserError(f'{args.checkpoint} is a {runner.meta.get("kind")} export (feature maps), not a classifier')
    cfg = _preprocessing(runner.meta['preprocessing'], args)
    fixed = tuple(runner.meta['preprocessing']['input_size'])
    if tuple(cfg['input_size']) != fixed:
        raise UserError(f'--input-size {cfg["input_size"][-1]}: {args.checkpoint} was exported for '
                        f'{fixed[-1]}x{fixed[-2]} images (the size is fixed in the graph); export again with '
                        f'--img-size {cfg["input_size"][-1]}')
    return runner, _labels(list(runner.meta['class_names']), int(runner.meta['num_classes']), args), cfg


def _check_args(args: argparse.Namespace) -> None:
    if args.topk < 1:
        raise UserError(f'--topk must be at least 1, got {args.topk}')
    if args.batch_size < 1:
        raise UserError(f'--batch-size must be at least 1, got {args.batch_size}')
    if args.num_workers < 0:
        raise UserError(f'--num-workers must be 0 or more, got {args.num_workers}')
    if args.threads is not None and args.threads < 1:
        raise UserError(f'--threads must be at least 1, got {args.threads}')
    if args.backend != 'torch' and args.device != 'cpu':
        raise UserError(f'--backend {args.backend} runs on the CPU; drop --device {args.device}')


# ---------------------------------------------------------------------------------------------------------------------

def build_forward(args: argparse.Namespace, device: torch.device
                  ) -> Tuple[Callable[[torch.Tensor], torch.Tensor], str, List[str], Dict[str, Any]]:
    """The model of ``args`` as ``forward(images) -> logits`` (an exported file in its engine, or the PyTorch model
    on ``device`` under the chosen autocast), with its name, class names and preprocessing."""
    exported = args.backend != 'torch' or args.checkpoint.endswith(('.pt2', '.onnx', '.xml'))
    if exported:
        runner, class_names, cfg = build_exported(args)
        name = f'{runner.meta["model"]} ({runner.engine}, {runner.meta.get("precision", "fp32")}' \
               + (', bf16 inference' if runner.precision == 'bf16' else '') + ')'

        def forward(x: torch.Tensor) -> torch.Tensor:
            return torch.from_numpy(runner(x)[0])
    else:
        if args.threads:
            torch.set_num_threads(args.threads)
        model, class_names, cfg = build_model(args)
        model.to(device).eval()
        name = getattr(model, 'pretrained_cfg', {}).get('architecture', type(model).__name__)
        use_amp = args.amp or args.amp_dtype
        autocast = torch.autocast(device.type, dtype=amp_dtype(args.amp_dtype, device)) if use_amp else nullcontext()

        def forward(x: torch.Tensor) -> torch.Tensor:
            with autocast:
                out = model(x.to(device, non_blocking=True))
            if device.type == 'cuda':
                torch.cuda.synchronize(device)
            return out
    return forward, name, class_names, cfg


@torch.no_grad()
def predict(args: argparse.Namespace) -> List[Dict[str, Any]]:
    if args.device is None:  # the engines here are CPU engines
        args.device = 'cuda' if args.backend == 'torch' and torch.cuda.is_available() else 'cpu'
    _check_args(args)
    paths = collect_images(args.inputs)
    device = torch.device(args.device)
    forward, name, class_names, cfg = build_forward(args, device)
    _logger.info(f'{len(paths)} images; model {name} with {len(class_names)} classes; '
                 f'preprocessing {cfg}')

    loader = DataLoader(ImageFiles(paths, build_eval_transform(cfg)), batch_size=args.batch_size, shuffle=False,
                        num_workers=args.num_workers, collate_fn=_collate, pin_memory=device.type == 'cuda')
    k = min(args.topk, len(class_names))
    results: Dict[int, Dict[str, Any]] = {}
    skipped = []
    for b, (indices, images, bad) in enumerate(tqdm(loader, desc='predict', unit='batch', file=sys.stderr,
                                                   dynamic_ncols=True, disable=not sys.stderr.isatty())):
        for i, err in bad:
            skipped.append(paths[i])
            tqdm.write(f'skipped {err}', file=sys.stderr)
        if images is None:
            continue
        t0 = time.perf_counter()
        logits = forward(images)
        ms = 1e3 * (time.perf_counter() - t0)
        tqdm.write(f'batch {b + 1}/{len(loader)}: {len(indices)} images, model {ms:.1f} ms '
                   f'({1e3 * len(indices) / ms:.1f} img/s, {args.backend})', file=sys.stderr)
        probs, top = logits.float().cpu().softmax(dim=-1).topk(k, dim=-1)
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
