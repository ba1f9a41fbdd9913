"""The ImageFolder training data path under load: the default training transform (RandAugment
``rand-m9-mstd0.5-inc1``, random erasing, bicubic random resized crops) on real image files of every common mode and
odd sizes, thousands of times with fixed seeds, and every RandAugment op at every magnitude once.

Guards the released augmentation on today's Pillow: ``rand-m9-mstd0.5-inc1`` draws 0 posterize bits about once in
650 images, which recent Pillow (13) rejects (``classification/datasets.py: posterize``).
"""
import argparse
import copy
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

REPO = Path(__file__).resolve().parents[1]
CLS_DIR = REPO / 'classification'

# (mode, size, format): what ImageNet-like folders hold, converted to RGB by the loader
IMAGES = [('RGB', (200, 150), 'JPEG'), ('L', (64, 64), 'JPEG'), ('CMYK', (120, 90), 'JPEG'),
          ('RGBA', (40, 300), 'PNG'), ('P', (33, 17), 'PNG'), ('LA', (200, 150), 'PNG'), ('I;16', (48, 48), 'PNG'),
          ('RGB', (13, 7), 'PNG'), ('1', (96, 80), 'PNG')]


def make_images(root: Path):
    """Real encoded files: photo-like noise with edges, in each mode of ``IMAGES``, two classes."""
    rng = np.random.default_rng(0)
    for i, (mode, (w, h), fmt) in enumerate(IMAGES):
        rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        rgb[: h // 2] //= 3  # a dark half: equalize/autocontrast have something to do
        img = Image.fromarray(rgb, 'RGB')
        if mode == 'P':
            img = img.quantize(16)
            img.info['transparency'] = 0
        elif mode == 'I;16':
            img = Image.fromarray((rng.integers(0, 65536, (h, w))).astype(np.uint16))
        else:
            img = img.convert(mode)
        d = root / 'train' / f'class{i % 2}'
        d.mkdir(parents=True, exist_ok=True)
        img.save(d / f'img{i}.{"jpg" if fmt == "JPEG" else "png"}', fmt)
    return root


def default_args(cls, data_path):
    args = argparse.ArgumentParser(parents=[cls.get_args_parser()]).parse_args(['--data-path', str(data_path)])
    cls.check_args(args)  # fills in the default input size (224)
    return args


def test_posterize_keeps_the_released_behaviour(cls):
    datasets = sys.modules['datasets']
    img = Image.fromarray(np.arange(256, dtype=np.uint8).reshape(16, 16).repeat(3).reshape(16, 16, 3))
    black = datasets.posterize(img, 0)
    assert black.mode == 'RGB' and black.size == img.size and not np.asarray(black).any()
    for bits in range(1, 8):  # unchanged elsewhere
        assert np.array_equal(np.asarray(datasets.posterize(img, bits)), np.asarray(ImageOps.posterize(img, bits)))
    assert datasets.posterize(img, 8) is img


def test_every_randaugment_op_at_every_magnitude(cls, tmp_path):
    datasets = sys.modules['datasets']
    transform = datasets.build_transform(True, default_args(cls, tmp_path))
    ra = next(t for t in transform.transforms if type(t).__name__ == 'RandAugment')
    assert len(ra.ops) == 15 and any('Posterize' in op.name for op in ra.ops)
    img = Image.open(make_images(tmp_path) / 'train' / 'class0' / 'img0.jpg').convert('RGB').resize((64, 48))
    random.seed(0)
    for op in ra.ops:
        for magnitude in range(11):  # timm's levels 0..10; 10 is where PosterizeIncreasing keeps 0 bits
            fixed = copy.copy(op)
            fixed.prob, fixed.magnitude, fixed.magnitude_std = 1.0, magnitude, 0
            out = fixed(img)
            assert isinstance(out, Image.Image) and out.mode == 'RGB' and out.size == img.size, (op.name, magnitude)
    posterize = next(op for op in ra.ops if op.name == 'PosterizeIncreasing')
    fixed = copy.copy(posterize)
    fixed.prob, fixed.magnitude, fixed.magnitude_std = 1.0, 10, 0
    assert not np.asarray(fixed(img)).any()  # 0 bits: all black, as the released recipe trained


@pytest.mark.slow
def test_training_transform_soak(cls, tmp_path):
    """The data set as training reads it (file -> RGB -> default training transform), 3,000 samples."""
    datasets = sys.modules['datasets']
    make_images(tmp_path)
    dataset, num_classes = datasets.build_dataset(True, default_args(cls, tmp_path))
    assert len(dataset) == len(IMAGES) and num_classes == 2
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for seed in range(3):
            random.seed(seed)
            np.random.seed(seed)
            torch.manual_seed(seed)
            for i in range(1000):
                x, y = dataset[i % len(dataset)]
                assert x.shape == (3, 224, 224) and x.dtype == torch.float32 and y in (0, 1)
                assert torch.isfinite(x).all()
    finally:
        torch.set_num_threads(threads)
