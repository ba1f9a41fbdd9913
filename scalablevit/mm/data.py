"""Your own data set in ``detection/`` and ``segmentation/``: ``--data-root`` / ``--classes``, and the start-up checks.

* :func:`add_data_args` / :func:`apply_data_args`: ``--data-root DIR`` sets every dataloader's ``data_root`` and
  every evaluator's ``ann_file``; ``--classes a,b,c`` (or a text file, one name a line) sets every data set's
  ``metainfo.classes`` and every head's ``num_classes`` (not the RPN's); ``--no-pretrained`` trains the backbone
  from scratch.
* :func:`check_config`: one-line errors, before anything is built, for a missing data folder, a head whose
  ``num_classes`` disagrees with the classes, a missing pretrained file, and what the task checks in its data
  (:mod:`scalablevit.mm.tasks`: annotation files and their classes, label values).
* :func:`check_checkpoint`: ``test.py`` refuses a checkpoint whose keys or shapes do not fit the config's model.
* :func:`rescale_tta`: ``--aug-test`` scales as ratios of the test scale.

The task-specific parts are methods of the task objects passed in; this module walks configs and knows no task.
"""
import inspect
import os
import os.path as osp
from typing import Iterator, List, Optional, Sequence, Tuple

from ..checkpoint import check_state_dict
from ..errors import UserError
from ..model import unwrap_state_dict
from .checkpoint import load_mm_checkpoint
from .config import build_model
from .pipelines import ratio_resizes

__all__ = ['LOADERS', 'add_data_args', 'apply_data_args', 'check_checkpoint', 'check_config', 'dataset_of',
           'rescale_tta']

LOADERS = ('train_dataloader', 'val_dataloader', 'test_dataloader')
EVALUATORS = {'val_dataloader': 'val_evaluator', 'test_dataloader': 'test_evaluator'}
HINT = '(see the README, "Data preparation" and "Your own data set"; --data-root DIR points elsewhere)'


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
        raise UserError(f'--classes {value!r}: no class names (give a,b,c or a file with one name a line)')
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise UserError(f'--classes: {", ".join(dup)} given twice')
    return tuple(names)


def dataset_of(loader) -> Optional[dict]:
    """The innermost data set config of a dataloader (through RepeatDataset-like wrappers)."""
    ds = loader.get('dataset') if loader else None
    while ds is not None and 'dataset' in ds:
        ds = ds['dataset']
    return ds


def loaders(cfg, keys: Sequence[str] = LOADERS) -> Iterator[Tuple[str, dict]]:
    """(dataloader key, innermost data set config) of each of ``keys`` the config has."""
    for key in keys:
        ds = dataset_of(cfg.get(key))
        if ds is not None:
            yield key, ds


def evaluators(cfg, key: str) -> List[dict]:
    """The evaluator configs of a dataloader key (``val_dataloader`` -> ``val_evaluator``)."""
    ev = cfg.get(EVALUATORS.get(key, ''))
    if not ev:
        return []
    return list(ev) if isinstance(ev, (list, tuple)) else [ev]


def heads(node, path: str = 'model') -> Iterator[Tuple[str, dict]]:
    """(path, dict) of every config dict under the model with a ``num_classes`` (the RPN's is its own: skipped)."""
    if isinstance(node, dict):
        if 'num_classes' in node and 'rpn_head' not in path:
            yield path, node
        for k, v in node.items():
            yield from heads(v, f'{path}.{k}')
    elif isinstance(node, (list, tuple)):
        for i, v in enumerate(node):
            yield from heads(v, f'{path}.{i}')


def transforms_of_type(node, name: str) -> Iterator[dict]:
    """Every transform of type ``name`` in a pipeline (also inside TestTimeAug)."""
    if isinstance(node, dict):
        if node.get('type') == name:
            yield node
        for v in node.values():
            yield from transforms_of_type(v, name)
    elif isinstance(node, (list, tuple)):
        for v in node:
            yield from transforms_of_type(v, name)


def init_default(cls, name: str, fallback):
    """The default of ``cls.__init__``'s argument ``name``, else ``fallback``."""
    try:
        p = inspect.signature(cls.__init__).parameters.get(name)
    except (TypeError, ValueError):
        return fallback
    return p.default if p is not None and p.default is not inspect.Parameter.empty else fallback


def short(items: Sequence, n: int = 10) -> str:
    items = [str(i) for i in items]
    return ', '.join(items[:n]) + (f', ... ({len(items)} in all)' if len(items) > n else '')


def under(root: str, rel: str) -> str:
    """``rel`` under the data root (as mmengine joins them), or ``rel`` itself when absolute or empty."""
    return rel if not rel or osp.isabs(rel) else osp.join(root or '', rel)


def apply_data_args(cfg, args, task):
    """``--data-root``, ``--classes`` and ``--no-pretrained`` into the config."""
    if getattr(args, 'no_pretrained', False):
        cfg.model.backbone.init_cfg = None
    if args.data_root:
        root = args.data_root if args.data_root.endswith('/') else args.data_root + '/'
        for key, ds in loaders(cfg):
            ds['data_root'] = root
            for ev in evaluators(cfg, key):
                if 'ann_file' in ev and ds.get('ann_file'):
                    ev['ann_file'] = osp.join(root, ds['ann_file'])
    if args.classes:
        classes = parse_classes(args.classes)
        for key, ds in loaders(cfg):
            meta = dict(ds.get('metainfo') or {})
            if len(meta.get('palette', ())) != len(classes):
                meta.pop('palette', None)
            meta['classes'] = classes
            ds['metainfo'] = meta
            task.accept_any_classes(ds)
        for _, head in heads(cfg.model):
            head['num_classes'] = len(classes)
    return cfg


def check_config(cfg, task, loader_keys: Sequence[str], train: bool, deep: bool = True):
    """Raise :class:`UserError` (one line) for the first problem of the config's data, classes and weights.

    ``deep`` also reads the data the task checks (annotation files, label maps); processes started by
    ``tools/dist_run.sh`` skip it, as its one-process check ran it before.
    """
    task.check_scope(cfg)
    seen = set()
    for key, ds in loaders(cfg, loader_keys):
        root = ds.get('data_root', '') or ''
        if root and not osp.isdir(root):
            raise UserError(f'{key}: data_root {root!r} does not exist in {os.getcwd()} {HINT}')
        classes = task.classes_of(ds)
        for path, head in heads(cfg.model):
            if head['num_classes'] != len(classes):
                raise UserError(f'{path}.num_classes is {head["num_classes"]} but {key} has {len(classes)} classes '
                                f'({short(classes)}); --classes sets both')
        task.check_data(cfg, key, ds, classes, deep, seen)
    if train:
        init = (cfg.model.get('backbone') or {}).get('init_cfg')
        ckpt = init.get('checkpoint') if isinstance(init, dict) else None
        if ckpt and not osp.isfile(ckpt):
            raise UserError(f'pretrained backbone weights not found: {ckpt} (in {os.getcwd()}); put the released '
                            f'ImageNet checkpoint there (README, "Pretrained weights"), or train from scratch with '
                            f'--no-pretrained')


def check_checkpoint(cfg, task, path: str, model=None):
    """Refuse a checkpoint whose keys or shapes do not fit the config's model (one line, from
    :func:`scalablevit.checkpoint.check_state_dict`)."""
    state_dict = unwrap_state_dict(load_mm_checkpoint(path))
    model = model if model is not None else build_model(cfg, task)
    check_state_dict(model, state_dict, path, hint='test a checkpoint with the config (and --classes) it was '
                                                  'trained with')


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
    aug['transforms'][0] = ratio_resizes(base, ratios)
    return [t['scale'] for t in aug['transforms'][0]]
