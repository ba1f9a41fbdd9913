"""Scenes of flat shapes on noisy backgrounds: the built-in data of the first runs of all three tasks.

One generator, three views of it, so that a backbone pretrained on one task sees the same kind of pixels in the
next:

* classification: :func:`crop`, one shape per image, labelled by its category (``--data-set SHAPES`` of
  ``classification/``);
* detection: :func:`scene`, 1-3 shapes per image with their polygons (``detection/tools/make_tiny_coco.py`` writes
  boxes and polygon masks in COCO's format);
* segmentation: the same scenes, and :func:`label_map` their per-pixel classes (``segmentation/tools/make_tiny_ade.py
  --shapes`` writes them in ADE20K's layout).

Each shape is a square, a disc (a 24-gon) or a triangle of random size, position and rotation, in one random flat
colour, so only its outline tells its category; shapes do not overlap. The background is Gaussian noise
(mean 110, sd 25 per channel) blurred to a grain of a few pixels. Everything is drawn with NumPy and Pillow (no
OpenCV) and depends only on the generator passed in.
"""
import math
from dataclasses import dataclass
from typing import List, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

__all__ = ['CLASSES', 'Shape', 'background', 'crop', 'label_map', 'polygon', 'scene']

CLASSES = ('square', 'disc', 'triangle')
_CORNERS = (4, 24, 3)  # polygon corners of each class; the disc's 24 corners are not rotated


@dataclass
class Shape:
    """One drawn shape: its class index in :data:`CLASSES`, its outline and its colour."""
    category: int
    polygon: np.ndarray  # (K, 2) float x, y in pixels
    colour: Tuple[int, int, int]

    def vertices(self) -> List[Tuple[int, int]]:
        """The outline rounded to pixels, as drawn into the image and the label map."""
        return [(int(x), int(y)) for x, y in np.round(self.polygon)]


def polygon(category: int, cx: float, cy: float, r: float, angle: float) -> np.ndarray:
    """Outline of a shape of class ``category`` centred at (cx, cy) with circumradius ``r``: (K, 2) floats."""
    n = _CORNERS[category]
    phase = 0. if CLASSES[category] == 'disc' else angle
    t = phase + 2 * math.pi * np.arange(n) / n
    return np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], axis=1)


def background(rng: np.random.Generator, size: int) -> Image.Image:
    """A ``size`` x ``size`` RGB image of blurred Gaussian noise."""
    noise = rng.normal(110, 25, size=(size, size, 3)).clip(0, 255).astype(np.uint8)
    return Image.fromarray(noise).filter(ImageFilter.GaussianBlur(1))


def scene(rng: np.random.Generator, size: int, num_objects: Tuple[int, int] = (1, 3),
          radius: Tuple[float, float] = (0.12, 0.25)) -> Tuple[np.ndarray, List[Shape]]:
    """A scene: (``size`` x ``size`` x 3 uint8 RGB image, its shapes).

    Args:
        num_objects: fewest and most shapes (inclusive), drawn uniformly; a shape that finds no free place in 20
            tries is left out, so crowded scenes may hold fewer.
        radius: range of the circumradius as fractions of ``size``.
    """
    image = background(rng, size)
    draw = ImageDraw.Draw(image)
    shapes, taken = [], []
    for _ in range(int(rng.integers(num_objects[0], num_objects[1] + 1))):
        for _attempt in range(20):
            r = float(rng.uniform(*radius) * size)
            cx, cy = rng.uniform(r + 1, size - r - 1, size=2)
            if all(math.hypot(cx - x, cy - y) > r + q + 2 for x, y, q in taken):
                break
        else:
            continue
        taken.append((cx, cy, r))
        category = int(rng.integers(0, len(CLASSES)))
        shape = Shape(category, polygon(category, cx, cy, r, float(rng.uniform(0, math.pi))),
                      tuple(int(c) for c in rng.integers(0, 256, size=3)))
        draw.polygon(shape.vertices(), fill=shape.colour)
        shapes.append(shape)
    return np.asarray(image), shapes


def crop(rng: np.random.Generator, size: int) -> Tuple[np.ndarray, int]:
    """One shape filling a quarter to half of a ``size`` x ``size`` image: (RGB uint8 image, class index).

    At ``size`` 64 the shapes have the pixel size of those in a 128-pixel :func:`scene` (circumradius 15-29 vs
    15-32 pixels), so what a classifier learns here is at the scale the detectors and segmenters see.
    """
    image, shapes = scene(rng, size, num_objects=(1, 1), radius=(0.24, 0.45))
    return image, shapes[0].category


def label_map(size: int, shapes: Sequence[Shape]) -> np.ndarray:
    """Per-pixel classes of a scene, (``size``, ``size``) uint8: 0 on the background, ``category + 1`` on each shape,
    drawn with the same pixels as the image (:meth:`Shape.vertices`)."""
    label = Image.new('L', (size, size), 0)
    draw = ImageDraw.Draw(label)
    for shape in shapes:
        draw.polygon(shape.vertices(), fill=shape.category + 1)
    return np.asarray(label)
