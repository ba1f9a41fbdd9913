"""The fp32 Linear GEMM kernels of this CPU on a model's own Linear shapes: which one ``optimize_for_inference`` runs.

    python benchmarks/linear_kernels.py                                   # ScalableViT-S, batch 1, 224
    python benchmarks/linear_kernels.py --batch 8 --threads 2 --json kernels.json
    python benchmarks/linear_kernels.py --model scalable_vit_small --model-args '{"depths": [1, 1, 2, 1]}'

For every distinct (rows, in, out) shape that a forward pass of ``--batch`` images gives the model's ``nn.Linear``
layers, the product with bias is timed on three kernels (``scalablevit.inference.linear_kernel_times``, best of 5
runs of a few milliseconds each): ``eager`` (``F.linear``), ``mkl`` (MKL on a weight pre-packed for it, what
Inductor's frozen graph calls) and ``onednn`` (oneDNN on a weight pre-packed for it). The table gives each kernel's
GFLOP/s, the kernel ``linear_kernel='auto'`` picks (oneDNN where it is at least 5% faster than MKL), and a last row
with the milliseconds per forward pass that all Linear layers take on each kernel and on the pick. The
whole-model effect is ``throughput.py --impl optimized`` with ``--linear-kernel auto`` against ``mkl``.
"""
import argparse
import json
import os
import platform
import sys
from collections import Counter
from pathlib import Path
from typing import Dict, List, Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without installing

import throughput  # noqa: E402  (benchmarks/throughput.py, beside this file: its Markdown table)
import timm  # noqa: E402

import scalablevit  # noqa: E402,F401  (registers the models)
from scalablevit.inference import faster_on_onednn, linear_kernel_times, linear_rows  # noqa: E402

KERNELS = ('eager', 'mkl', 'onednn')


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser('fp32 Linear kernels on a model\'s shapes', add_help=True)
    parser.add_argument('--model', default='scalable_vit_small', help='a timm model name')
    parser.add_argument('--model-args', type=json.loads, default={},
                        help='JSON dict of constructor overrides, e.g. \'{"depths": [1, 1, 2, 1]}\'')
    parser.add_argument('--batch', type=int, default=1)
    parser.add_argument('--img-size', type=int, default=224)
    parser.add_argument('--threads', type=int, default=None, help='torch CPU threads (default: torch default)')
    parser.add_argument('--json', default=None, help='also write the rows as JSON to this path')
    return parser


def shape_rows(model: torch.nn.Module, batch: int, img_size: int) -> List[Dict]:
    """One row per distinct Linear shape of a forward pass: rows, in, out, how many layers, each kernel's seconds,
    and the pick of ``linear_kernel='auto'``."""
    shapes = Counter((r, m.in_features, m.out_features)
                     for m, r in linear_rows(model, torch.randn(batch, 3, img_size, img_size)).items())
    out = []
    for (rows, k, n), layers in sorted(shapes.items(), key=lambda item: -item[0][0] * item[0][1] * item[0][2]):
        seconds = linear_kernel_times(rows, k, n, KERNELS)
        out.append(dict(rows=rows, in_features=k, out_features=n, layers=layers, gflop=2e-9 * rows * k * n,
                        seconds=seconds, auto='onednn' if faster_on_onednn(rows, k, n) else 'mkl'))
    return out


def format_table(rows: List[Dict]) -> str:
    cols = ['rows x in x out', 'layers', *(f'{k} GFLOP/s' for k in KERNELS), 'auto picks']
    lines = [[f"{r['rows']} x {r['in_features']} x {r['out_features']}", str(r['layers']),
              *(f"{r['gflop'] / r['seconds'][k]:.1f}" for k in KERNELS), r['auto']] for r in rows]
    total = {k: 1e3 * sum(r['layers'] * r['seconds'][k] for r in rows) for k in KERNELS}
    picked = 1e3 * sum(r['layers'] * r['seconds'][r['auto']] for r in rows)
    lines.append(['all Linear layers, ms per pass', str(sum(r['layers'] for r in rows)),
                  *(f'{total[k]:.2f} ms' for k in KERNELS), f'{picked:.2f} ms'])
    return throughput._markdown(cols, lines)


def main(argv: Sequence[str] = None) -> List[Dict]:
    args = get_args_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not (torch._C.has_mkl and torch.backends.mkldnn.is_available()):
        raise SystemExit('linear_kernels.py: this torch build lacks MKL or oneDNN (nothing to compare)')
    try:
        model = timm.create_model(args.model, **args.model_args).eval()
    except RuntimeError as e:  # timm's "Unknown model"
        raise SystemExit(f'linear_kernels.py: {e}') from None
    rows = shape_rows(model, args.batch, args.img_size)
    if not rows:
        raise SystemExit(f'linear_kernels.py: {args.model} has no fp32 nn.Linear layers on CPU')
    load = ' '.join(f'{v:.2f}' for v in os.getloadavg())
    print(f'{args.model} batch {args.batch} at {args.img_size}, fp32, {torch.get_num_threads()} threads, torch '
          f'{torch.__version__}, {platform.processor() or platform.machine()}, load average {load}\n')
    print(format_table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(dict(model=args.model, batch=args.batch, img_size=args.img_size,
                                                   threads=torch.get_num_threads(), rows=rows), indent=1))
    return rows


if __name__ == '__main__':
    main()
