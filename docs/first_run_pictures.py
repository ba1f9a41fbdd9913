"""The README pictures of the first runs, put together from ``predict.py``'s own drawings (nothing is redrawn).

    # detection: predict.py's drawings of some held-out images, side by side
    python docs/first_run_pictures.py docs/detection_predict.png --vis detection/out/vis --names 000000.jpg ...
    # segmentation: each drawing under the ground truth, drawn the same way (the label PNG's colours over the image)
    python docs/first_run_pictures.py docs/segmentation_predict.png --vis segmentation/out/vis --names A.jpg ... \
        --labels segmentation/data/shapes/ADEChallengeData2016/annotations/validation \
        --config segmentation/configs/tiny/scalablevit-tiny_upernet_1xb8-1k_shapes-128x128.py

``--labels``: the label PNG of each image (same stem, ``.png``, ADE20K's values: class index + 1 under
``reduce_zero_label``) in the palette of ``--config``'s test data set, over the image at ``--opacity`` (predict.py's
default 0.5), as the row above predict.py's drawing. ``--scale`` enlarges every picture (nearest neighbour).
"""
import argparse
import os.path as osp
import sys
from typing import List, Sequence

import numpy as np
from PIL import Image, ImageDraw


def ground_truth(image: Image.Image, label_png: str, palette: Sequence[Sequence[int]], opacity: float) -> Image.Image:
    label = np.asarray(Image.open(label_png)).astype(int) - 1  # reduce_zero_label: 0 is ignored, 1..N the classes
    colours = np.asarray(palette, np.float32)[label.clip(0, len(palette) - 1)]
    rgb = np.asarray(image.convert('RGB'), np.float32)
    blend = np.where((label >= 0)[..., None], rgb * (1 - opacity) + colours * opacity, rgb)
    return Image.fromarray(blend.round().astype(np.uint8))


def grid(rows: List[List[Image.Image]], row_names: Sequence[str], scale: int, gap: int = 4) -> Image.Image:
    """Rows of equally sized pictures, each row named at its left."""
    cells = [[im.resize((im.width * scale, im.height * scale), Image.NEAREST) for im in row] for row in rows]
    w, h = cells[0][0].size
    margin = 14 if any(row_names) else 0
    out = Image.new('RGB', (margin + len(cells[0]) * (w + gap) - gap, len(cells) * (h + gap) - gap), 'white')
    for r, (row, name) in enumerate(zip(cells, row_names)):
        for c, im in enumerate(row):
            out.paste(im, (margin + c * (w + gap), r * (h + gap)))
        if name:
            text = Image.new('L', (h, margin), 255)
            ImageDraw.Draw(text).text((4, 1), name, fill=0)
            out.paste(text.rotate(90, expand=True), (0, r * (h + gap)))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('out', help='the PNG to write')
    parser.add_argument('--vis', required=True, help="predict.py's vis/ folder")
    parser.add_argument('--names', nargs='+', required=True, help='image names in it, in order')
    parser.add_argument('--labels', help='folder of the label PNGs: adds the ground truth above each drawing')
    parser.add_argument('--images', help='folder of the input images (default: the label folder with images/ for '
                                         'annotations/)')
    parser.add_argument('--config', help='segmentation config whose test data set gives the palette')
    parser.add_argument('--opacity', type=float, default=0.5)
    parser.add_argument('--scale', type=int, default=2)
    args = parser.parse_args(argv)

    drawn = [Image.open(osp.join(args.vis, n)).convert('RGB') for n in args.names]
    rows, names = [drawn], ['']
    if args.labels:
        if not args.config:
            parser.error('--labels needs --config (the palette)')
        from mmengine.config import Config
        palette = Config.fromfile(args.config).test_dataloader.dataset.metainfo.palette
        images = args.images or args.labels.replace('annotations', 'images')
        truth = [ground_truth(Image.open(osp.join(images, n)), osp.join(args.labels, osp.splitext(n)[0] + '.png'),
                              palette, args.opacity) for n in args.names]
        rows, names = [truth, drawn], ['ground truth', 'predict.py']
    grid(rows, names, args.scale).save(args.out)
    return 0


if __name__ == '__main__':
    sys.exit(main())
