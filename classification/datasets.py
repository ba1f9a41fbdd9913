"""Data sets and transforms: ImageNet-style ImageFolder (``IMNET``) and the built-in ``DIGITS`` first-run set."""
import argparse
import os
from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform
from torch.utils.data import Dataset
from torchvision import datasets, transforms
from torchvision.transforms import v2

# isort: split
from utils import UsageError

DATA_SETS = ('IMNET', 'DIGITS')


def read_image(path: str) -> Image.Image:
    """PIL RGB image; an unreadable file is an error naming it (module level, so worker processes can pickle it)."""
    try:
        with open(path, 'rb') as f:
            img = Image.open(f)
            return img.convert('RGB')
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise UsageError(f'cannot read image {path}: {e}') from e


def _image_folder(root: str, split: str, transform: Callable) -> datasets.ImageFolder:
    expected = f'expected {root}/{split}/<class>/<image> (the ImageFolder layout: one sub-folder per class)'
    if not os.path.isdir(root):
        raise UsageError(f'--data-path {root} is not a folder; {expected}')
    path = os.path.join(root, split)
    if not os.path.isdir(path):
        raise UsageError(f'{path} not found; {expected}')
    try:
        return datasets.ImageFolder(path, transform=transform, loader=read_image)
    except FileNotFoundError as e:
        raise UsageError(f'{path}: {e}; {expected}') from e


def build_dataset(is_train: bool, args: argparse.Namespace) -> Tuple[Dataset, int]:
    """The train or val split of ``args.data_set`` and its number of classes."""
    if args.data_set == 'DIGITS':
        dataset = DigitsDataset(is_train, args.input_size)
        return dataset, dataset.num_classes
    if args.data_set == 'IMNET':
        if args.data_path is None:
            raise UsageError('--data-path is required for --data-set IMNET (a folder with train/ and val/)')
        dataset = _image_folder(args.data_path, 'train' if is_train else 'val', build_transform(is_train, args))
        if not is_train:  # the labels of val must mean what they mean in train
            train_dir = os.path.join(args.data_path, 'train')
            if os.path.isdir(train_dir):
                train_classes = sorted(e.name for e in os.scandir(train_dir) if e.is_dir())
                if train_classes != dataset.classes:
                    only_train = sorted(set(train_classes) - set(dataset.classes))[:5]
                    only_val = sorted(set(dataset.classes) - set(train_classes))[:5]
                    raise UsageError(f'class folders of {args.data_path}/train and /val differ '
                                     f'(only in train: {only_train}, only in val: {only_val})')
        return dataset, len(dataset.classes)
    raise UsageError(f'unknown --data-set {args.data_set!r}; choose from {", ".join(DATA_SETS)}')


def build_transform(is_train: bool, args: argparse.Namespace) -> Callable:
    """DeiT's transforms: timm's RandAugment / color jitter / random erasing pipeline for training; resize to
    ``input_size / eval_crop_ratio`` (256 for 224) and center crop for evaluation; bicubic."""
    resize_im = args.input_size > 32
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
        if not resize_im:  # CIFAR-sized inputs: pad-and-crop instead of RandomResizedCrop
            transform.transforms[0] = transforms.RandomCrop(args.input_size, padding=4)
        return transform
    t = []
    if resize_im:
        size = int(args.input_size / args.eval_crop_ratio)
        t.append(transforms.Resize(size, interpolation=transforms.InterpolationMode.BICUBIC))
        t.append(transforms.CenterCrop(args.input_size))
    t += [transforms.ToTensor(), transforms.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)]
    return transforms.Compose(t)


class DigitsDataset(Dataset):
    """scikit-learn's bundled handwritten digits (1797 real 8x8 scans, 10 classes, no download).

    Split 80/20 stratified with a fixed seed (1437 train, 360 val), upsampled bilinearly to ``input_size`` and
    repeated to 3 channels, normalised to [-1, 1]. Training adds a random shift (pad by 1/8 and crop); no flips
    (they change digits). ``--aa``/``--reprob``/``--color-jitter`` apply to ImageFolder data only;
    mixup/cutmix/label smoothing apply here too, so turn them off for a first run.
    """

    num_classes = 10

    def __init__(self, is_train: bool, input_size: int = 32, transform: Optional[Callable] = None):
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        digits = load_digits()
        idx_train, idx_val = train_test_split(
            list(range(len(digits.target))), test_size=0.2, random_state=0, stratify=digits.target)
        idx = idx_train if is_train else idx_val
        images = torch.tensor(digits.images[idx], dtype=torch.float32).unsqueeze(1) / 16.0  # (N, 1, 8, 8)
        images = F.interpolate(images, size=(input_size, input_size), mode='bilinear', align_corners=False)
        self.images = (images.clamp(0, 1) - 0.5) / 0.5
        self.targets = torch.tensor(digits.target[idx], dtype=torch.long).tolist()
        if transform is None and is_train:
            transform = v2.RandomCrop(input_size, padding=input_size // 8, fill=-1.0)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, int]:
        img = self.images[index]
        if self.transform is not None:
            img = self.transform(img)
        return img.expand(3, -1, -1).contiguous(), self.targets[index]
