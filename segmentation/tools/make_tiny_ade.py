"""Write a tiny data set in ADE20K's layout, for trying the pipeline and for the tests.

    python tools/make_tiny_ade.py                      # -> data/tiny_ade/ADEChallengeData2016
    python tools/make_tiny_ade.py --out DIR --size 64 --train 16 --val 4

Layout (what mmseg's ``ADE20KDataset`` reads)::

    ADEChallengeData2016/images/{training,validation}/ADE_{train,val}_00000001.jpg
    ADEChallengeData2016/annotations/{training,validation}/ADE_{train,val}_00000001.png

Each image is a coloured background (ADE label 1, "wall") with random rectangles (3, "sky"), ellipses (5, "tree")
and triangles (13, "person"), each class in its own noisy colour, and a one-pixel border of label 0 ("other",
ignored with ``reduce_zero_label``). The labels after ``reduce_zero_label`` are 0, 2, 4 and 12.

``--shapes`` writes the scenes of the detection first run instead (``scalablevit.shapes``: 1-3 squares, discs and
triangles in random flat colours on blurred noise, so only a shape's outline tells its class), labelled 1
background, 2 square, 3 disc, 4 triangle (0..3 after ``reduce_zero_label``: :data:`SHAPES_CLASSES`)::

    python tools/make_tiny_ade.py --shapes --out data/shapes_ade --size 128 --train 400 --val 100
"""
import argparse
import os
import os.path as osp
import sys

import numpy as np
from PIL import Image, ImageDraw

sys.path.insert(0, osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))))  # the repository root
from scalablevit import shapes  # noqa: E402  (the scenes, shared with classification and detection)

# ADE label -> RGB colour of its pixels
CLASSES = {1: (120, 120, 120), 3: (40, 140, 230), 5: (30, 170, 40), 13: (220, 40, 60)}
SHAPES = ((3, 'rectangle'), (5, 'ellipse'), (13, 'triangle'))
SHAPES_CLASSES = ('background', *shapes.CLASSES)  # --shapes: the classes of labels 1..4


def make_sample(rng: np.random.Generator, size: int):
    """One (image HxWx3 uint8, label HxW uint8) pair."""
    label = Image.new('L', (size, size), 1)
    draw = ImageDraw.Draw(label)
    for cls, shape in SHAPES:
        for _ in range(rng.integers(1, 3)):
            w, h = rng.integers(size // 5, size // 2, size=2)
            x, y = rng.integers(0, size - w), rng.integers(0, size - h)
            box = [int(x), int(y), int(x + w), int(y + h)]
            if shape == 'rectangle':
                draw.rectangle(box, fill=cls)
            elif shape == 'ellipse':
                draw.ellipse(box, fill=cls)
            else:
                draw.polygon([(box[0], box[3]), (box[2], box[3]), ((box[0] + box[2]) // 2, box[1])], fill=cls)
    label = np.array(label)
    label[0, :] = label[-1, :] = label[:, 0] = label[:, -1] = 0
    palette = np.zeros((256, 3), np.float32)
    for cls, rgb in CLASSES.items():
        palette[cls] = rgb
    image = palette[label] + rng.normal(0, 12, (size, size, 3))
    return np.clip(image, 0, 255).astype(np.uint8), label


def make_shapes_sample(rng: np.random.Generator, size: int):
    """One scene of :mod:`scalablevit.shapes` and its labels, 1 + the index in :data:`SHAPES_CLASSES`."""
    image, objects = shapes.scene(rng, size)
    return image, shapes.label_map(size, objects) + 1


def make_tiny_ade(out: str, size: int = 64, num_train: int = 16, num_val: int = 4, seed: int = 0,
                  shape_scenes: bool = False) -> str:
    """Write the data set under ``out/ADEChallengeData2016`` (``shape_scenes``: the ``--shapes`` scenes); returns
    that folder. The val images come after the train images in one random stream: none is a train image."""
    rng = np.random.default_rng(seed)
    sample = make_shapes_sample if shape_scenes else make_sample
    root = osp.join(out, 'ADEChallengeData2016')
    for split, prefix, num in (('training', 'train', num_train), ('validation', 'val', num_val)):
        os.makedirs(osp.join(root, 'images', split), exist_ok=True)
        os.makedirs(osp.join(root, 'annotations', split), exist_ok=True)
        for i in range(1, num + 1):
            image, label = sample(rng, size)
            name = f'ADE_{prefix}_{i:08d}'
            Image.fromarray(image).save(osp.join(root, 'images', split, name + '.jpg'), quality=95)
            Image.fromarray(label).save(osp.join(root, 'annotations', split, name + '.png'))
    return root


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--out', default=osp.join(osp.dirname(osp.dirname(osp.abspath(__file__))), 'data', 'tiny_ade'))
    parser.add_argument('--size', type=int, default=64, help='image side in pixels')
    parser.add_argument('--train', type=int, default=16, help='number of training images')
    parser.add_argument('--val', type=int, default=4, help='number of validation images')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--shapes', action='store_true',
                        help='the shapes scenes of the first runs (classes: ' + ', '.join(SHAPES_CLASSES) + ')')
    args = parser.parse_args()
    root = make_tiny_ade(args.out, args.size, args.train, args.val, args.seed, args.shapes)
    print(f'wrote {args.train} training and {args.val} validation images ({args.size}x{args.size}) to {root}')


if __name__ == '__main__':
    main()
