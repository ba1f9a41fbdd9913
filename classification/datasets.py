"""Data sets and transforms: ImageNet-style ImageFolder (``IMNET``) and the built-in sets (:data:`BUILT_IN`): ``DIGITS``
(the first run) and ``SHAPES`` (the pretraining of the detection and segmentation first runs)."""
import argparse
import os
from typing import Any, Callable, Dict, Optional, Tuple

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform
from timm.data.auto_augment import posterize as timm_posterize
from torch.utils.data import Dataset
from torchvision import datasets, transforms
from torchvision.transforms import v2

from scalablevit import shapes
from scalablevit.errors import UserError

# isort: split
from utils import plain

DATA_SETS = ('IMNET', 'DIGITS', 'SHAPES')


def read_image(path: str) -> Image.Image:
    """PIL RGB image; an unreadable file is an error naming it (module level, so worker processes can pickle it)."""
    try:
        with open(path, 'rb') as f:
            img = Image.open(f)
            return img.convert('RGB')
    except UnidentifiedImageError as e:
        raise UserError(f'cannot read image {path}: not an image file PIL can open (corrupt, truncated or another '
                         f'format); remove or replace it') from e
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise UserError(f'cannot read image {path}: {e}; remove or replace it') from e


def _image_folder(root: str, split: str, transform: Callable) -> datasets.ImageFolder:
    expected = f'expected {root}/{split}/<class>/<image> (the ImageFolder layout: one sub-folder per class)'
    if not os.path.isdir(root):
        raise UserError(f'--data-path {root} is not a folder; {expected}')
    path = os.path.join(root, split)
    if not os.path.isdir(path):
        raise UserError(f'{path} not found; {expected}')
    try:
        return datasets.ImageFolder(path, transform=transform, loader=read_image)
    except FileNotFoundError as e:
        raise UserError(f'{path}: {e}; {expected}') from e


def build_dataset(is_train: bool, args: argparse.Namespace) -> Tuple[Dataset, int]:
    """The train or val split of ``args.data_set`` and its number of classes."""
    if args.data_set in BUILT_IN:
        dataset = BUILT_IN[args.data_set](is_train, args.input_size)
        return dataset, dataset.num_classes
    if args.data_set == 'IMNET':
        if args.data_path is None:
            raise UserError('--data-path is required for --data-set IMNET (a folder with train/ and val/)')
        dataset = _image_folder(args.data_path, 'train' if is_train else 'val', build_transform(is_train, args))
        if not is_train:  # the labels of val must mean what they mean in train
            train_dir = os.path.join(args.data_path, 'train')
            if os.path.isdir(train_dir):
                train_classes = sorted(e.name for e in os.scandir(train_dir) if e.is_dir())
                if train_classes != dataset.classes:
                    only_train = sorted(set(train_classes) - set(dataset.classes))[:5]
                    only_val = sorted(set(dataset.classes) - set(train_classes))[:5]
                    raise UserError(f'class folders of {args.data_path}/train and /val differ '
                                     f'(only in train: {only_train}, only in val: {only_val})')
        return dataset, len(dataset.classes)
    raise UserError(f'unknown --data-set {args.data_set!r}; choose from {", ".join(DATA_SETS)}')


def posterize(img: Image.Image, bits_to_keep: int, **__) -> Image.Image:
    """timm's RandAugment ``Posterize`` op, with 0 bits giving an all-black image (the released recipe's behaviour).

    ``rand-m9-mstd0.5-inc1`` draws 0 bits when the noisy magnitude reaches 10 (about 1 image in 650); Pillow 13
    raises ``ValueError`` for 0 bits, so that case is answered here and the others go to Pillow. The patch is
    listed in ``scalablevit.upstream``.
    """
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return img.point([0] * 256 * len(img.getbands()))  # every bit masked: black
    return ImageOps.posterize(img, bits_to_keep)


def _use_released_posterize(transform: Callable) -> Callable:
    """Swap timm's posterize for :func:`posterize` in the (Rand/Auto/AugMix) augmentation ops of ``transform``."""
    for t in getattr(transform, 'transforms', [transform]):
        ops = list(getattr(t, 'ops', []))
        for sub_policy in getattr(t, 'policy', []):  # AutoAugment: a list of [op, op] sub-policies
            ops.extend(sub_policy)
        for op in ops:
            if getattr(op, 'aug_fn', None) is timm_posterize:
                op.aug_fn = posterize
    return transform


def build_transform(is_train: bool, args: argparse.Namespace) -> Callable:
    """DeiT's transforms: timm's RandAugment / color jitter / random erasing pipeline for training, with random
    resized crops to ``input_size`` for every size (DeiT's pad-and-crop branch for inputs <= 32 is not kept: it
    assumed 32x32 CIFAR images); for evaluation the recorded preprocessing (:func:`eval_pretrained_cfg`)."""
    if is_train:
        aa = None if args.aa in (None, '', 'none') else args.aa
        transform = create_transform(
            input_size=args.input_size,
            is_training=True,
            color_jitter=args.color_jitter,
            auto_augment=aa,
            interpolation=args.train_interpolation,
            re_prob=args.reprob,
            re_mode=args.remode,
            re_count=args.recount,
        )
        return _use_released_posterize(transform)
    return build_eval_transform(eval_pretrained_cfg(args))


def eval_pretrained_cfg(args: argparse.Namespace) -> Dict[str, Any]:
    """The evaluation preprocessing of ``args``, in the keys of timm's ``pretrained_cfg``.

    Recorded in every checkpoint (``meta['pretrained_cfg']``) and turned into the transform by
    :func:`build_eval_transform`, so ``main.py --eval`` and ``predict.py`` preprocess alike. Plain types only.
    ImageFolder data: bicubic resize to ``input_size / eval_crop_ratio``, center crop, ImageNet mean/std (any
    size, also <= 32). The built-in sets: their ``eval_cfg``.
    """
    size = args.input_size
    if args.data_set in BUILT_IN:
        return BUILT_IN[args.data_set].eval_cfg(size)
    return dict(input_size=(3, size, size), interpolation='bicubic', crop_pct=float(args.eval_crop_ratio),
                crop_mode='center', mean=tuple(IMAGENET_DEFAULT_MEAN), std=tuple(IMAGENET_DEFAULT_STD))


def checkpoint_meta(args: argparse.Namespace, dataset: Dataset) -> Dict[str, Any]:
    """``ckpt['meta']``: what ``predict.py`` needs besides the weights (plain types, ``weights_only``-loadable):
    the timm model name and ``--model-kwargs``, the classes (ImageFolder folder names, '0'..'9' for DIGITS) and
    the evaluation preprocessing (:func:`eval_pretrained_cfg`)."""
    return dict(model=str(args.model), model_kwargs=plain(dict(args.model_kwargs)), num_classes=int(args.nb_classes),
                class_names=[str(c) for c in dataset.classes], pretrained_cfg=eval_pretrained_cfg(args))


def build_eval_transform(pretrained_cfg: Dict[str, Any]) -> Callable:
    """PIL image -> normalised tensor, from a ``pretrained_cfg`` dict (ours, or a timm model's): timm's eval
    transform (resize the short side to ``size / crop_pct``, ``crop_mode`` crop to ``size``, normalise)."""
    missing = [k for k in ('input_size', 'interpolation', 'crop_pct', 'mean', 'std') if k not in pretrained_cfg]
    if missing:
        raise UserError(f'preprocessing config lacks {", ".join(missing)}: {pretrained_cfg}')
    return create_transform(
        input_size=tuple(pretrained_cfg['input_size']),
        is_training=False,
        interpolation=pretrained_cfg['interpolation'],
        crop_pct=pretrained_cfg['crop_pct'],
        crop_mode=pretrained_cfg.get('crop_mode', 'center'),
        mean=tuple(pretrained_cfg['mean']),
        std=tuple(pretrained_cfg['std']),
    )


class DigitsDataset(Dataset):
    """scikit-learn's bundled handwritten digits (1797 real 8x8 scans, 10 classes, no download).

    Split 80/20 stratified with a fixed seed (1437 train, 360 val). Each scan is an 8x8 grayscale PIL image, ink
    bright on black (the 0..16 counts scaled to 0..255), converted to RGB and passed through the same eval
    transform as any image (:func:`eval_pretrained_cfg`: bilinear upsampling to ``input_size``, normalised to
    [-1, 1]), so a PNG of a digit given to ``predict.py`` is preprocessed exactly as here. Training adds a random
    shift (pad by 1/8 and crop); no flips (they change digits). ``--aa``/``--reprob``/``--color-jitter`` apply to
    ImageFolder data only; mixup/cutmix/label smoothing apply here too, so turn them off for a first run.
    """

    num_classes = 10
    classes = [str(i) for i in range(10)]

    def __init__(self, is_train: bool, input_size: int = 32, transform: Optional[Callable] = None):
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        digits = load_digits()
        idx_train, idx_val = train_test_split(
            list(range(len(digits.target))), test_size=0.2, random_state=0, stratify=digits.target)
        idx = idx_train if is_train else idx_val
        self.images = [self.to_image(digits.images[i]) for i in idx]
        self.targets = [int(digits.target[i]) for i in idx]
        if transform is None:
            transform = build_eval_transform(self.eval_cfg(input_size))
            if is_train:
                transform = transforms.Compose(
                    [transform, v2.RandomCrop(input_size, padding=input_size // 8, fill=-1.0)])
        self.transform = transform

    @staticmethod
    def eval_cfg(size: int) -> Dict[str, Any]:
        """Bilinear resize of the whole 8x8 image to ``size`` (no crop), mean/std 0.5."""
        return dict(input_size=(3, size, size), interpolation='bilinear', crop_pct=1.0, crop_mode='center',
                    mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))

    @staticmethod
    def to_image(counts) -> Image.Image:
        """An 8x8 array of ink counts (0..16) -> 8x8 grayscale PIL image, ink bright on black."""
        pixels = torch.as_tensor(counts, dtype=torch.float32).mul(255 / 16).round().clamp(0, 255)
        return Image.fromarray(pixels.to(torch.uint8).numpy())  # uint8 (8, 8): mode 'L'

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, int]:
        return self.transform(self.images[index].convert('RGB')), self.targets[index]


class ShapesDataset(Dataset):
    """Crops of the shapes scenes that the detection and segmentation first runs train on (:mod:`scalablevit.shapes`):
    one square, disc or triangle per 64x64 image, in a random flat colour on blurred noise, labelled by its outline.

    Drawn once when built, from fixed seeds (4,000 train images from seed 0, 1,000 val images from seed 1: never the
    same images). The shapes have the pixel size of those in the 128-pixel detection and segmentation scenes, and
    the images are normalised with ImageNet's mean/std in RGB, as mmdet's and mmseg's data preprocessors do, so a
    backbone trained here starts those runs on pixels it knows (README, "Pretraining that carries over"). Other
    ``--input-size`` values resize the 64x64 images; training adds horizontal and vertical flips, which keep the
    class.
    """

    num_classes = len(shapes.CLASSES)
    classes = list(shapes.CLASSES)
    image_size = 64
    sizes = dict(train=(4000, 0), val=(1000, 1))  # split: (images, seed)

    def __init__(self, is_train: bool, input_size: int = 64, transform: Optional[Callable] = None):
        num, seed = self.sizes['train' if is_train else 'val']
        rng = np.random.default_rng(seed)
        self.images, self.targets = [], []
        for _ in range(num):
            image, category = shapes.crop(rng, self.image_size)
            self.images.append(Image.fromarray(image))
            self.targets.append(category)
        if transform is None:
            transform = build_eval_transform(self.eval_cfg(input_size))
            if is_train:
                transform = transforms.Compose([transform, v2.RandomHorizontalFlip(), v2.RandomVerticalFlip()])
        self.transform = transform

    @staticmethod
    def eval_cfg(size: int) -> Dict[str, Any]:
        """Bilinear resize of the whole image to ``size`` (no crop), ImageNet mean/std."""
        return dict(input_size=(3, size, size), interpolation='bilinear', crop_pct=1.0, crop_mode='center',
                    mean=tuple(IMAGENET_DEFAULT_MEAN), std=tuple(IMAGENET_DEFAULT_STD))

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, int]:
        return self.transform(self.images[index]), self.targets[index]


# The built-in data sets: --data-set NAME, no --data-path; each has num_classes, classes and eval_cfg(input_size).
BUILT_IN = {'DIGITS': DigitsDataset, 'SHAPES': ShapesDataset}
