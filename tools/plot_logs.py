"""Training curves of one or several runs, as one PNG: classification, detection and segmentation alike.

    python tools/plot_logs.py classification/digits --out docs/digits_curves.png
    python tools/plot_logs.py work_dirs/retinanet_a work_dirs/retinanet_b --labels lr1e-4 lr2e-4 --out cmp.png

A RUN is a classification output folder (its ``log.txt``: one JSON line per epoch, written by ``main.py``), an
mmengine work dir (every ``<timestamp>/vis_data/scalars.json`` under it, in time order, so a resumed run is one
curve), or one of those files. Panels:

* classification, per epoch: loss (train solid, val dashed), learning rate, top-1 and top-5 (EMA dotted, if logged);
* mmdet / mmseg: the total loss, each loss term (``loss_cls``, ``decode.loss_ce``, ...) and the learning rate per
  iteration, and the validation metrics (``coco/bbox_mAP``, ``coco/segm_mAP``, ``mIoU``, ``mAcc``, ``aAcc``) per
  epoch or per iteration, whichever the run validated by.

Each run has one colour in every panel. ``--keys`` picks other logged scalars by name; ``--smooth N`` averages
noisy per-iteration curves over N points.
"""
import argparse
import glob
import json
import math
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

CLS_LOG = 'log.txt'
MM_LOG = 'scalars.json'
# validation metrics drawn by default: the headline COCO numbers and mmseg's three
DEFAULT_METRICS = re.compile(r'^(?:.*/)?(?:bbox_mAP|segm_mAP|mIoU|mAcc|aAcc)$')
NOT_METRICS = {'step', 'epoch', 'iter', 'time', 'data_time', 'memory', 'lr', 'base_lr'}


class LogError(RuntimeError):
    """A run without logs, or a log that is not what the trainers write; reported in one line."""


@dataclass
class Curve:
    run: int  # index of the run: its colour
    name: str  # legend text after the run label ('' for the run's only curve in a panel)
    x: List[float]
    y: List[float]
    style: str = '-'


@dataclass
class Panel:
    title: str
    xlabel: str
    curves: List[Curve] = field(default_factory=list)
    log_y: bool = False


# ---------------------------------------------------------------------------------------------------------------------
# Reading

def _read_json_lines(path: str) -> List[dict]:
    rows = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise LogError(f'{path} line {n} is not JSON ({e.msg}); is it a log.txt or scalars.json?') from e
            if not isinstance(row, dict):
                raise LogError(f'{path} line {n} is not a JSON object')
            rows.append(row)
    if not rows:
        raise LogError(f'{path} is empty: the run has not logged anything yet')
    return rows


def find_logs(run: str) -> Tuple[str, List[str]]:
    """('classification' | 'mmengine', files) of a RUN argument."""
    if os.path.isfile(run):
        return ('mmengine' if run.endswith('.json') else 'classification'), [run]
    if not os.path.isdir(run):
        raise LogError(f'{run}: no such file or folder')
    if os.path.isfile(os.path.join(run, CLS_LOG)):
        return 'classification', [os.path.join(run, CLS_LOG)]
    files = sorted(glob.glob(os.path.join(glob.escape(run), '**', 'vis_data', MM_LOG), recursive=True))
    if not files:
        raise LogError(f'{run}: no {CLS_LOG} (classification/main.py) nor */vis_data/{MM_LOG} (mmengine work dir) '
                       f'in it')
    return 'mmengine', files  # <timestamp>/vis_data/scalars.json: sorted names are time order


def _series(rows: Sequence[dict], key: str, x_key: str) -> Tuple[List[float], List[float]]:
    """(x, y) of ``key``; a repeated x (a resumed run logging a step again) keeps its last value."""
    points = {}
    for r in rows:
        value = r.get(key)
        if x_key in r and isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            points[float(r[x_key])] = float(value)
    xs = sorted(points)
    return xs, [points[x] for x in xs]


def _smooth(y: List[float], n: int) -> List[float]:
    if n <= 1:
        return y
    out, total = [], 0.0
    for i, v in enumerate(y):
        total += v
        if i >= n:
            total -= y[i - n]
        out.append(total / min(i + 1, n))
    return out


def classification_panels(rows: Sequence[dict], run: int, keys: Sequence[str]) -> List[Panel]:
    if not any('epoch' in r for r in rows):
        raise LogError('no "epoch" in the lines of a classification log.txt')
    layout = [
        ('loss', [('train_loss', 'train', '-'), ('test_loss', 'val', '--')]),
        ('learning rate', [('train_lr', '', '-')]),
        ('top-1 (%)', [('test_acc1', '', '-'), ('test_ema_acc1', 'EMA', ':')]),
        ('top-5 (%)', [('test_acc5', '', '-'), ('test_ema_acc5', 'EMA', ':')]),
    ]
    if keys:
        layout = [(k, [(k, '', '-')]) for k in keys]
    panels = []
    for title, entries in layout:
        panel = Panel(title, 'epoch', log_y=title == 'learning rate')
        for key, name, style in entries:
            x, y = _series(rows, key, 'epoch')
            if x:
                panel.curves.append(Curve(run, name, x, y, style))
        if panel.curves:
            panels.append(panel)
    return panels


def _is_loss(key: str) -> bool:
    """mmdet's ``loss``, ``loss_cls``, ``loss_rpn_bbox``; mmseg's ``decode.loss_ce``, ``aux.loss_ce``."""
    return key.split('.')[-1].startswith('loss')


def mmengine_panels(rows: Sequence[dict], run: int, keys: Sequence[str], smooth: int) -> List[Panel]:
    train = [r for r in rows if 'lr' in r or any(_is_loss(k) for k in r)]
    val = [r for r in rows if not ('lr' in r or any(_is_loss(k) for k in r))]
    by_epoch = any('epoch' in r for r in train)  # EpochBasedTrainLoop logs the epoch; validation steps are epochs
    val_x = 'epoch' if by_epoch else 'iteration'
    panels = []
    if keys:
        for key in keys:
            source = train if any(key in r for r in train) else val
            x, y = _series(source, key, 'step')
            if x:
                xlabel = 'iteration' if source is train else val_x
                panels.append(Panel(key, xlabel, [Curve(run, '', x, _smooth(y, smooth) if source is train else y)]))
        return panels
    losses = sorted({k for r in train for k in r if _is_loss(k)}, key=lambda k: (k != 'loss', k))
    for key in losses:
        x, y = _series(train, key, 'step')
        if x:
            panels.append(Panel(key, 'iteration', [Curve(run, '', x, _smooth(y, smooth))]))
    x, y = _series(train, 'lr', 'step')
    if x:
        panels.append(Panel('learning rate', 'iteration', [Curve(run, '', x, y)], log_y=True))
    metrics = sorted({k for r in val for k in r if k not in NOT_METRICS and DEFAULT_METRICS.match(k)})
    for key in metrics:
        x, y = _series(val, key, 'step')
        if x:
            panels.append(Panel(key, val_x, [Curve(run, '', x, y, '-')]))
    return panels


def read_run(path: str, run: int, keys: Sequence[str] = (), smooth: int = 1) -> List[Panel]:
    kind, files = find_logs(path)
    rows = [row for f in files for row in _read_json_lines(f)]
    panels = classification_panels(rows, run, keys) if kind == 'classification' else \
        mmengine_panels(rows, run, keys, smooth)
    if not panels:
        wanted = ', '.join(keys) if keys else 'losses, learning rate or metrics'
        raise LogError(f'{path}: the log has no {wanted} to plot')
    return panels


def merge(per_run: Sequence[List[Panel]]) -> List[Panel]:
    """One panel per (title, x axis), in first-seen order, holding every run's curves."""
    merged: Dict[Tuple[str, str], Panel] = {}
    for panels in per_run:
        for p in panels:
            target = merged.setdefault((p.title, p.xlabel), Panel(p.title, p.xlabel, log_y=p.log_y))
            target.curves += p.curves
    return list(merged.values())


# ---------------------------------------------------------------------------------------------------------------------
# Drawing

def draw(panels: Sequence[Panel], labels: Sequence[str], out: str, title: Optional[str] = None, dpi: int = 110):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    cols = min(len(panels), 3 if len(panels) != 4 else 2)
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.4 * rows), squeeze=False)
    colors = plt.rcParams['axes.prop_cycle'].by_key()['color']
    for ax, panel in zip(axes.flat, panels):
        for c in panel.curves:
            name = labels[c.run] + (f' {c.name}' if c.name else '')
            marker = 'o' if len(c.x) <= 30 else None
            ax.plot(c.x, c.y, c.style, color=colors[c.run % len(colors)], label=name, marker=marker, markersize=3)
        ax.set_title(panel.title)
        ax.set_xlabel(panel.xlabel)
        if panel.log_y and all(v > 0 for c in panel.curves for v in c.y):
            ax.set_yscale('log')
        ax.grid(True, alpha=0.3)
        if len(panel.curves) > 1:
            ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    folder = os.path.dirname(os.path.abspath(out))
    os.makedirs(folder, exist_ok=True)
    fig.savefig(out, dpi=dpi)
    plt.close(fig)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser('Plot training curves', add_help=False)
    parser.add_argument('runs', nargs='+', metavar='RUN',
                        help='classification output folder or log.txt; mmengine work dir or scalars.json')
    parser.add_argument('--out', default='curves.png', help='PNG to write (default: curves.png)')
    parser.add_argument('--labels', nargs='+', default=None, help='legend name of each run (default: folder names)')
    parser.add_argument('--keys', nargs='+', default=(), help='plot these logged scalars instead of the defaults')
    parser.add_argument('--smooth', default=1, type=int, help='moving average over N points of per-iteration curves')
    parser.add_argument('--title', default=None)
    return parser


def _default_label(path: str) -> str:
    path = os.path.abspath(path)
    if os.path.isfile(path):
        parent = os.path.dirname(path)
        if os.path.basename(parent) == 'vis_data':  # work_dir/<timestamp>/vis_data/scalars.json
            parent = os.path.dirname(os.path.dirname(parent))
        return os.path.basename(parent)
    return os.path.basename(path.rstrip(os.sep))


def cli(argv=None) -> int:
    parser = argparse.ArgumentParser('Plot training curves', parents=[get_args_parser()],
                                     description=__doc__.split('\n\n')[0])
    args = parser.parse_args(argv)
    try:
        if args.labels is not None and len(args.labels) != len(args.runs):
            raise LogError(f'{len(args.labels)} --labels for {len(args.runs)} runs')
        if not args.out.lower().endswith('.png'):
            raise LogError(f'--out {args.out}: name a .png file')
        labels = args.labels or [_default_label(r) for r in args.runs]
        panels = merge([read_run(r, i, args.keys, args.smooth) for i, r in enumerate(args.runs)])
        draw(panels, labels, args.out, args.title)
    except (LogError, OSError) as e:
        print(f'error: {e}', file=sys.stderr)
        return 1
    print(f'wrote {args.out}: {", ".join(p.title for p in panels)} for {", ".join(labels)}')
    return 0


if __name__ == '__main__':
    sys.exit(cli())
