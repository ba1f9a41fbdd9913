"""Predict on a user's own images with a trained detector or segmenter: ``detection/predict.py`` and
``segmentation/predict.py`` run :func:`predict_main`.

    python predict.py INPUT [INPUT ...] CONFIG --weights CKPT [--out-dir DIR] [--score-thr 0.3] [--device cpu]

INPUT is an image file, a folder (searched recursively for images) or a glob (``'photos/*.jpg'``, quoted or
expanded by the shell). The model, its test pipeline and the drawing are mmdet's ``DetInferencer`` and mmseg's
``MMSegInferencer`` built from our config; what this module adds around them:

* the checkpoint is read as data, with ``torch.load(weights_only=True)`` (:mod:`scalablevit.mm.checkpoint`),
  and must fit the config's model exactly (:func:`scalablevit.checkpoint.check_state_dict`); the inferencers
  alone would load a partial checkpoint with a warning;
* class names come from the checkpoint (``meta.dataset_meta``, written by the training runner), else from the
  config's test data set (``--classes``-style metainfo), never from COCO / Cityscapes defaults;
* outputs are named after the inputs' paths relative to their common folder (two ``img.jpg`` in different
  folders do not overwrite each other), one JSON per image holding the image path and the class names;
* an unreadable image is reported by name and skipped, the others are still predicted; a missing config, weights
  file or input is one line and exit status 1.

Outputs (the layout of mmdet's and mmseg's demos):

* ``DIR/vis/<name>``: the image with the prediction drawn: boxes, masks and class names with scores (detection,
  boxes scoring at least ``--score-thr``); the class colour overlay with class names (segmentation, ``--opacity``).
* ``DIR/preds/<stem>.json``, detection: ``{"image", "height", "width", "labels", "label_names", "scores",
  "bboxes"`` (x1, y1, x2, y2 in input pixels), ``"masks"`` (COCO RLE, Mask R-CNN)``}``, every detection the
  model returns (its ``test_cfg`` threshold applies; ``--score-thr`` only chooses what is drawn), mmdet's
  ``DetInferencer.pred2dict`` format plus the image and names.
* ``DIR/preds/<stem>.png`` + ``<stem>.json``, segmentation: the label map (pixel value = class index, the input's
  size) and ``{"image", "height", "width", "classes", "label_map", "segments": [{"label", "label_name", "area",
  "mask"}]}`` with one COCO RLE mask per class present.
"""
import argparse
import logging
import os.path as osp
import sys
import warnings
from typing import Dict, List, Optional, Sequence, Tuple

from mmengine.config import DictAction
from mmengine.logging import print_log

from ..checkpoint import check_state_dict
from ..cli import collect_images
from ..errors import UserError
from ..model import unwrap_state_dict
from .checkpoint import load_mm_checkpoint
from .config import read_config
from .tasks import get_task

__all__ = ['predict_main']


def _output_names(paths: Sequence[str]) -> List[str]:
    """Each path relative to the common folder of all of them (so names are unique and keep sub-folders)."""
    absolute = [osp.abspath(p) for p in paths]
    common = osp.commonpath([osp.dirname(p) for p in absolute])
    return [osp.relpath(p, common) for p in absolute]


def _readable(path: str) -> Optional[str]:
    """``None`` if mmcv can decode the file as a colour image (as the test pipeline will), else the reason."""
    import mmcv
    try:
        with open(path, 'rb') as f:
            data = f.read()
        img = mmcv.imfrombytes(data, flag='color')
    except Exception as e:  # noqa: BLE001  (decoders raise many types; the image is skipped either way)
        return f'{type(e).__name__}: {e}'
    if img is None or img.size == 0:
        return 'not an image mmcv/OpenCV can decode'
    return None


def _split_readable(paths: Sequence[str]) -> Tuple[List[str], Dict[str, str]]:
    """(the paths that read as images, {path: why not} for the others, each warned about); none readable: an error."""
    skipped = {}
    readable = []
    for p in paths:
        reason = _readable(p)
        if reason is None:
            readable.append(p)
        else:
            skipped[p] = reason
            print_log(f'skipping {p}: cannot read it as an image ({reason})', logger='current', level=logging.WARNING)
    if not readable:
        raise UserError(f'none of the {len(paths)} input files could be read as an image')
    return readable, skipped


def _dataset_meta(task, cfg, checkpoint: dict) -> dict:
    """Class names (and palette) of the predictions: the checkpoint's (``meta.dataset_meta``, written by the
    training runner), else the config's test data set's, never COCO's / Cityscapes' defaults."""
    meta = checkpoint.get('meta', {}).get('dataset_meta')
    if not meta:
        ds_cfg = dict(cfg.test_dataloader.dataset, lazy_init=True)
        meta = task.registry('DATASETS').build(ds_cfg).metainfo
    meta = {k.lower(): v for k, v in meta.items()}
    return {k: meta[k] for k in ('classes', 'palette') if meta.get(k) is not None}


def _make_inferencer(task, cfg, checkpoint: dict, weights: str, device: str):
    """mmdet's DetInferencer / mmseg's MMSegInferencer built without weights (so it reads no file itself), then the
    checkpoint, already read as data, checked against the model and loaded strictly, and the class names set."""
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', UserWarning)  # "weights is None, use COCO classes": both come next
        inferencer = task.inferencer_class()(model=cfg, weights=None, device=device, scope=task.scope)
    model = inferencer.model
    state_dict = unwrap_state_dict(checkpoint)
    check_state_dict(model, state_dict, weights, hint='predict needs a checkpoint that train.py wrote for this config')
    model.load_state_dict(state_dict)
    model.dataset_meta = {**getattr(model, 'dataset_meta', {}), **_dataset_meta(task, cfg, checkpoint)}
    inferencer.visualizer.dataset_meta = model.dataset_meta  # DetInferencer's copy (MMSegInferencer's: each draw)
    inferencer.show_progress = False
    return inferencer


def build_parser(task) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=f'Predict with a ScalableViT {task.name} model on your images')
    parser.add_argument('inputs', nargs='+', metavar='INPUT', help='image files, folders (recursive) or globs')
    parser.add_argument('config', help='the config the weights were trained with')
    parser.add_argument('--weights', required=True,
                        help='checkpoint written by train.py (e.g. work_dirs/X/epoch_12.pth)')
    parser.add_argument('--out-dir', default='outputs', help='where vis/ and preds/ go (default: outputs)')
    parser.add_argument('--device', default=None, help='cpu, cuda, cuda:1 ... (default: cuda if available)')
    parser.add_argument('--batch-size', type=int, default=1, help='images per forward pass')
    task.add_predict_args(parser)
    parser.add_argument('--no-vis', action='store_true', help='write preds/ only')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override config settings, key=value (e.g. model.test_cfg.score_thr=0.05)')
    return parser


def predict_main(argv: Optional[List[str]], task) -> dict:
    """Predict; returns ``dict(predicted=[paths], skipped={path: reason})``."""
    import torch

    task = get_task(task)
    args = build_parser(task).parse_args(argv)
    if args.batch_size < 1:
        raise UserError(f'--batch-size must be at least 1, got {args.batch_size}')
    if not osp.isfile(args.config):
        raise UserError(f'config file not found: {args.config}')
    if not osp.isfile(args.weights):
        raise UserError(f'--weights: checkpoint not found: {args.weights}')
    paths = collect_images(args.inputs)
    checkpoint = load_mm_checkpoint(args.weights)  # read as data (scalablevit.mm.checkpoint)
    device = args.device or ('cuda' if torch.cuda.is_available() else 'cpu')
    if device.startswith('cuda') and not torch.cuda.is_available():
        raise UserError(f'--device {device}: no CUDA device here; use --device cpu')

    cfg = read_config(args.config, args.cfg_options)
    task.check_scope(cfg)
    inferencer = _make_inferencer(task, cfg, checkpoint, args.weights, device)

    readable, skipped = _split_readable(paths)
    names = dict(zip(paths, _output_names(paths)))
    vis_dir, pred_dir = osp.join(args.out_dir, 'vis'), osp.join(args.out_dir, 'preds')

    import mmcv
    import numpy as np
    from rich.progress import track

    batches = [readable[i:i + args.batch_size] for i in range(0, len(readable), args.batch_size)]
    for batch in track(batches, description=f'Predicting {len(readable)} images', disable=not sys.stderr.isatty()):
        for chunk in inferencer.preprocess(batch, batch_size=len(batch)):  # one chunk: the whole batch
            preds = inferencer.forward(task.preprocessed(chunk))
            vis = None
            if not args.no_vis:
                vis = inferencer.visualize(batch, preds, return_vis=True, **task.visualize_kwargs(args))
            for i, (path, pred) in enumerate(zip(batch, preds)):
                name = names[path]
                if vis is not None:
                    mmcv.imwrite(np.ascontiguousarray(vis[i][..., ::-1]), osp.join(vis_dir, name))  # drawn in RGB
                task.write_prediction(inferencer, pred, path, osp.join(pred_dir, osp.splitext(name)[0]))
    print_log(f'predicted {len(readable)} images: {"" if args.no_vis else vis_dir + "/ and "}{pred_dir}/'
              + (f'; skipped {len(skipped)} unreadable: {", ".join(skipped)}' if skipped else ''), logger='current')
    return dict(predicted=readable, skipped=skipped)
