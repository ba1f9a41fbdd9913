"""Can the data pipeline feed the GPU? Images/s per CPU core of classification/'s ImageNet training transform.

    python benchmarks/data_pipeline.py                                  # 64 JPEGs, 5 repeats
    python benchmarks/data_pipeline.py --model-rate 3867 11602          # worker cores per GPU for these rates
    python benchmarks/data_pipeline.py --throughput-json rows.json --json pipeline.json

What one DataLoader worker does per training image: ``classification/datasets.py``'s ``read_image`` (file read,
JPEG decode, RGB) and ``build_transform(True, args)`` with ``classification/main.py``'s default arguments (DeiT's
recipe: RandomResizedCrop to 224 bicubic, horizontal flip, RandAugment rand-m9-mstd0.5-inc1, ToTensor + Normalize,
RandomErasing 0.25; timm's ``create_transform`` leaves the 0.4 colour jitter out when an auto-augment policy is
set). The images are real photos: JPEGs at ImageNet's common sizes (500x375 and 375x500, quality 90) cut, flipped
and rescaled from scikit-learn's two sample photos (china.jpg and flower.jpg, 427x640) into a temporary folder.

Everything runs in this process with one torch thread (a worker is one core): the whole chain per image (images/s,
the median over repeats of a pass over all images), then a second pass per repeat that times each stage on its own:
decode, geometric (crop, flip), augment (RandAugment, colour), tensor (ToTensor, Normalize), erasing. Given a
model's training rate (``--model-rate``, or the training rows of a ``throughput.py`` / ``device_check.py`` JSON),
it prints how many worker cores per GPU it takes to feed it. The files are read back from the page cache.
"""
import argparse
import importlib.metadata
import json
import math
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Sequence, Tuple

import numpy as np
import PIL
import torch
from PIL import Image, features
from timm.data.transforms import MaybePILToTensor

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / 'classification'))  # main.py and datasets.py import their neighbours by name

import datasets as cls_datasets  # noqa: E402  (classification/datasets.py)
import main as cls_main  # noqa: E402  (classification/main.py)
import throughput  # noqa: E402  (benchmarks/throughput.py, beside this file)

SIZES = ((500, 375), (500, 375), (500, 375), (375, 500))  # (W, H): ImageNet's most common shapes, 3 : 1
STAGES = ('decode', 'geometric', 'augment', 'tensor', 'erasing', 'other')
STAGE_OF = {
    'RandomResizedCropAndInterpolation': 'geometric', 'RandomResizedCrop': 'geometric', 'Resize': 'geometric',
    'CenterCrop': 'geometric', 'RandomHorizontalFlip': 'geometric', 'RandomVerticalFlip': 'geometric',
    'RandAugment': 'augment', 'AutoAugment': 'augment', 'AugMixAugment': 'augment', 'ColorJitter': 'augment',
    'RandomGrayscale': 'augment', 'GaussianBlur': 'augment',
    'ToTensor': 'tensor', 'MaybeToTensor': 'tensor', 'PILToTensor': 'tensor', 'MaybePILToTensor': 'tensor',
    'ToNumpy': 'tensor', 'Normalize': 'tensor',
    'RandomErasing': 'erasing',
}


def train_transform(input_size: int) -> Callable:
    """classification/'s training transform with main.py's default arguments (ImageFolder data)."""
    args = cls_main.get_args_parser().parse_args(['--input-size', str(input_size)])
    return cls_datasets.build_transform(True, args)


def make_photos(folder: Path, count: int, quality: int = 90, subsampling: str = '4:2:0',
                seed: int = 0) -> List[Path]:
    """``count`` JPEGs cut from scikit-learn's two sample photos: a random crop of the target's aspect (70-100%
    of the largest), a random horizontal flip, a bicubic rescale to 500x375 or 375x500 (3 : 1), saved at
    ``quality`` with ``subsampling`` (chroma)."""
    from sklearn.datasets import load_sample_images
    sources = [Image.fromarray(a) for a in load_sample_images().images]
    rng = random.Random(seed)
    paths = []
    for i in range(count):
        src, (w, h) = sources[i % len(sources)], SIZES[i % len(SIZES)]
        scale = min(src.width / w, src.height / h) * rng.uniform(0.7, 1.0)
        cw, ch = round(w * scale), round(h * scale)
        x0, y0 = rng.randint(0, src.width - cw), rng.randint(0, src.height - ch)
        img = src.crop((x0, y0, x0 + cw, y0 + ch)).resize((w, h), Image.BICUBIC)
        if rng.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        path = folder / f'{i:04d}.jpg'
        img.save(path, quality=quality, subsampling=subsampling)
        paths.append(path)
    return paths


def time_whole(paths: Sequence[Path], transform: Callable) -> float:
    """Images/s of read + decode + transform over ``paths``, in one pass."""
    t = time.perf_counter()
    for p in paths:
        transform(cls_datasets.read_image(str(p)))
    return len(paths) / (time.perf_counter() - t)


def time_stages(paths: Sequence[Path], transform: Callable) -> Dict[str, float]:
    """Seconds per image in each stage (``STAGE_OF``), every transform of the chain timed on its own; and, off the
    chain, ``uint8_tensor``: the PIL-to-uint8-tensor step a worker does instead of the tensor stage and erasing
    when timm's GPU prefetcher normalises and erases (``use_prefetcher=True``), timed on the same image."""
    steps = [(STAGE_OF.get(type(t).__name__, 'other'), t) for t in getattr(transform, 'transforms', [transform])]
    to_uint8 = MaybePILToTensor()
    total = dict.fromkeys(STAGES + ('uint8_tensor',), 0.)
    for p in paths:
        t = time.perf_counter()
        x = cls_datasets.read_image(str(p))
        total['decode'] += time.perf_counter() - t
        uint8_done = False
        for stage, fn in steps:
            if stage == 'tensor' and not uint8_done:
                t = time.perf_counter()
                to_uint8(x)
                total['uint8_tensor'] += time.perf_counter() - t
                uint8_done = True
            t = time.perf_counter()
            x = fn(x)
            total[stage] += time.perf_counter() - t
    return {k: v / len(paths) for k, v in total.items()}


def model_rates(args: argparse.Namespace) -> List[Tuple[str, float]]:
    """(label, images/s) to feed: ``--model-rate`` values, then the training rows of ``--throughput-json`` (all
    its rows if it has no training row)."""
    rates = [(f'--model-rate {r:g}', r) for r in args.model_rate or []]
    if args.throughput_json:
        data = json.loads(Path(args.throughput_json).read_text())
        rows = data['throughput_rows'] if isinstance(data, dict) else data  # device_check.json or throughput.py's
        train = [r for r in rows if r.get('mode') == 'train'] or rows
        for r in train:
            compiled = ' compiled' if r.get('compiled') else ''
            rates.append((f'{r["model"]} {r["impl"]} {r["mode"]} {r["dtype"]}{compiled} batch {r["batch"]} '
                          f'({r.get("device", "?")})', float(r['img_per_s'])))
    return rates


def pillow_info() -> Dict:
    """Pillow's version, its JPEG library, and Pillow-SIMD's version if that is what is installed."""
    try:
        simd = importlib.metadata.version('Pillow-SIMD')
    except importlib.metadata.PackageNotFoundError:
        simd = None
    return dict(pillow=PIL.__version__, libjpeg_turbo=bool(features.check_feature('libjpeg_turbo')),
                libjpeg_version=features.version('jpg'), pillow_simd=simd)


def _load_average() -> List[float]:
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, 'getloadavg') else []


def _cpu_seconds() -> Tuple[float, float]:
    """(CPU seconds every process has used, from /proc/stat; this process's own): the difference over the timing
    is how many cores other processes took meanwhile. (0, own) where /proc/stat is missing."""
    own = sum(os.times()[:2])
    try:
        fields = Path('/proc/stat').read_text().split('\n', 1)[0].split()[1:]
    except OSError:
        return 0., own
    busy = sum(int(v) for i, v in enumerate(fields[:8]) if i not in (3, 4))  # all but idle and iowait
    return busy / os.sysconf('SC_CLK_TCK'), own


def describe_images(paths: Sequence[Path], args: argparse.Namespace) -> Dict:
    """Count per size, JPEG settings and file sizes of the made images."""
    kb = [p.stat().st_size / 1024 for p in paths]
    sizes: Dict[str, int] = {}
    for p in paths:
        with Image.open(p) as im:
            key = f'{im.width}x{im.height}'
        sizes[key] = sizes.get(key, 0) + 1
    return dict(count=len(paths), sizes=sizes, quality=args.quality, subsampling=args.subsampling,
                mean_kb=round(statistics.mean(kb), 1), min_kb=round(min(kb), 1), max_kb=round(max(kb), 1),
                source='sklearn.datasets.load_sample_images (china.jpg, flower.jpg)')


def run(args: argparse.Namespace) -> Dict:
    """Make the images, time the chain and its stages (one torch thread), and the worker counts."""
    load_start = _load_average()
    torch.set_num_threads(1)
    random.seed(0)
    torch.manual_seed(0)
    np.random.seed(0)
    transform = train_transform(args.input_size)
    with tempfile.TemporaryDirectory(prefix='data_pipeline_') as tmp:
        paths = make_photos(Path(tmp), args.images, args.quality, args.subsampling)
        images = describe_images(paths, args)
        time_whole(paths, transform)  # warm-up: page cache, PIL's and torch's first calls
        time_stages(paths[:4], transform)
        rates, stages = [], []
        (all0, own0), t0 = _cpu_seconds(), time.perf_counter()
        for _ in range(args.repeats):
            rates.append(time_whole(paths, transform))
            stages.append(time_stages(paths, transform))
        (all1, own1), wall = _cpu_seconds(), time.perf_counter() - t0
    others = max(0., (all1 - all0) - (own1 - own0)) / wall if all1 else None
    per_core = statistics.median(rates)
    stage_s = {k: statistics.median(s[k] for s in stages) for k in STAGES + ('uint8_tensor',)}
    uint8_s = stage_s.pop('uint8_tensor')
    stage_total = sum(stage_s.values())
    prefetcher_s = stage_total - stage_s['tensor'] - stage_s['erasing'] + uint8_s
    return dict(
        **pillow_info(), python=platform.python_version(), torch=torch.__version__,
        torch_threads=torch.get_num_threads(), cpu=platform.processor() or platform.machine(), host_cpus=os.cpu_count(),
        load_average_start=load_start, load_average_end=_load_average(),
        other_processes_cores=None if others is None else round(others, 2), images=images,
        input_size=args.input_size, transform=[type(t).__name__ for t in getattr(transform, 'transforms', [])],
        repeats=args.repeats, img_per_s_per_core=round(per_core, 2), img_per_s_per_repeat=[round(r, 2) for r in rates],
        ms_per_img=round(1e3 / per_core, 3), stage_ms={k: round(1e3 * v, 3) for k, v in stage_s.items()},
        stage_share={k: round(v / stage_total, 4) for k, v in stage_s.items()},
        uint8_tensor_ms=round(1e3 * uint8_s, 3), prefetcher_img_per_s_per_core=round(1 / prefetcher_s, 2),
        deit_10_workers_img_per_s=round(10 * per_core, 1),
        workers=[dict(label=label, img_per_s=rate, workers_per_gpu=math.ceil(rate / per_core))
                 for label, rate in model_rates(args)],
    )


def report(res: Dict) -> str:
    """The printed result: versions, images, the per-core rate with the stage shares, the worker counts."""
    im = res['images']
    lines = [f'Pillow {res["pillow"]} (libjpeg-turbo: {"yes" if res["libjpeg_turbo"] else "no"}, libjpeg '
             f'{res["libjpeg_version"]}), torch {res["torch"]}, {res["torch_threads"]} torch thread, '
             f'{res["host_cpus"]} CPUs ({res["cpu"]}), load average {res["load_average_start"]} at the start, '
             f'{res["load_average_end"]} at the end; other processes used {res["other_processes_cores"]} cores '
             f'during the timing',
             f'{im["count"]} JPEGs ({", ".join(f"{n} x {k}" for k, n in im["sizes"].items())}, quality '
             f'{im["quality"]}, chroma {im["subsampling"]}, {im["mean_kb"]} KB mean, {im["min_kb"]}-{im["max_kb"]} '
             f'KB) from {im["source"]}',
             f'transform ({res["input_size"]} px): read_image -> {" -> ".join(res["transform"])}', '']
    if res['pillow_simd']:
        lines.insert(1, f'--pil-simd: Pillow-SIMD {res["pillow_simd"]} is installed')
    cols = ['images/s per core', 'range', 'ms/image', *[f'{s} %' for s in STAGES], 'repeats']
    rates = res['img_per_s_per_repeat']
    cells = [f'{res["img_per_s_per_core"]:.1f}', f'{min(rates):.0f}-{max(rates):.0f}', f'{res["ms_per_img"]:.2f}',
             *[f'{100 * res["stage_share"][s]:.1f}' for s in STAGES], str(res['repeats'])]
    lines.append(throughput._markdown(cols, [cells]))
    lines += ['', 'ms per image by stage: ' + ', '.join(f'{s} {res["stage_ms"][s]:.2f}' for s in STAGES),
              f'with timm\'s GPU prefetcher (the worker stops at a uint8 tensor, {res["uint8_tensor_ms"]:.2f} ms; '
              f'Normalize and RandomErasing on the GPU): {res["prefetcher_img_per_s_per_core"]:.1f} images/s per core '
              f'(from the stage times)',
              f'DeiT\'s 10 workers per GPU feed {res["deit_10_workers_img_per_s"]:.0f} images/s']
    if res['workers']:
        lines += ['', throughput._markdown(['model rate', 'images/s', 'worker cores per GPU'],
                                           [[w['label'], f'{w["img_per_s"]:.1f}', str(w['workers_per_gpu'])]
                                            for w in res['workers']])]
    return '\n'.join(lines)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description='Images/s per CPU core of the ImageNet training transform '
                                                 '(see the module docstring).')
    parser.add_argument('--images', type=int, default=64, help='JPEGs to make and time (default 64)')
    parser.add_argument('--repeats', type=int, default=5, help='passes over the images; the median is shown')
    parser.add_argument('--quality', type=int, default=90, help='JPEG quality of the made images (default 90)')
    parser.add_argument('--subsampling', default='4:2:0', choices=['4:2:0', '4:2:2', '4:4:4'],
                        help="their chroma subsampling (default 4:2:0, Pillow's default at quality 90)")
    parser.add_argument('--input-size', type=int, default=224, help="main.py's default for ImageFolder data")
    parser.add_argument('--model-rate', type=float, nargs='+', default=None, metavar='IMG_PER_S',
                        help='training rates (images/s per GPU) to give the worker count for')
    parser.add_argument('--throughput-json', default=None,
                        help='rates from the training rows of a throughput.py --json file or a device_check.json')
    parser.add_argument('--json', default=None, help='also write the result to this JSON file')
    return parser


def main(argv: Sequence[str] = None) -> Dict:
    args = get_args_parser().parse_args(argv)
    if args.images < 1 or args.repeats < 1:
        raise SystemExit('data_pipeline: --images and --repeats must be at least 1')
    res = run(args)
    print(report(res))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(res, indent=1))
    return res


if __name__ == '__main__':
    main()
