"""What detection and segmentation do differently, as two objects: :data:`DETECTION` and :data:`SEGMENTATION`.

The train / test / predict / FLOPs commands (:mod:`scalablevit.mm.runner`, :mod:`~scalablevit.mm.predict`,
:mod:`~scalablevit.mm.flops`) are written once and call these methods where the tasks differ: the registry scope,
the checks of a data set, the extra test and predict options, drawing test results, the dummy forward pass of a
FLOPs count, and what a prediction file holds.
"""
import argparse
import json
import os
import os.path as osp
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..errors import UserError
from .data import EVALUATORS, HINT, evaluators, init_default, short, transforms_of_type, under

__all__ = ['DETECTION', 'SEGMENTATION', 'TASKS', 'Task', 'get_task']

MAX_LABEL_FILES = 1000  # label maps read per split at start-up (evenly spaced when there are more)


class Task:
    """The common part; :class:`Detection` and :class:`Segmentation` fill in the rest."""

    name: str  # 'detection' / 'segmentation'
    scope: str  # the mmengine registry scope of the task's configs
    flops_shape: Tuple[int, int]  # (H, W) of the published FLOPs column

    # registries --------------------------------------------------------------------------------------------------
    def registry(self, name: str):
        """The task's ``MODELS`` / ``DATASETS`` registry."""
        raise NotImplementedError

    def register_all_modules(self):
        raise NotImplementedError

    def check_scope(self, cfg):
        """A :class:`UserError` unless ``cfg`` is a config of this task."""
        scope = cfg.get('default_scope', '')
        if scope != self.scope:
            other = next((t for t in TASKS.values() if t.scope == scope), None)
            where = (f'a {other.name} config: run it with {other.name}/ scripts' if other else
                     f'expected an {self.scope} config')
            raise UserError(f"the config's default_scope is {scope!r}, {where}")

    def dataset_class(self, ds: dict):
        cls = self.registry('DATASETS').get(ds['type']) if isinstance(ds.get('type'), str) else ds.get('type')
        if cls is None:
            raise UserError(f"unknown data set type {ds.get('type')!r}")
        return cls

    # own data ----------------------------------------------------------------------------------------------------
    def classes_of(self, ds: dict) -> Tuple[str, ...]:
        meta = ds.get('metainfo') or {}
        if meta.get('classes'):
            return tuple(meta['classes'])
        return tuple(self.dataset_class(ds).METAINFO.get('classes', ()))

    def accept_any_classes(self, ds: dict):
        """Make the data set config take class names of the user's (``--classes``)."""

    def check_data(self, cfg, key: str, ds: dict, classes: Sequence[str], deep: bool, seen: set):
        """One-line errors for the data of ``key``; ``deep`` reads annotation / label files (each once, ``seen``)."""
        raise NotImplementedError

    # test --------------------------------------------------------------------------------------------------------
    def add_test_args(self, parser: argparse.ArgumentParser):
        pass

    def apply_test_args(self, cfg, args: argparse.Namespace):
        """Task options of test.py into the config (checked before anything is built)."""

    def before_test(self, runner, args: argparse.Namespace):
        pass

    def check_metrics(self, cfg, metrics: Optional[dict]):
        """After testing: a :class:`UserError` when the test gave no metric worth the name."""

    def select_metrics(self, cfg, names: Sequence[str]) -> str:
        """``--eval`` of the old command lines, checked against the config's test evaluator; a note to log."""
        raise NotImplementedError

    def show_dir(self, cfg, hook: dict, show_dir: str):
        """``--show-dir``: the visualization hook draws every test image there."""
        raise NotImplementedError

    # FLOPs -------------------------------------------------------------------------------------------------------
    def dummy_forward(self, model: torch.nn.Module, shape: Tuple[int, int]):
        """A callable running the inference forward pass of ``model`` on one zero image of ``shape`` (H, W)."""
        raise NotImplementedError

    def flops_parts(self, model: torch.nn.Module) -> List[Tuple[str, torch.nn.Module]]:
        names = ('backbone', 'neck', 'decode_head', 'auxiliary_head', 'rpn_head', 'roi_head', 'bbox_head')
        return [(n, getattr(model, n)) for n in names if isinstance(getattr(model, n, None), torch.nn.Module)]

    # predict -----------------------------------------------------------------------------------------------------
    def inferencer_class(self):
        raise NotImplementedError

    def add_predict_args(self, parser: argparse.ArgumentParser):
        pass

    def preprocessed(self, chunk):
        """The model inputs of one chunk of the inferencer's ``preprocess``."""
        return chunk

    def visualize_kwargs(self, args: argparse.Namespace) -> dict:
        return {}

    def write_prediction(self, inferencer, pred, path: str, stem: str):
        """``<stem>.json`` (and files beside it) for the prediction ``pred`` of the image ``path``."""
        raise NotImplementedError


class Detection(Task):
    name, scope, flops_shape = 'detection', 'mmdet', (800, 1280)

    def registry(self, name: str):
        import mmdet.registry
        return getattr(mmdet.registry, name)

    def register_all_modules(self):
        from mmdet.utils import register_all_modules
        register_all_modules(init_default_scope=False)

    def check_data(self, cfg, key, ds, classes, deep, seen):
        root = ds.get('data_root', '') or ''
        ann = under(root, ds.get('ann_file', ''))
        if ann and not osp.isfile(ann):
            raise UserError(f'{key}: annotation file {ann!r} not found {HINT}')
        prefix = under(root, (ds.get('data_prefix') or {}).get('img', ''))
        if prefix and not osp.isdir(prefix):
            raise UserError(f'{key}: image folder {prefix!r} not found {HINT}')
        for ev in evaluators(cfg, key):
            if ev.get('ann_file') and not osp.isfile(ev['ann_file']):
                raise UserError(f'{EVALUATORS[key]}.ann_file {ev["ann_file"]!r} not found {HINT}')
        if deep and ann and ann not in seen:
            seen.add(ann)
            _check_coco(ann, classes)

    def add_test_args(self, parser):
        parser.add_argument('--score-thr', type=float, metavar='T',
                            help="keep boxes scoring at least T (the config's model.test_cfg score_thr)")
        parser.add_argument('--out', help='also dump the raw predictions to this .pkl file')

    def apply_test_args(self, cfg, args):
        if args.out and not args.out.endswith(('.pkl', '.pickle')):
            raise UserError(f'--out {args.out}: must be a .pkl or .pickle file')
        if args.score_thr is not None:
            key, _ = score_threshold(cfg)
            if key is None:
                raise UserError('--score-thr: the config has no model.test_cfg score_thr')
            node = cfg.model.test_cfg
            node = node.rcnn if key.endswith('rcnn.score_thr') else node
            node['score_thr'] = args.score_thr

    def before_test(self, runner, args):
        if args.out:
            from mmengine.evaluator import DumpResults
            runner.test_evaluator.metrics.append(DumpResults(out_file_path=args.out))

    def check_metrics(self, cfg, metrics):
        if not any(k.endswith('_mAP') for k in metrics or {}):
            key, thr = score_threshold(cfg)
            raise UserError(f'the detector found no boxes scoring {thr} or more ({key}) in any test image, so there '
                            f'is no mAP; lower the threshold with --score-thr (e.g. --score-thr 0.001) or train '
                            f'longer')

    def select_metrics(self, cfg, names):
        """``mAP`` means the evaluator's metrics; ``bbox`` / ``segm`` select among them."""
        evs = cfg.test_evaluator if isinstance(cfg.test_evaluator, (list, tuple)) else [cfg.test_evaluator]
        coco = [e for e in evs if 'metric' in e]
        have = []
        for e in coco:
            have += [e['metric']] if isinstance(e['metric'], str) else list(e['metric'])
        wanted = [n for n in names if n != 'mAP']
        wrong = [n for n in wanted if n not in have]
        if wrong:
            raise UserError(f'--eval {" ".join(wrong)}: this config evaluates {", ".join(have) or "nothing"} '
                            f'(choose from mAP, {", ".join(have)})')
        if wanted:
            for e in coco:
                e['metric'] = wanted if len(wanted) > 1 else wanted[0]
        return f'COCO {", ".join(wanted or have)} mAP'

    def show_dir(self, cfg, hook, show_dir):
        hook.test_out_dir = show_dir  # DIR/<image name>

    def dummy_forward(self, model, shape):
        from mmdet.structures import DetDataSample
        x = torch.zeros(1, 3, *shape)
        sample = DetDataSample(metainfo=dict(img_shape=shape, ori_shape=shape, pad_shape=shape,
                                             batch_input_shape=shape, scale_factor=(1., 1.)))
        return lambda: model(x, [sample], mode='tensor')

    def inferencer_class(self):
        from mmdet.apis import DetInferencer
        return DetInferencer

    def add_predict_args(self, parser):
        parser.add_argument('--score-thr', type=float, default=0.3,
                            help='draw boxes scoring at least this (default 0.3); the JSON keeps all detections')

    def preprocessed(self, chunk):
        return chunk[1]  # DetInferencer yields (inputs, data)

    def visualize_kwargs(self, args):
        return dict(pred_score_thr=args.score_thr)

    def write_prediction(self, inferencer, pred, path, stem):
        record = inferencer.pred2dict(pred)  # mmdet's own JSON conversion (labels, scores, bboxes, RLE masks)
        classes = list(inferencer.model.dataset_meta['classes'])
        height, width = pred.ori_shape
        record = dict(image=path, height=int(height), width=int(width), labels=record['labels'],
                      label_names=[classes[i] for i in record['labels']],
                      **{k: v for k, v in record.items() if k != 'labels'})
        _write_json(stem + '.json', record)


class Segmentation(Task):
    name, scope, flops_shape = 'segmentation', 'mmseg', (512, 2048)
    metrics = ('mIoU', 'mDice', 'mFscore')

    def registry(self, name: str):
        import mmseg.registry
        return getattr(mmseg.registry, name)

    def register_all_modules(self):
        from mmseg.utils import register_all_modules
        register_all_modules(init_default_scope=False)

    def reduce_zero_label(self, ds: dict) -> bool:
        """Whether label 0 is ``ignore`` (ADE20K's convention): the pipeline's LoadAnnotations, else the data set's."""
        for t in transforms_of_type(ds.get('pipeline', []), 'LoadAnnotations'):
            if t.get('reduce_zero_label') is not None:
                return bool(t['reduce_zero_label'])
        if 'reduce_zero_label' in ds:
            return bool(ds['reduce_zero_label'])
        return bool(init_default(self.dataset_class(ds), 'reduce_zero_label', False))

    def accept_any_classes(self, ds):
        # ADE20KDataset and its kin only accept subsets of their own classes; BaseSegDataset reads the same layout
        # with any names. Keep the suffixes and the meaning of label 0.
        cls = self.dataset_class(ds)
        if cls.__name__ == 'BaseSegDataset':
            return
        ds['reduce_zero_label'] = self.reduce_zero_label(ds)
        ds['type'] = 'BaseSegDataset'
        ds.setdefault('img_suffix', init_default(cls, 'img_suffix', '.jpg'))
        ds.setdefault('seg_map_suffix', init_default(cls, 'seg_map_suffix', '.png'))

    def check_data(self, cfg, key, ds, classes, deep, seen):
        root = ds.get('data_root', '') or ''
        prefix = ds.get('data_prefix') or {}
        img_dir, seg_dir = under(root, prefix.get('img_path', '')), under(root, prefix.get('seg_map_path', ''))
        for what, d in (('image', img_dir), ('label', seg_dir)):
            if d and not osp.isdir(d):
                raise UserError(f'{key}: {what} folder {d!r} not found {HINT}')
        if deep and seg_dir and seg_dir not in seen:
            seen.add(seg_dir)
            suffix = ds.get('seg_map_suffix') or init_default(self.dataset_class(ds), 'seg_map_suffix', '.png')
            _check_labels(seg_dir, suffix, len(classes), self.reduce_zero_label(ds))

    def select_metrics(self, cfg, names):
        """``mIoU``, ``mDice``, ``mFscore`` set IoUMetric's ``iou_metrics``."""
        wrong = [n for n in names if n not in self.metrics]
        if wrong:
            raise UserError(f'--eval {" ".join(wrong)}: segmentation evaluates {", ".join(self.metrics)}')
        evs = cfg.test_evaluator if isinstance(cfg.test_evaluator, (list, tuple)) else [cfg.test_evaluator]
        for e in evs:
            if 'iou_metrics' in e or e.get('type') == 'IoUMetric':
                e['iou_metrics'] = list(names) or ['mIoU']
        return ', '.join(names)

    def show_dir(self, cfg, hook, show_dir):
        hook.interval = 1  # every test image (mmseg draws one in 50 by default)
        cfg.visualizer.save_dir = show_dir  # DIR/vis_data/vis_image/, mmseg's layout

    def dummy_forward(self, model, shape):
        x = torch.zeros(1, 3, *shape)
        return lambda: model(x, mode='tensor')

    def inferencer_class(self):
        from mmseg.apis import MMSegInferencer
        return MMSegInferencer

    def add_predict_args(self, parser):
        parser.add_argument('--opacity', type=float, default=0.5, help='of the class colour overlay (0-1)')

    def visualize_kwargs(self, args):
        return dict(opacity=args.opacity)

    def write_prediction(self, inferencer, pred, path, stem):
        import mmcv
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
        png = stem + '.png'
        mmcv.imwrite(label_map.astype(np.uint8 if len(classes) <= 255 else np.uint16), png)
        _write_json(stem + '.json', dict(image=path, height=int(label_map.shape[0]), width=int(label_map.shape[1]),
                                         classes=classes, label_map=png, segments=segments))


DETECTION, SEGMENTATION = Detection(), Segmentation()
TASKS: Dict[str, Task] = {t.name: t for t in (DETECTION, SEGMENTATION)}


def get_task(task) -> Task:
    """A :class:`Task` from itself or its name."""
    return task if isinstance(task, Task) else TASKS[task]


def score_threshold(cfg) -> Tuple[Optional[str], Optional[float]]:
    """(config key, value) of a detector's test score threshold."""
    test_cfg = cfg.model.get('test_cfg') or {}
    if 'rcnn' in test_cfg:
        return 'model.test_cfg.rcnn.score_thr', test_cfg['rcnn'].get('score_thr')
    if 'score_thr' in test_cfg:
        return 'model.test_cfg.score_thr', test_cfg['score_thr']
    return None, None


def _write_json(path: str, record: dict):
    os.makedirs(osp.dirname(path) or '.', exist_ok=True)
    with open(path, 'w') as f:
        json.dump(record, f)


def _check_coco(ann: str, classes: Sequence[str]):
    try:
        with open(ann) as f:
            coco = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f'cannot read the annotation file {ann}: {e}')
    if not isinstance(coco, dict) or not isinstance(coco.get('categories'), list):
        raise UserError(f'{ann} is not a COCO annotation file (no "categories" list)')
    names = [c.get('name') for c in coco['categories']]
    missing = [c for c in classes if c not in names]
    if missing:
        raise UserError(f'{len(missing)} of the {len(classes)} classes are not in {ann}: {short(missing)}; the file '
                        f'has {short(names, 20)} (pass --classes {",".join(map(str, names))})')
    in_file_order = [n for n in names if n in classes]
    if list(classes) != in_file_order:
        # mmdet numbers the labels in the order of the file's categories, whatever the order of the classes
        raise UserError(f'the classes must be in the order of the categories of {ann}: --classes '
                        f'{",".join(map(str, in_file_order))}')
    ids = {c.get('id') for c in coco['categories']}
    stray = [a.get('category_id') for a in coco.get('annotations', []) if a.get('category_id') not in ids]
    if stray:
        raise UserError(f'{len(stray)} annotations in {ann} have category ids that its "categories" lacks: '
                        f'{short(sorted(set(stray)))} (mmdet would drop them silently); add the categories or '
                        f'fix the ids')


def _check_labels(seg_dir: str, suffix: str, num_classes: int, reduce_zero_label: bool):
    from PIL import Image

    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(seg_dir) for f in fs if f.endswith(suffix))
    if not files:
        raise UserError(f'no label maps ending in {suffix!r} in {seg_dir}')
    if len(files) > MAX_LABEL_FILES:
        files = [files[i] for i in np.linspace(0, len(files) - 1, MAX_LABEL_FILES).astype(int)]
    top = num_classes if reduce_zero_label else num_classes - 1  # largest valid class value
    bad: Dict[int, str] = {}
    for path in files:
        values = np.unique(np.asarray(Image.open(path)))
        for v in values[(values > top) & (values != 255)]:
            bad.setdefault(int(v), path)
    if bad:
        meaning = (f'label 0 is "ignore" and 1..{num_classes} are the classes (reduce_zero_label)'
                   if reduce_zero_label else f'0..{num_classes - 1} are the classes')
        first = next(iter(bad.values()))
        raise UserError(f'label values above the {num_classes} classes in {seg_dir}: {short(sorted(bad))} (e.g. '
                        f'{first}); {meaning} and 255 is ignored; fix --classes or the labels')

