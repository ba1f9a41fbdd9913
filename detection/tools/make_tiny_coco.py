"""Write a tiny COCO-format instance dataset (shapes on noisy backgrounds) for trying detection/ without COCO.

    python tools/make_tiny_coco.py                      # -> data/tiny_coco/ (run inside detection/)
    python tools/make_tiny_coco.py --out /tmp/tiny_coco --num-train 16 --num-val 8 --size 128

Layout: COCO's (data/coco/), so every config reads it with ``--data-root OUT``::

    OUT/annotations/instances_train2017.json   OUT/train2017/000000.jpg ...
    OUT/annotations/instances_val2017.json     OUT/val2017/000000.jpg ...

Each image holds 1-3 non-overlapping objects of three categories (square, disc, triangle) in random flat colours on
blurred noise (the scenes of ``scalablevit.shapes``, which the segmentation and classification first runs share);
every object has a box and a polygon mask, ``iscrowd`` 0. The output depends only on ``--seed``; the val images come
after the train images in one random stream, so none is a train image.
"""
import argparse
import json
import logging
import os
import os.path as osp
import sys
from typing import Dict, List, Optional, Sequence

import numpy as np
from PIL import Image

sys.path.insert(0, osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))))  # the repository root
from scalablevit import shapes  # noqa: E402  (the scenes, shared with classification and segmentation)

_logger = logging.getLogger('make_tiny_coco')

CATEGORIES = [dict(id=i + 1, name=name) for i, name in enumerate(shapes.CLASSES)]  # square, disc, triangle


def _image(rng: np.random.Generator, size: int, image_id: int, first_ann_id: int):
    img, objects = shapes.scene(rng, size)
    anns = []
    for obj in objects:
        poly = obj.polygon
        x0, y0 = poly.min(0)
        x1, y1 = poly.max(0)
        x, y = poly[:, 0], poly[:, 1]
        area = float(abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))) / 2)  # the shoelace formula
        anns.append(dict(id=first_ann_id + len(anns), image_id=image_id, category_id=obj.category + 1, iscrowd=0,
                         bbox=[round(float(x0), 2), round(float(y0), 2), round(float(x1 - x0), 2),
                               round(float(y1 - y0), 2)],
                         area=round(area, 2), segmentation=[[round(float(v), 2) for v in poly.reshape(-1)]]))
    return img, anns


def make_split(out: str, split: str, num_images: int, size: int, rng: np.random.Generator) -> Dict:
    os.makedirs(osp.join(out, split), exist_ok=True)
    images: List[Dict] = []
    annotations: List[Dict] = []
    for i in range(num_images):
        img, anns = _image(rng, size, image_id=i + 1, first_ann_id=len(annotations) + 1)
        name = f'{i:06d}.jpg'
        Image.fromarray(img).save(osp.join(out, split, name), quality=95)
        images.append(dict(id=i + 1, file_name=name, height=size, width=size))
        annotations += anns
    coco = dict(info=dict(description=f'tiny shapes, {split}'), licenses=[], images=images,
                annotations=annotations, categories=CATEGORIES)
    os.makedirs(osp.join(out, 'annotations'), exist_ok=True)
    with open(osp.join(out, 'annotations', f'instances_{split}.json'), 'w') as f:  # split: train2017, val2017
        json.dump(coco, f)
    return coco


def make_tiny_coco(out: str, num_train: int = 16, num_val: int = 8, size: int = 128, seed: int = 0) -> str:
    """Write the dataset under ``out`` and return ``out``."""
    rng = np.random.default_rng(seed)
    for split, n in (('train2017', num_train), ('val2017', num_val)):
        coco = make_split(out, split, n, size, rng)
        _logger.info('%s: %d images, %d objects', osp.join(out, split), n, len(coco['annotations']))
    return out


def main(argv: Optional[Sequence[str]] = None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--out', default=osp.join('data', 'tiny_coco'), help='output folder (default: %(default)s)')
    parser.add_argument('--num-train', type=int, default=16)
    parser.add_argument('--num-val', type=int, default=8)
    parser.add_argument('--size', type=int, default=128, help='image side in pixels')
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format='%(message)s')
    make_tiny_coco(args.out, args.num_train, args.num_val, args.size, args.seed)


if __name__ == '__main__':
    main()
