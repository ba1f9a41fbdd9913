"""The train/test command lines shared by ``detection/`` and ``segmentation/`` (mmengine Runner).

``detection/train.py`` and ``segmentation/train.py`` are a few lines each around :func:`train_main` and
:func:`test_main`; the task-specific part (which registry scope, extra test options) is passed in.

What these add to mmdet's and mmseg's own ``tools/train.py`` / ``tools/test.py``:

* the same config runs on CPU with no edits (gloo, DDP without device ids, BN for SyncBN; see
  :func:`scalablevit.mm.adapt_cfg_to_device`);
* the seed README's old flags are accepted: ``--eval mAP`` / ``--eval mIoU`` (3.x/1.x evaluate with the config's
  ``test_evaluator``; the flag is noted, not an error) and ``--aug-test`` (= ``--tta``);
* work dirs default to ``<task>/work_dirs/<config name>`` whatever the current directory;
* a missing config, checkpoint or data folder, or mmcv without its compiled ops, is a one-line error.
"""
import argparse
import logging
import os
import os.path as osp
from typing import Callable, List, Optional, Sequence

__all__ = ['check_mm_stack', 'train_main', 'test_main', 'load_config']

_logger = logging.getLogger('scalablevit.mm_tools')


class SetupError(SystemExit):
    """A user-facing error: Python prints the message alone (no traceback) and exits with status 1."""

    def __init__(self, msg: str):
        super().__init__(f'error: {msg}')


def check_mm_stack():
    """Fail with the fix when the OpenMMLab stack is missing or mmcv has no compiled ops."""
    try:
        import mmcv
        import mmengine  # noqa: F401
    except ImportError as e:
        raise SetupError(f'the OpenMMLab stack is not installed ({e}); run `bash install.sh` in the repository root')
    try:
        import mmcv.ops  # noqa: F401
        from mmcv.ops import nms  # noqa: F401
    except (ImportError, OSError) as e:
        raise SetupError(f'mmcv {mmcv.__version__} has no compiled ops for this torch ({e}); it must be built from '
                         'source: run `bash install.sh` in the repository root (see requirements/mm.txt)')


def _common_args(parser: argparse.ArgumentParser):
    from mmengine.config import DictAction
    parser.add_argument('--work-dir', help='where logs and checkpoints go (default: <task>/work_dirs/<config>)')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override config settings, key=value (e.g. train_dataloader.batch_size=4)')
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'], default='none')
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)


def load_config(config: str, args: argparse.Namespace, task_dir: str):
    """Config file + command line -> config adapted to the device, with its work dir set."""
    from mmengine.config import Config

    from .mm import adapt_cfg_to_device

    if not osp.isfile(config):
        raise SetupError(f'config file not found: {config}')
    if 'LOCAL_RANK' not in os.environ:
        os.environ['LOCAL_RANK'] = str(args.local_rank)
    cfg = Config.fromfile(config)
    cfg.launcher = args.launcher
    if args.cfg_options is not None:
        cfg.merge_from_dict(args.cfg_options)
    if args.work_dir is not None:
        cfg.work_dir = args.work_dir
    elif cfg.get('work_dir', None) is None:
        cfg.work_dir = osp.join(task_dir, 'work_dirs', osp.splitext(osp.basename(config))[0])
    return adapt_cfg_to_device(cfg)


def _check_data(cfg, loader_keys: Sequence[str]):
    """Name the missing data folder before the dataset raises from deep inside."""
    for key in loader_keys:
        loader = cfg.get(key)
        if not loader:
            continue
        ds = loader.get('dataset', {})
        while 'dataset' in ds:  # RepeatDataset / ConcatDataset-like wrappers
            ds = ds['dataset']
        root = ds.get('data_root', '')
        if root and not osp.isdir(root):
            raise SetupError(f'{key}: data_root {root!r} does not exist (see the task README, "Data preparation")')
        ann = ds.get('ann_file')
        if ann:
            path = ann if osp.isabs(ann) else osp.join(root, ann)
            if not osp.exists(path):
                raise SetupError(f'{key}: annotation file {path!r} not found (see the task README)')


def _build_runner(cfg):
    from mmengine.runner import Runner
    if 'runner_type' in cfg:
        from mmengine.registry import RUNNERS
        return RUNNERS.build(cfg)
    return Runner.from_cfg(cfg)


# Training at the user's scale (fewer GPUs: gradient accumulation; bf16), curves for TensorBoard, and pictures of
# test predictions: the flags train.py / test.py add on top of mmengine's config.

def _scale_args(parser: argparse.ArgumentParser):
    parser.add_argument('--amp-dtype', choices=['float16', 'bfloat16'], default=None,
                        help='autocast dtype of --amp (default float16); implies --amp')
    parser.add_argument('--grad-accum-steps', type=int, default=1, metavar='N',
                        help='step the optimizer every N batches (optim_wrapper.accumulative_counts); the effective '
                             'batch is processes x batch size x N, as with N times the processes')
    parser.add_argument('--tensorboard', action='store_true',
                        help="also write the scalars for TensorBoard (mmengine's TensorboardVisBackend, "
                             "<work dir>/<time>/vis_data/)")


def _apply_scale_args(cfg, args: argparse.Namespace):
    if args.grad_accum_steps < 1:
        raise SetupError(f'--grad-accum-steps must be at least 1, got {args.grad_accum_steps}')
    if args.amp or args.amp_dtype:
        import torch
        if not torch.cuda.is_available():
            raise SetupError("--amp / --amp-dtype: mixed precision training needs a GPU (mmengine's AmpOptimWrapper); "
                             'train without the flag on CPU')
        cfg.optim_wrapper.type = 'AmpOptimWrapper'
        cfg.optim_wrapper.loss_scale = 'dynamic'
        if args.amp_dtype is not None:
            cfg.optim_wrapper.dtype = args.amp_dtype
    if args.grad_accum_steps > 1:
        cfg.optim_wrapper.accumulative_counts = args.grad_accum_steps
    if args.tensorboard:
        try:
            from torch.utils.tensorboard import SummaryWriter  # noqa: F401
        except ImportError:
            raise SetupError('--tensorboard needs the tensorboard package: pip install tensorboard')
        backends = list(cfg.visualizer.get('vis_backends') or [])
        if not any(b.get('type') == 'TensorboardVisBackend' for b in backends):
            backends.append(dict(type='TensorboardVisBackend'))
        cfg.visualizer.vis_backends = backends


def _log_effective_batch(cfg, args: argparse.Namespace):
    from mmengine.dist import get_world_size
    from mmengine.logging import print_log
    world, batch, steps = get_world_size(), cfg.train_dataloader.batch_size, args.grad_accum_steps
    print_log(f'effective batch: {world} processes x {batch} images x {steps} accumulation steps = '
              f'{world * batch * steps} images per optimizer step', logger='current')


def _apply_show_dir(cfg, show_dir: str):
    """mmdet's / mmseg's ``--show-dir``: the visualization hook draws each test image's prediction beside its
    ground truth. Detection: ``DIR/<image name>``; segmentation (mmseg's layout): ``DIR/vis_data/vis_image/``."""
    from mmengine.logging import print_log
    hook = cfg.get('default_hooks', {}).get('visualization')
    if hook is None:
        raise SetupError('--show-dir: the config has no default_hooks.visualization (mmdet/mmseg default_runtime)')
    show_dir = osp.abspath(show_dir)  # mmdet's hook would put a relative one under <work dir>/<time>/
    hook.draw = True
    if 'Seg' in str(hook.get('type', '')):
        hook.interval = 1  # every test image (mmseg draws one in 50 by default)
        cfg.visualizer.save_dir = show_dir
    else:
        hook.test_out_dir = show_dir
    if int(os.environ.get('WORLD_SIZE', 1)) > 1:
        print_log('--show-dir with several processes: mmengine draws on the main process only, so only its share '
                  'of the test images is drawn; run test.py in one process to draw them all',
                  logger='current', level=logging.WARNING)


def train_main(argv: Optional[List[str]], task_dir: str, description: str):
    check_mm_stack()
    import scalablevit.mm  # noqa: F401  (registers the backbone, torch/CPU compatibility)

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument('config', help='train config file path')
    parser.add_argument('--amp', action='store_true', help='mixed precision training (CUDA)')
    parser.add_argument('--auto-scale-lr', action='store_true', help='scale the lr by the actual batch size')
    parser.add_argument('--resume', nargs='?', type=str, const='auto',
                        help='resume from this checkpoint, or from the latest in the work dir if none is given')
    _scale_args(parser)
    _common_args(parser)
    args = parser.parse_args(argv)

    cfg = load_config(args.config, args, task_dir)
    _apply_scale_args(cfg, args)
    if args.auto_scale_lr:
        if 'auto_scale_lr' not in cfg or 'base_batch_size' not in cfg.auto_scale_lr:
            raise SetupError('--auto-scale-lr: the config has no auto_scale_lr.base_batch_size')
        cfg.auto_scale_lr.enable = True
        # mmengine scales by processes x batch; the effective batch also counts the accumulated micro-batches
        cfg.auto_scale_lr.base_batch_size = cfg.auto_scale_lr.base_batch_size / args.grad_accum_steps
    if args.resume == 'auto':
        cfg.resume, cfg.load_from = True, None
    elif args.resume is not None:
        if not osp.isfile(args.resume):
            raise SetupError(f'--resume: checkpoint not found: {args.resume}')
        cfg.resume, cfg.load_from = True, args.resume
    _check_data(cfg, ('train_dataloader', 'val_dataloader'))
    runner = _build_runner(cfg)
    _log_effective_batch(cfg, args)
    runner.train()
    return runner


def test_main(argv: Optional[List[str]], task_dir: str, description: str,
              add_args: Optional[Callable] = None, before_test: Optional[Callable] = None):
    """``add_args(parser)`` adds task options; ``before_test(runner, args)`` can add metrics (e.g. a dump)."""
    check_mm_stack()
    import scalablevit.mm  # noqa: F401

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument('config', help='test config file path')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument('--tta', '--aug-test', dest='tta', action='store_true',
                        help="test-time augmentation: the config's tta_model/tta_pipeline (multi-scale + flip)")
    parser.add_argument('--eval', nargs='*', metavar='METRIC',
                        help="accepted for the 2.x/0.x command lines; metrics come from the config's test_evaluator")
    parser.add_argument('--show-dir', help='draw each test image with its prediction beside the ground truth there')
    if add_args is not None:
        add_args(parser)
    _common_args(parser)
    args = parser.parse_args(argv)

    cfg = load_config(args.config, args, task_dir)
    if not osp.isfile(args.checkpoint):
        raise SetupError(f'checkpoint not found: {args.checkpoint}')
    cfg.load_from = args.checkpoint
    if args.eval is not None:
        from mmengine.logging import print_log
        print_log(f'--eval {" ".join(args.eval)}: evaluating with the config\'s test_evaluator '
                  f'({cfg.test_evaluator.get("type", cfg.test_evaluator)}); the flag is kept for old command lines',
                  logger='current', level=logging.WARNING)
    if args.show_dir:
        _apply_show_dir(cfg, args.show_dir)
    if args.tta:
        if 'tta_model' not in cfg or 'tta_pipeline' not in cfg:
            raise SetupError(f'--tta/--aug-test: {args.config} defines no tta_model / tta_pipeline')
        from mmengine.config import ConfigDict
        cfg.model = ConfigDict(**cfg.tta_model, module=cfg.model)
        cfg.test_dataloader.dataset.pipeline = cfg.tta_pipeline
    _check_data(cfg, ('test_dataloader',))
    runner = _build_runner(cfg)
    if before_test is not None:
        before_test(runner, args)
    metrics = runner.test()
    return metrics

