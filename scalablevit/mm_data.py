"""Your own data set in ``detection/`` and ``segmentation/``: ``--data-root`` / ``--classes``, and the start-up checks.

Used by :mod:`scalablevit.mm_tools` (the train/test command lines):

* :func:`add_data_args` / :func:`apply_data_args`: ``--data-root DIR`` sets every dataloader's ``data_root`` and
  every evaluator's ``ann_file``; ``--classes a,b,c`` (or a text file, one name a line) sets every data set's
  ``metainfo.classes`` and every head's ``num_classes`` (not the RPN's); segmentation switches ADE20K's data set
  class to mmseg's ``BaseSegDataset`` (same layout and suffixes, any class names). ``--no-pretrained`` trains the
  backbone from scratch.
* :func:`check_config`: one-line errors, before anything is built, for a missing data folder or annotation file,
  class names the annotation file lacks (it lists the names it has), annotations whose category id is not in
  ``categories``, label values above the number of classes, a head whose ``num_classes`` disagrees with the
  classes, and a missing pretrained file.
* :func:`check_checkpoint`: ``test.py`` refuses a checkpoint whose keys or shapes do not fit the config's model.
* :func:`rescale_tta`, :func:`select_metrics`, :func:`score_threshold`: ``--aug-test`` scales as ratios of the
  test scale, ``--eval`` checked against the evaluator, the detector's score threshold.
"""
import json
import os
import os.path as osp
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from .mm_tools import SetupError

__all__ = ['add_data_args', 'apply_data_args', 'check_config', 'check_checkpoint', 'rescale_tta', 'select_metrics',
           'score_threshold', 'set_score_threshold', 'LOADERS']

LOADERS = ('train_dataloader', 'val_dataloader', 'test_dataloader')
_EVALUATORS = {'val_dataloader': 'val_evaluator', 'test_dataloader': 'test_evaluator'}
MAX_LABEL_FILES = 1000  # label maps read per split at start-up (evenly spaced when there are more)


def task_of(cfg) -> str:
    """``'det'`` or ``'seg'``, from the config's registry scope."""
    scope = cfg.get('default_scope', '')
    if scope not in ('mmdet', 'mmseg'):
        raise SetupError(f"the config's default_scope is {scope!r}; expected an mmdet or mmseg config")
    return 'det' if scope == 'mmdet' else 'seg'


def add_data_args(parser, train: bool):
    parser.add_argument('--data-root', metavar='DIR',
                        help="your data set's folder, in the config's layout (see the README, 'Your own data set'); "
                             "sets every dataloader's data_root and every evaluator's annotation file")
    parser.add_argument('--classes', metavar='A,B,C',
                        help="class names, comma-separated, or a text file with one name a line; sets every data "
                             "set's classes and every head's num_classes")
    if train:
        parser.add_argument('--no-pretrained', action='store_true',
                            help='train the backbone from scratch (no ImageNet weights)')


def parse_classes(value: str) -> Tuple[str, ...]:
    if osp.isfile(value):
        with open(value) as f:
            names = [line.strip() for line in f]
    else:
        names = value.split(',')
    names = [n.strip() for n in names if n.strip()]
    if not names:
        raise SetupError(f'--classes {value!r}: no class names (give a,b,c or a file with one name a line)')
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise SetupError(f'--classes: {", ".join(dup)} given twice')
    return tuple(names)


def dataset_of(loader) -> Optional[dict]:
    """The innermost data set config of a dataloader (through RepeatDataset-like wrappers)."""
    ds = loader.get('dataset') if loader else None
    while ds is not None and 'dataset' in ds:
        ds = ds['dataset']
    return ds


def _loaders(cfg, keys=LOADERS) -> Iterator[Tuple[str, dict]]:
    for key in keys:
        ds = dataset_of(cfg.get(key))
        if ds is not None:
            yield key, ds


def _evaluators(cfg, key: str) -> List[dict]:
    ev = cfg.get(_EVALUATORS.get(key, ''))
    if not ev:
        return []
    return list(ev) if isinstance(ev, (list, tuple)) else [ev]


def _heads(node, path='model') -> Iterator[Tuple[str, dict]]:
    """(path, dict) of every config dict under the model with a ``num_classes`` (the RPN's is its own: skipped)."""
    if isinstance(node, dict):
        if 'num_classes' in node and 'rpn_head' not in path:
            yield path, node
        for k, v in node.items():
            yield from _heads(v, f'{path}.{k}')
    elif isinstance(node, (list, tuple)):
        for i, v in enumerate(node):
            yield from _heads(v, f'{path}.{i}')


def _load_annotations(node) -> Iterator[dict]:
    """Every ``LoadAnnotations`` transform in a pipeline (also inside TestTimeAug)."""
    if isinstance(node, dict):
        if node.get('type') == 'LoadAnnotations':
            yield node
        for v in node.values():
            yield from _load_annotations(v)
    elif isinstance(node, (list, tuple)):
        for v in node:
            yield from _load_annotations(v)


def _reduce_zero_label(cfg, ds) -> bool:
    """Whether label 0 is ``ignore`` (ADE20K's convention): the pipeline's LoadAnnotations, else the data set's."""
    for t in _load_annotations(ds.get('pipeline', [])):
        if t.get('reduce_zero_label') is not None:
            return bool(t['reduce_zero_label'])
    if 'reduce_zero_label' in ds:
        return bool(ds['reduce_zero_label'])
    return bool(_init_default(_dataset_class(cfg, ds), 'reduce_zero_label', False))


def _dataset_class(cfg, ds):
    if task_of(cfg) == 'det':
        from mmdet.registry import DATASETS
    else:
        from mmseg.registry import DATASETS
    cls = DATASETS.get(ds['type']) if isinstance(ds.get('type'), str) else ds.get('type')
    if cls is None:
        raise SetupError(f"unknown data set type {ds.get('type')!r}")
    return cls


def classes_of(cfg, ds) -> Tuple[str, ...]:
    meta = ds.get('metainfo') or {}
    if meta.get('classes'):
        return tuple(meta['classes'])
    return tuple(_dataset_class(cfg, ds).METAINFO.get('classes', ()))


def apply_data_args(cfg, args):
    """``--data-root``, ``--classes`` and ``--no-pretrained`` into the config."""
    task = task_of(cfg)
    if getattr(args, 'no_pretrained', False):
        cfg.model.backbone.init_cfg = None
    if args.data_root:
        root = args.data_root if args.data_root.endswith('/') else args.data_root + '/'
        for key, ds in _loaders(cfg):
            ds['data_root'] = root
            for ev in _evaluators(cfg, key):
                if 'ann_file' in ev and ds.get('ann_file'):
                    ev['ann_file'] = osp.join(root, ds['ann_file'])
    if args.classes:
        classes = parse_classes(args.classes)
        for key, ds in _loaders(cfg):
            meta = dict(ds.get('metainfo') or {})
            if len(meta.get('palette', ())) != len(classes):
                meta.pop('palette', None)
            meta['classes'] = classes
            ds['metainfo'] = meta
            if task == 'seg' and _dataset_class(cfg, ds).__name__ != 'BaseSegDataset':
                # ADE20KDataset and its kin only accept subsets of their own classes; BaseSegDataset reads the same
                # layout with any names. Keep the suffixes and the meaning of label 0.
                cls = _dataset_class(cfg, ds)
                ds['reduce_zero_label'] = _reduce_zero_label(cfg, ds)
                ds['type'] = 'BaseSegDataset'
                ds.setdefault('img_suffix', _init_default(cls, 'img_suffix', '.jpg'))
                ds.setdefault('seg_map_suffix', _init_default(cls, 'seg_map_suffix', '.png'))
        for _, head in _heads(cfg.model):
            head['num_classes'] = len(classes)
    return cfg


def _init_default(cls, name: str, fallback):
    import inspect
    try:
        p = inspect.signature(cls.__init__).parameters.get(name)
    except (TypeError, ValueError):
        return fallback
    return p.default if p is not None and p.default is not inspect.Parameter.empty else fallback


def _short(items: Sequence, n: int = 10) -> str:
    items = [str(i) for i in items]
    return ', '.join(items[:n]) + (f', ... ({len(items)} in all)' if len(items) > n else '')


def _path(root: str, rel: str) -> str:
    return rel if not rel or osp.isabs(rel) else osp.join(root or '', rel)


def check_config(cfg, loader_keys: Sequence[str], train: bool, deep: bool = True):
    """Raise :class:`SetupError` (one line) for the first problem of the config's data, classes and weights.

    ``deep`` also reads the annotation files (detection) and up to ``MAX_LABEL_FILES`` label maps per split
    (segmentation); processes started by ``tools/dist_run.sh`` skip it, as its one-process check ran it before.
    """
    task = task_of(cfg)
    hint = '(see the README, "Data preparation" and "Your own data set"; --data-root DIR points elsewhere)'
    seen_ann, seen_labels = set(), set()
    for key, ds in _loaders(cfg, loader_keys):
        root = ds.get('data_root', '') or ''
        if root and not osp.isdir(root):
            raise SetupError(f'{key}: data_root {root!r} does not exist in {os.getcwd()} {hint}')
        classes = classes_of(cfg, ds)
        for path, head in _heads(cfg.model):
            if head['num_classes'] != len(classes):
                raise SetupError(f'{path}.num_classes is {head["num_classes"]} but {key} has {len(classes)} classes '
                                 f'({_short(classes)}); --classes sets both')
        if task == 'det':
            ann = _path(root, ds.get('ann_file', ''))
            if ann and not osp.isfile(ann):
                raise SetupError(f'{key}: annotation file {ann!r} not found {hint}')
            prefix = _path(root, (ds.get('data_prefix') or {}).get('img', ''))
            if prefix and not osp.isdir(prefix):
                raise SetupError(f'{key}: image folder {prefix!r} not found {hint}')
            for ev in _evaluators(cfg, key):
                if ev.get('ann_file') and not osp.isfile(ev['ann_file']):
                    raise SetupError(f'{_EVALUATORS[key]}.ann_file {ev["ann_file"]!r} not found {hint}')
            if deep and ann and ann not in seen_ann:
                seen_ann.add(ann)
                _check_coco(ann, classes)
        else:
            prefix = ds.get('data_prefix') or {}
            img_dir, seg_dir = _path(root, prefix.get('img_path', '')), _path(root, prefix.get('seg_map_path', ''))
            for what, d in (('image', img_dir), ('label', seg_dir)):
                if d and not osp.isdir(d):
                    raise SetupError(f'{key}: {what} folder {d!r} not found {hint}')
            if deep and seg_dir and seg_dir not in seen_labels:
                seen_labels.add(seg_dir)
                _check_labels(seg_dir, ds.get('seg_map_suffix') or _init_default(_dataset_class(cfg, ds),
                                                                                 'seg_map_suffix', '.png'),
                              len(classes), _reduce_zero_label(cfg, ds))
    if train:
        _check_pretrained(cfg)


def _check_coco(ann: str, classes: Sequence[str]):
    try:
        with open(ann) as f:
            coco = json.load(f)
    except (OSError, ValueError) as e:
        raise SetupError(f'cannot read the annotation file {ann}: {e}')
    if not isinstance(coco, dict) or not isinstance(coco.get('categories'), list):
        raise SetupError(f'{ann} is not a COCO annotation file (no "categories" list)')
    names = [c.get('name') for c in coco['categories']]
    missing = [c for c in classes if c not in names]
    if missing:
        raise SetupError(f'{len(missing)} of the {len(classes)} classes are not in {ann}: {_short(missing)}; the file '
                         f'has {_short(names, 20)} (pass --classes {",".join(map(str, names))})')
    in_file_order = [n for n in names if n in classes]
    if list(classes) != in_file_order:
        # mmdet numbers the labels in the order of the file's categories, whatever the order of the classes
        raise SetupError(f'the classes must be in the order of the categories of {ann}: --classes '
                         f'{",".join(map(str, in_file_order))}')
    ids = {c.get('id') for c in coco['categories']}
    stray = [a.get('category_id') for a in coco.get('annotations', []) if a.get('category_id') not in ids]
    if stray:
        raise SetupError(f'{len(stray)} annotations in {ann} have category ids that its "categories" lacks: '
                         f'{_short(sorted(set(stray)))} (mmdet would drop them silently); add the categories or '
                         f'fix the ids')


def _check_labels(seg_dir: str, suffix: str, num_classes: int, reduce_zero_label: bool):
    from PIL import Image

    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(seg_dir) for f in fs if f.endswith(suffix))
    if not files:
        raise SetupError(f'no label maps ending in {suffix!r} in {seg_dir}')
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
        raise SetupError(f'label values above the {num_classes} classes in {seg_dir}: {_short(sorted(bad))} (e.g. '
                         f'{first}); {meaning} and 255 is ignored; fix --classes or the labels')


def _check_pretrained(cfg):
    init = (cfg.model.get('backbone') or {}).get('init_cfg')
    ckpt = init.get('checkpoint') if isinstance(init, dict) else None
    if ckpt and not osp.isfile(ckpt):
        raise SetupError(f'pretrained backbone weights not found: {ckpt} (in {os.getcwd()}); put the released ImageNet '
                         f'checkpoint there (README, "Pretrained weights"), or train from scratch with '
                         f'--no-pretrained')


def build_model(cfg):
    """The config's model on the CPU, its backbone without pretrained weights."""
    import copy

    from mmengine.registry import init_default_scope
    if task_of(cfg) == 'det':
        from mmdet.registry import MODELS
        from mmdet.utils import register_all_modules
    else:
        from mmseg.registry import MODELS
        from mmseg.utils import register_all_modules
    register_all_modules(init_default_scope=False)
    init_default_scope(cfg.default_scope)
    model_cfg = copy.deepcopy(cfg.model)
    if model_cfg.get('backbone') is not None:
        model_cfg.backbone.init_cfg = None
    return MODELS.build(model_cfg)


def check_checkpoint(cfg, path: str, model=None):
    """Refuse a checkpoint whose keys or shapes do not fit the config's model (one line, from
    :func:`scalablevit.checkpoint.check_state_dict`)."""
    from . import mm_compat  # noqa: F401  (allow-lists what mmengine checkpoints hold, for good)
    from .checkpoint import CheckpointError, check_state_dict, load_checkpoint
    from .model import unwrap_state_dict

    try:
        # (not load_checkpoint(safe_globals=...): torch's safe_globals context removes on exit the classes it was
        # given, even those allowed before it, and mmengine's own load afterwards would fail)
        state_dict = unwrap_state_dict(load_checkpoint(path))
        model = model if model is not None else build_model(cfg)
        check_state_dict(model, state_dict, path, hint='test a checkpoint with the config (and --classes) it was '
                                                      'trained with')
    except CheckpointError as e:
        raise SetupError(str(e))


def rescale_tta(cfg) -> Optional[List[Tuple[int, int]]]:
    """Make ``--aug-test``'s scales ``img_ratios`` x the test pipeline's Resize scale (mmseg 0.x's aug-test).

    Applies when the config has ``img_ratios`` and a TestTimeAug whose first step is a list of Resize; returns the
    scales, or ``None`` when the config's TTA is left as it is.
    """
    ratios = cfg.get('img_ratios')
    tta = cfg.get('tta_pipeline')
    ds = dataset_of(cfg.get('test_dataloader'))
    if not ratios or not tta or ds is None:
        return None
    base = next((t['scale'] for t in ds.get('pipeline', []) if t.get('type') == 'Resize' and t.get('scale')), None)
    aug = next((t for t in tta if t.get('type') == 'TestTimeAug'), None)
    if base is None or aug is None or not all(t.get('type') == 'Resize' for t in aug['transforms'][0]):
        return None
    base = (base, base) if isinstance(base, int) else tuple(base)
    scales = [(int(base[0] * r), int(base[1] * r)) for r in ratios]
    aug['transforms'][0] = [dict(type='Resize', scale=s, keep_ratio=True) for s in scales]
    return scales


_DET_METRICS = ('bbox', 'segm', 'proposal', 'proposal_fast')
_SEG_METRICS = ('mIoU', 'mDice', 'mFscore')


def select_metrics(cfg, names: Sequence[str]) -> str:
    """``--eval`` of the old command lines, checked against the config's test evaluator; returns a note to log.

    Detection: ``mAP`` means the evaluator's metrics; ``bbox`` / ``segm`` select among them. Segmentation:
    ``mIoU``, ``mDice``, ``mFscore`` set IoUMetric's ``iou_metrics``.
    """
    ev = cfg.test_evaluator
    evs = list(ev) if isinstance(ev, (list, tuple)) else [ev]
    if task_of(cfg) == 'det':
        coco = [e for e in evs if 'metric' in e]
        have = []
        for e in coco:
            have += [e['metric']] if isinstance(e['metric'], str) else list(e['metric'])
        wanted = [n for n in names if n != 'mAP']
        wrong = [n for n in wanted if n not in have]
        if wrong:
            raise SetupError(f'--eval {" ".join(wrong)}: this config evaluates {", ".join(have) or "nothing"} '
                             f'(choose from mAP, {", ".join(have)})')
        if wanted:
            for e in coco:
                e['metric'] = wanted if len(wanted) > 1 else wanted[0]
        return f'COCO {", ".join(wanted or have)} mAP'
    wrong = [n for n in names if n not in _SEG_METRICS]
    if wrong:
        raise SetupError(f'--eval {" ".join(wrong)}: segmentation evaluates {", ".join(_SEG_METRICS)}')
    for e in evs:
        if 'iou_metrics' in e or e.get('type') == 'IoUMetric':
            e['iou_metrics'] = list(names) or ['mIoU']
    return ', '.join(names)


def score_threshold(cfg) -> Tuple[Optional[str], Optional[float]]:
    """(config key, value) of the detector's test score threshold."""
    test_cfg = cfg.model.get('test_cfg') or {}
    if 'rcnn' in test_cfg:
        return 'model.test_cfg.rcnn.score_thr', test_cfg['rcnn'].get('score_thr')
    if 'score_thr' in test_cfg:
        return 'model.test_cfg.score_thr', test_cfg['score_thr']
    return None, None


def set_score_threshold(cfg, value: float):
    key, _ = score_threshold(cfg)
    if key is None:
        raise SetupError('--score-thr: the config has no model.test_cfg score_thr')
    node = cfg.model.test_cfg
    if key.endswith('rcnn.score_thr'):
        node = node.rcnn
    node['score_thr'] = value
