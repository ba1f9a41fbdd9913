"""Export a ScalableViT classifier (or its feature pyramid) for serving: ONNX, OpenVINO IR, or a torch.export /
AOTInductor package, each checked against the eager model before it is written.

    # our checkpoint (model, classes and preprocessing are recorded in it) -> ONNX Runtime / OpenVINO / torch
    python tools/export.py classification/digits/checkpoint_best.pth digits.onnx
    python tools/export.py classification/digits/checkpoint_best.pth digits.xml --format openvino
    python tools/export.py classification/digits/checkpoint_best.pth digits.pt2 --format pt2
    # a released weights file (needs --model), or a timm folder (tools/convert_checkpoint.py --to timm)
    python tools/export.py scalable_vit_small.pth s224.onnx --model scalable_vit_small
    # the backbone's four stage maps (timm features_only), for your own heads
    python tools/export.py scalable_vit_small.pth s_pyramid.onnx --model scalable_vit_small --features 0 1 2 3
    # int8 (NNCF, OpenVINO): calibrated on your images, its top-1 measured on a held-out folder (one sub-folder
    # per class) against the fp32 model's; refused if it loses more than --max-drop points
    python tools/export.py ckpt.pth int8.xml --format openvino --int8 --calibration photos/ --val held_out/

What the file holds: a graph with a dynamic batch and a fixed image size (``--img-size``, default the recorded
preprocessing's: ScalableViT's window padding is a Python branch on the size, which the graph keeps for one size
only), and the model name, class names and preprocessing (ONNX ``metadata_props``, OpenVINO ``rt_info``, a JSON
beside a ``.pt2``). The check: the exported model run by its engine (ONNX Runtime, OpenVINO, AOTInductor) on fixed
inputs at two batch sizes, against eager; the max relative error is printed and an fp32 export above 1e-4 is not
written. Files are written atomically. ``classification/predict.py --backend onnxruntime|openvino`` serves them.
"""
import argparse
import logging
import os
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # run from a clone without installing
sys.path.insert(1, os.path.join(REPO, 'classification'))  # its eval transform and image reader

from scalablevit.cli import ParseKwargs, collect_images  # noqa: E402
from scalablevit.errors import UserError, run_main  # noqa: E402
from scalablevit.serving import (  # noqa: E402
    EXPORT_FORMATS,
    FORMAT_SUFFIX,
    ExportedModel,
    ExportError,
    FeaturePyramid,
    export_model,
    load_classifier,
    serving_meta,
)

_logger = logging.getLogger('export')


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser('Export ScalableViT for serving', add_help=False)
    parser.add_argument('src', help='checkpoint of classification/main.py, a released weights file, or a timm folder')
    parser.add_argument('out', help='output file: NAME.onnx, NAME.xml (OpenVINO IR, NAME.bin beside) or NAME.pt2')
    parser.add_argument('--format', default=None, choices=EXPORT_FORMATS,
                        help='default: from the output name (.onnx, .xml, .pt2)')
    parser.add_argument('--model', default=None, help='timm model name (required for a weights-only file)')
    parser.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs, metavar='KEY=VALUE',
                        help='model arguments, merged over the recorded ones')
    parser.add_argument('--num-classes', default=None, type=int, help='classes of a weights-only file')
    parser.add_argument('--ema', action='store_true', help="export the checkpoint's model_ema weights")
    parser.add_argument('--img-size', default=None, type=int,
                        help='square image size fixed in the graph (default: the recorded preprocessing\'s)')
    parser.add_argument('--features', nargs='*', type=int, default=None, metavar='STAGE',
                        help='export the feature pyramid (timm features_only) of these stages instead of the '
                             'classifier; without values: all stages')
    parser.add_argument('--threads', default=None, type=int, help='engine threads of the check')
    group = parser.add_argument_group('int8 (NNCF post-training quantization, --format openvino)')
    group.add_argument('--int8', action='store_true', help='quantize to int8 weights and activations')
    group.add_argument('--calibration', nargs='+', default=None, metavar='IMAGES',
                       help='images to calibrate on: files, folders (recursive) or globs')
    group.add_argument('--calibration-size', default=300, type=int, help='images used for calibration (default 300)')
    group.add_argument('--val', default=None, metavar='FOLDER',
                       help='held-out images, one sub-folder per class (named as the classes): top-1 of fp32 and '
                            'int8 measured on them before the file is written')
    group.add_argument('--max-drop', default=1.0, type=float,
                       help='refuse an int8 model that loses more top-1 points than this on --val (default 1.0)')
    return parser


# ---------------------------------------------------------------------------------------------------------------------

def _transform(preprocessing: Dict[str, Any]):
    from datasets import build_eval_transform
    return build_eval_transform(preprocessing)


def calibration_batches(inputs: Sequence[str], preprocessing: Dict[str, Any], limit: int) -> List[np.ndarray]:
    """Up to ``limit`` images of ``inputs``, preprocessed as for serving, one per batch (NNCF counts batches)."""
    from datasets import read_image
    paths = collect_images(inputs)
    step = max(1, len(paths) // limit)  # spread over the folder (its sub-folders are often classes)
    transform = _transform(preprocessing)
    return [transform(read_image(p))[None].numpy() for p in paths[::step][:limit]]


def held_out(folder: str, class_names: Sequence[str]) -> List[tuple]:
    """(path, label) pairs of ``folder``/<class>/<image>; every sub-folder must be a class of the model."""
    if not os.path.isdir(folder):
        raise UserError(f'--val {folder}: not a folder (expected one sub-folder per class)')
    index = {name: i for i, name in enumerate(class_names)}
    subs = sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d)))
    unknown = [d for d in subs if d not in index]
    if not subs or unknown:
        raise UserError(f'--val {folder}: sub-folders must be class names of the model ({", ".join(class_names[:5])}'
                        f'{", ..." if len(class_names) > 5 else ""}); '
                        + (f'{", ".join(unknown[:5])} are not' if unknown else 'it has none'))
    return [(p, index[d]) for d in subs for p in collect_images([os.path.join(folder, d)])]


def top1(run, items: Sequence[tuple], preprocessing: Dict[str, Any], batch: int = 32) -> float:
    """Top-1 (%) of ``run`` (numpy NCHW -> logits) on (path, label) pairs."""
    from datasets import read_image
    transform = _transform(preprocessing)
    correct = 0
    for i in range(0, len(items), batch):
        chunk = items[i:i + batch]
        x = torch.stack([transform(read_image(p)) for p, _ in chunk]).numpy()
        correct += int((np.asarray(run(x)[0]).argmax(-1) == np.array([y for _, y in chunk])).sum())
    return 100.0 * correct / len(items)


def _check_args(args: argparse.Namespace) -> str:
    """The export format of ``args``; ``UserError`` / ``ExportError`` for options that do not go together."""
    fmt = args.format or next((f for f, s in FORMAT_SUFFIX.items() if args.out.endswith(s)), None)
    if fmt is None:
        raise ExportError(f'{args.out}: name the output .onnx, .xml (OpenVINO) or .pt2, or give --format')
    if args.int8 and (not args.calibration or not args.val):
        raise UserError('--int8 needs --calibration IMAGES (to calibrate on) and --val FOLDER (to measure the '
                        'top-1 it keeps)')
    if not args.int8 and (args.calibration or args.val):
        raise UserError('--calibration / --val are for --int8')
    if args.int8 and args.features is not None:
        raise UserError('--int8 is for the classifier (its accuracy is measured); drop --features')
    if not (os.path.isfile(args.src) or os.path.isdir(args.src)):
        raise UserError(f'{args.src}: no such checkpoint file or timm folder')
    return fmt


def _int8_evaluation(args: argparse.Namespace, model: torch.nn.Module, class_names: List[str], cfg: Dict[str, Any]
                     ) -> Tuple[List[np.ndarray], Callable[[ExportedModel], Dict[str, Any]]]:
    """The calibration batches of ``--calibration`` and the check of the int8 model: its top-1 on ``--val`` against
    the fp32 eager model's, ``ExportError`` when it loses more than ``--max-drop`` points."""
    calibration = calibration_batches(args.calibration, cfg, args.calibration_size)
    items = held_out(args.val, class_names)
    with torch.no_grad():
        eager = top1(lambda x: [model(torch.from_numpy(x)).numpy()], items, cfg)

    def evaluate(runner: ExportedModel) -> Dict[str, Any]:
        int8 = top1(runner, items, cfg)
        result = dict(calibration_images=len(calibration), val_images=len(items), val_folder=os.path.abspath(
            args.val), top1_fp32_eager=round(eager, 3), top1_int8=round(int8, 3),
            drop_points=round(eager - int8, 3))
        if eager - int8 > args.max_drop:
            raise ExportError(f'int8 top-1 {int8:.2f}% on {len(items)} images of {args.val} against fp32 '
                              f'{eager:.2f}%: {eager - int8:.2f} points lost, more than --max-drop '
                              f'{args.max_drop:g}; not written (more or other --calibration images may help)')
        return result

    return calibration, evaluate


def _summary(args: argparse.Namespace, fmt: str, name: str, size: int, meta: Dict[str, Any], seconds: float
             ) -> List[str]:
    """What was written and how it was checked, as printed lines."""
    check = meta['check']
    lines = [f'{args.src} -> {args.out} ({fmt}, {meta["kind"]} {name}, {meta["precision"]}, '
             f'input (batch, 3, {size}, {size}): batch dynamic, image size fixed; {seconds:.1f} s)',
             f'checked with {check["engine"]} on inputs {check["inputs"]}: max relative error against eager '
             f'{check["max_rel_err"]:.2e}' + (f' (tolerance {check["tolerance"]:.0e})' if check['tolerance'] else
                                               ' (int8: judged by its accuracy)')]
    if 'accuracy' in meta:
        a = meta['accuracy']
        lines.append(f'int8 top-1 {a["top1_int8"]:.2f}% vs fp32 {a["top1_fp32_eager"]:.2f}% on {a["val_images"]} '
                     f'held-out images ({a["drop_points"]:+.2f} points lost); calibrated on '
                     f'{a["calibration_images"]} images')
    lines.append(f'stored with it: {len(meta["class_names"])} class names, preprocessing {meta["preprocessing"]}')
    return lines


def export(args: argparse.Namespace) -> List[str]:
    fmt = _check_args(args)
    model, class_names, cfg = load_classifier(args.src, args.model, args.model_kwargs, args.num_classes, args.ema)
    name = model.pretrained_cfg.get('architecture', type(model).__name__)
    size = args.img_size or int(cfg.get('input_size', (3, 224, 224))[-1])
    if size < 1:
        raise UserError(f'--img-size must be at least 1, got {size}')
    cfg['input_size'] = [3, size, size]
    if args.features is not None:
        stages = list(args.features) or list(range(len(model.stages)))
        bad = [i for i in stages if not 0 <= i < len(model.stages)]
        if bad:
            raise UserError(f'--features {bad[0]}: {name} has stages 0..{len(model.stages) - 1}')
        model = FeaturePyramid(model, stages)
        meta = serving_meta(model.net.model, class_names, cfg, features=stages)
    else:
        meta = serving_meta(model, class_names, cfg)

    calibration, evaluate = _int8_evaluation(args, model, class_names, cfg) if args.int8 else (None, None)
    t0 = time.perf_counter()
    with torch.no_grad():
        meta = export_model(model, args.out, fmt, meta, (3, size, size), threads=args.threads,
                            int8_calibration=calibration, evaluate=evaluate)
    return _summary(args, fmt, name, size, meta, time.perf_counter() - t0)


def cli(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser('Export ScalableViT for serving', parents=[get_args_parser()],
                                     description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    return run_main(lambda: print('\n'.join(export(args))))


if __name__ == '__main__':
    sys.exit(cli())
