"""Predict on a user's own images with a trained detector or segmenter: ``detection/predict.py`` and
``segmentation/predict.py`` are a few lines each around :func:`predict_main`.

    python predict.py INPUT [INPUT ...] CONFIG --weights CKPT [--out-dir DIR] [--score-thr 0.3] [--device cpu]

INPUT is an image file, a folder (searched recursively for images) or a glob (``'photos/*.jpg'``, quoted or
expanded by the shell). The model, its test pipeline and the drawing are mmdet's ``DetInferencer`` and mmseg's
``MMSegInferencer`` built from our config; what this module adds around them:

* the checkpoint is read with ``torch.load(weights_only=True)`` (:func:`scalablevit.checkpoint.load_checkpoint`)
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
import glob
import json
import logging
import os
import os.path as osp
import sys
from typing import List, Optional, Sequence, Tuple

from .mm_tools import SetupError, check_mm_stack

__all__ = ['predict_main', 'collect_images', 'IMG_EXTENSIONS']

IMG_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.ppm', '.bmp', '.pgm', '.tif', '.tiff', '.webp')

_logger = logging.getLogger('scalablevit.mm_predict')


def collect_images(inputs: Sequence[str]) -> List[str]:
    """Image files named by ``inputs``: files as given, folders searched recursively, globs expanded; sorted, unique.

    A file is kept whatever its extension (an unreadable one is reported when it is read); in folders and globs
    only files with an image extension count. Raises :class:`SetupError` for an input that matches nothing.
    """
    found = []
    for spec in inputs:
        if osp.isfile(spec):
            found.append(spec)
        elif osp.isdir(spec):
            files = sorted(osp.join(root, f) for root, _, names in os.walk(spec, followlinks=True) for f in names
                           if f.lower().endswith(IMG_EXTENSIONS))
            if not files:
                raise SetupError(f'no images ({", ".join(IMG_EXTENSIONS)}) in folder {spec}')
            found += files
        elif glob.has_magic(spec):
            files = sorted(f for f in glob.glob(spec, recursive=True)
                           if osp.isfile(f) and f.lower().endswith(IMG_EXTENSIONS))
            if not files:
                raise SetupError(f'no images match {spec}')
            found += files
        else:
            raise SetupError(f'input not found: {spec} (give an image, a folder or a glob)')
    unique, seen = [], set()
    for f in found:
        key = osp.abspath(f)
        if key not in seen:
            seen.add(key)
            unique.append(f)
    return unique


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


def _import_mm_compat() -> list:
    """The torch/mmengine compatibility patches and the backbone registry; returns what mmengine checkpoints need
    allow-listed under ``weights_only=True``."""
    import scalablevit.mm  # noqa: F401
    import scalablevit.mm_compat as compat
    return list(compat.MMENGINE_SAFE_GLOBALS)


def _state_dict(checkpoint: dict) -> dict:
    state_dict = checkpoint.get('state_dict', checkpoint)
    if not isinstance(state_dict, dict):
        raise SetupError('the weights file holds no state dict')
    if state_dict and all(k.startswith('module.') for k in state_dict):  # saved from a DDP wrapper
        state_dict = {k[len('module.'):]: v for k, v in state_dict.items()}
    return state_dict


def _make_inferencer(task: str, cfg, checkpoint: dict, weights: str, device: str):
    """mmdet's DetInferencer / mmseg's MMSegInferencer, with the checkpoint already read and checked strictly."""
    from mmengine.registry import MODELS

    from .checkpoint import check_state_dict

    if task == 'det':
        from mmdet.apis import DetInferencer as Base
        from mmdet.registry import DATASETS
    else:
        from mmseg.apis import MMSegInferencer as Base
        from mmseg.registry import DATASETS

    class Inferencer(Base):
        def _init_model(self, cfg, weights_, device_):
            # BaseInferencer._init_model without its own (non-strict, unsafe) checkpoint read.
            if cfg.model.get('pretrained') is not None:
                del cfg.model.pretrained
            model = MODELS.build(cfg.model)
            model.cfg = cfg
            check_state_dict(model, _state_dict(checkpoint), weights,
                             hint='predict needs a checkpoint that train.py wrote for this config')
            self._load_weights_to_model(model, checkpoint, cfg)
            model.to(device_)
            model.eval()
            return model

        def _load_weights_to_model(self, model, checkpoint_, cfg):
            super()._load_weights_to_model(model, checkpoint_, cfg)
            if 'dataset_meta' not in checkpoint_.get('meta', {}):
                # no names in the checkpoint: the config's test data set (not COCO's / Cityscapes' defaults)
                ds_cfg = dict(cfg.test_dataloader.dataset, lazy_init=True)
                meta = DATASETS.build(ds_cfg).metainfo
                model.dataset_meta = dict(model.dataset_meta, classes=meta['classes'])
                if meta.get('palette') is not None:
                    model.dataset_meta['palette'] = meta['palette']

    scope = 'mmdet' if task == 'det' else 'mmseg'
    inferencer = Inferencer(model=cfg, weights=weights, device=device, scope=scope)
    inferencer.show_progress = False
    return inferencer


def _det_record(inferencer, pred, path: str) -> dict:
    record = inferencer.pred2dict(pred)  # mmdet's own JSON conversion (labels, scores, bboxes, RLE masks)
    classes = list(inferencer.model.dataset_meta['classes'])
    height, width = pred.ori_shape
    record = dict(image=path, height=int(height), width=int(width), labels=record['labels'],
                  label_names=[classes[i] for i in record['labels']], **{
                      k: v for k, v in record.items() if k != 'labels'})
    return record


def _seg_record(inferencer, pred, path: str, label_png: str) -> Tuple[dict, 'object']:
    import numpy as np
    import pycocotools.mask as mask_util

    classes = list(inferencer.model.dataset_meta['classes'])
    label_map = pred.pred_sem_seg.data[0].cpu().numpy()  # (H, W) class indices at the input's size
    segments = []
    for label in np.unique(label_map).tolist():
        mask = np.asfortranarray((label_map == label).astype(np.uint8))
        rle = mask_util.encode(mask)
        rle['counts'] = rle['counts'].decode()
        segments.append(dict(label=int(label), label_name=classes[label] if label < len(classes) else str(label),
                             area=int(mask.sum()), mask=rle))
    record = dict(image=path, height=int(label_map.shape[0]), width=int(label_map.shape[1]), classes=classes,
                  label_map=label_png, segments=segments)
    return record, label_map.astype(np.uint8 if len(classes) <= 255 else np.uint16)


def build_parser(task: str, description: str) -> argparse.ArgumentParser:
    from mmengine.config import DictAction

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument('inputs', nargs='+', metavar='INPUT', help='image files, folders (recursive) or globs')
    parser.add_argument('config', help='the config the weights were trained with')
    parser.add_argument('--weights', required=True,
                        help='checkpoint written by train.py (e.g. work_dirs/X/epoch_12.pth)')
    parser.add_argument('--out-dir', default='outputs', help='where vis/ and preds/ go (default: outputs)')
    parser.add_argument('--device', default=None, help='cpu, cuda, cuda:1 ... (default: cuda if available)')
    parser.add_argument('--batch-size', type=int, default=1, help='images per forward pass')
    if task == 'det':
        parser.add_argument('--score-thr', type=float, default=0.3,
                            help='draw boxes scoring at least this (default 0.3); the JSON keeps all detections')
    else:
        parser.add_argument('--opacity', type=float, default=0.5, help='of the class colour overlay (0-1)')
    parser.add_argument('--no-vis', action='store_true', help='write preds/ only')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override config settings, key=value (e.g. model.test_cfg.score_thr=0.05)')
    return parser


def predict_main(argv: Optional[List[str]], task: str, description: str) -> dict:
    """Predict; returns ``dict(predicted=[paths], skipped={path: reason})``."""
    assert task in ('det', 'seg'), task
    check_mm_stack()
    _import_mm_compat()
    from mmengine.config import Config
    from mmengine.logging import print_log

    from .checkpoint import CheckpointError, load_checkpoint

    args = build_parser(task, description).parse_args(argv)
    if args.batch_size < 1:
        raise SetupError(f'--batch-size must be at least 1, got {args.batch_size}')
    if not osp.isfile(args.config):
        raise SetupError(f'config file not found: {args.config}')
    if not osp.isfile(args.weights):
        raise SetupError(f'--weights: checkpoint not found: {args.weights}')
    paths = collect_images(args.inputs)
    try:
        # mm_compat allow-lists mmengine's classes globally; load_checkpoint(safe_globals=...) would remove them again
        # on exit (torch's safe_globals context), so they are not passed here
        checkpoint = load_checkpoint(args.weights)
    except CheckpointError as e:
        raise SetupError(str(e))
    device = args.device
    if device is None:
        import torch
        device = 'cuda' if torch.cuda.is_available() else 'cpu'
    elif device.startswith('cuda'):
        import torch
        if not torch.cuda.is_available():
            raise SetupError(f'--device {device}: no CUDA device here; use --device cpu')

    cfg = Config.fromfile(args.config)
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    try:
        inferencer = _make_inferencer(task, cfg, checkpoint, args.weights, device)
    except CheckpointError as e:
        raise SetupError(str(e))

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
        raise SetupError(f'none of the {len(paths)} input files could be read as an image')
    names = dict(zip(paths, _output_names(paths)))
    vis_dir, pred_dir = osp.join(args.out_dir, 'vis'), osp.join(args.out_dir, 'preds')

    import mmcv
    import numpy as np
    from rich.progress import track

    batches = [readable[i:i + args.batch_size] for i in range(0, len(readable), args.batch_size)]
    for batch in track(batches, description=f'Predicting {len(readable)} images', disable=not sys.stderr.isatty()):
        for chunk in inferencer.preprocess(batch, batch_size=len(batch)):  # one chunk: the whole batch
            data = chunk[1] if task == 'det' else chunk  # DetInferencer yields (inputs, data), mmseg's data only
            ori_inputs = batch
            preds = inferencer.forward(data)
            vis = None
            if not args.no_vis:
                kwargs = (dict(pred_score_thr=args.score_thr) if task == 'det' else dict(opacity=args.opacity))
                vis = inferencer.visualize(ori_inputs, preds, return_vis=True, **kwargs)
            for i, (path, pred) in enumerate(zip(ori_inputs, preds)):
                name = names[path]
                stem = osp.splitext(name)[0]
                if vis is not None:
                    mmcv.imwrite(np.ascontiguousarray(vis[i][..., ::-1]), osp.join(vis_dir, name))  # drawn in RGB
                json_path = osp.join(pred_dir, stem + '.json')
                if task == 'det':
                    record = _det_record(inferencer, pred, path)
                else:
                    png = osp.join(pred_dir, stem + '.png')
                    record, label_map = _seg_record(inferencer, pred, path, png)
                    mmcv.imwrite(label_map, png)
                os.makedirs(osp.dirname(json_path), exist_ok=True)
                with open(json_path, 'w') as f:
                    json.dump(record, f)
    print_log(f'predicted {len(readable)} images: {"" if args.no_vis else vis_dir + "/ and "}{pred_dir}/'
              + (f'; skipped {len(skipped)} unreadable: {", ".join(skipped)}' if skipped else ''), logger='current')
    return dict(predicted=readable, skipped=skipped)
