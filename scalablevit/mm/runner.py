"""The train / test commands of ``detection/`` and ``segmentation/`` (mmengine's Runner), written once for both tasks.

What these add to mmdet's and mmseg's own ``tools/train.py`` / ``tools/test.py``:

* the same config runs on CPU with no edits (:func:`scalablevit.mm.config.adapt_cfg_to_device`);
* your own data set: ``--data-root DIR``, ``--classes a,b,c``, ``--no-pretrained``, with start-up checks that name
  the problem in one line (:mod:`scalablevit.mm.data`); ``test.py`` refuses a checkpoint that does not fit the
  config's model;
* preemption: SIGTERM / SIGUSR1 write a checkpoint and stop with exit status 75; ``--resume`` continues at that
  iteration, mid-epoch too, and falls back to an older checkpoint when the newest cannot be read
  (:mod:`scalablevit.mm.resume`);
* training at the user's scale: ``--grad-accum-steps N``, ``--amp-dtype bfloat16``, ``--compile``,
  ``--tensorboard``, the effective batch in the log; test pictures with ``--show-dir``;
* the original release's old flags: ``--eval mAP`` / ``--eval mIoU`` (checked against the config's evaluator) and
  ``--aug-test`` (= ``--tta``);
* work dirs default to ``<task>/work_dirs/<config name>`` whatever the current directory.

``tools/dist_run.sh`` runs the start-up checks once, in one process (``--preflight``), before starting the
processes; those processes then skip the checks that read files (``SCALABLEVIT_PREFLIGHT_DONE=1``).
"""
import argparse
import logging
import os
import os.path as osp
from typing import List, Optional

from mmengine.config import Config, ConfigDict, DictAction
from mmengine.logging import print_log

from ..cli import check_compile
from ..errors import UserError
from . import data
from .config import build_runner, load_config
from .resume import RESUMABLE_LOOPS, find_resume_checkpoint, unreadable_reason
from .tasks import get_task

__all__ = ['test_main', 'train_main']

PREFLIGHT_DONE = 'SCALABLEVIT_PREFLIGHT_DONE'


def _common_args(parser: argparse.ArgumentParser):
    parser.add_argument('--work-dir', help='where logs and checkpoints go (default: <task>/work_dirs/<config>)')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override config settings, key=value (e.g. train_dataloader.batch_size=4)')
    parser.add_argument('--compile', nargs='?', const='default', default=None, metavar='MODE',
                        help="torch.compile the backbone and neck (MODE: default, reduce-overhead, max-autotune); "
                             "the first iterations compile them (minutes on a CPU); checkpoints stay plain")
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'], default='none')
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0,
                        help='given by torch.distributed.launch; the rank is read from the environment')
    # tools/dist_run.sh: check the command line, config, data and checkpoint in one process, then exit
    parser.add_argument('--preflight', action='store_true', help=argparse.SUPPRESS)


def _load(args: argparse.Namespace, task, task_dir: str) -> Config:
    cfg = load_config(args.config, task_dir, args.cfg_options, args.work_dir, args.launcher)
    task.check_scope(cfg)
    if args.compile:
        check_compile('cuda' if cfg.get('env_cfg', {}).get('dist_cfg', {}).get('backend') == 'nccl' else 'cpu')
    return cfg


COMPILED_PARTS = ('backbone', 'neck')


def _compile(runner, args: argparse.Namespace):
    """``--compile``: the backbone and the neck through ``torch.compile``, in place (``nn.Module.compile``: the state
    dict keeps its names). Not mmengine's ``compile`` option, which compiles the whole ``train_step``: Dynamo (torch
    2.14) fails inside the optimizer step it contains, and the heads' assigners, samplers and losses are
    data-dependent Python that would only break the graph."""
    if not args.compile:
        return
    import torch.nn as nn
    model = runner.model
    while not hasattr(model, 'backbone') and hasattr(model, 'module'):  # DDP, TTA wrappers
        model = model.module
    options = dict(mode=None if args.compile == 'default' else args.compile)
    compiled = []
    for name in COMPILED_PARTS:
        part = getattr(model, name, None)
        if isinstance(part, nn.Module):
            part.compile(**options)
            compiled.append(name)
    print_log(f'--compile {args.compile}: {" and ".join(compiled)} compiled with torch.compile; the first '
              f'iterations compile them (minutes on a CPU)', logger='current')


def _checks(cfg, args, task, loader_keys, train: bool) -> bool:
    """The start-up checks; the ones that read files once per launch (see ``--preflight``). Returns whether those
    ran here."""
    deep = args.preflight or os.environ.get(PREFLIGHT_DONE) != '1'
    data.check_config(cfg, task, loader_keys, train=train, deep=deep)
    return deep


# ---------------------------------------------------------------------------------------------------------------------
# Training at the user's scale

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
        raise UserError(f'--grad-accum-steps must be at least 1, got {args.grad_accum_steps}')
    if args.amp or args.amp_dtype:
        import torch
        if not torch.cuda.is_available():
            raise UserError("--amp / --amp-dtype: mixed precision training needs a GPU (mmengine's AmpOptimWrapper); "
                            'train without the flag on CPU')
        cfg.optim_wrapper.type = 'AmpOptimWrapper'
        cfg.optim_wrapper.loss_scale = 'dynamic'
        if args.amp_dtype is not None:
            cfg.optim_wrapper.dtype = args.amp_dtype
    if args.grad_accum_steps > 1:
        cfg.optim_wrapper.accumulative_counts = args.grad_accum_steps
        _count_in_optimizer_steps(cfg, args.grad_accum_steps)
        if getattr(args, 'auto_scale_lr', False) and 'base_batch_size' in cfg.get('auto_scale_lr', {}):
            # mmengine scales the lr by processes x batch / base; the effective batch is N times that
            cfg.auto_scale_lr.base_batch_size = cfg.auto_scale_lr.base_batch_size / args.grad_accum_steps
    if args.tensorboard:
        try:
            from torch.utils.tensorboard import SummaryWriter  # noqa: F401
        except ImportError:
            raise UserError('--tensorboard needs the tensorboard package: pip install tensorboard')
        backends = list(cfg.visualizer.get('vis_backends') or [])
        if not any(b.get('type') == 'TensorboardVisBackend' for b in backends):
            backends.append(dict(type='TensorboardVisBackend'))
        cfg.visualizer.vis_backends = backends


def _count_in_optimizer_steps(cfg, steps: int):
    """With gradient accumulation, the config's iteration counts mean optimizer steps, as in the recipe it comes
    from: every iteration-based number (``max_iters``, validation and checkpoint intervals, ``by_epoch=False``
    scheduler ``begin``/``end`` such as a 500-iteration warm-up or an 80k poly decay) is multiplied by ``steps``,
    the number of batches per optimizer step. Epoch-based numbers (epochs, ``by_epoch=True`` milestones) stay."""
    train_cfg = cfg.get('train_cfg') or {}
    if 'max_iters' in train_cfg:  # an iteration-based loop
        for key in ('max_iters', 'val_interval', 'val_begin'):
            if key in train_cfg:
                train_cfg[key] = int(train_cfg[key] * steps)
        ckpt = cfg.get('default_hooks', {}).get('checkpoint')
        if ckpt and not ckpt.get('by_epoch', True) and 'interval' in ckpt and ckpt.interval > 0:
            ckpt.interval = int(ckpt.interval * steps)
    schedulers = cfg.get('param_scheduler') or []
    for sched in schedulers if isinstance(schedulers, (list, tuple)) else [schedulers]:
        if sched.get('by_epoch', True):
            continue
        for key in ('begin', 'end'):
            if key in sched and sched[key] < 1e9:  # mmengine's default end is INF
                sched[key] = int(sched[key] * steps)


def _log_effective_batch(cfg, args: argparse.Namespace):
    from mmengine.dist import get_world_size
    world, batch, steps = get_world_size(), cfg.train_dataloader.batch_size, args.grad_accum_steps
    print_log(f'effective batch: {world} processes x {batch} images x {steps} accumulation steps = '
              f'{world * batch * steps} images per optimizer step'
              + (f'; the config\'s iteration counts are optimizer steps ({steps} iterations each)'
                 if steps > 1 else ''),
              logger='current')


# ---------------------------------------------------------------------------------------------------------------------
# Preemption and resuming

def _make_resumable(cfg):
    """mmengine's train loops -> their resumable forms, and a :class:`PreemptionHook` if the config has none (our
    configs have both through their ``_base_``; this covers a config of the user's)."""
    loop = cfg.get('train_cfg') or {}
    if loop.get('type') in RESUMABLE_LOOPS:
        loop['type'] = RESUMABLE_LOOPS[loop['type']]
    hooks = list(cfg.get('custom_hooks') or [])
    if not any(h.get('type') == 'PreemptionHook' for h in hooks):
        hooks.append(dict(type='PreemptionHook'))
    cfg.custom_hooks = hooks


def _apply_resume(cfg, resume: Optional[str]):
    """``--resume`` (the newest readable checkpoint of the work dir) or ``--resume FILE``."""
    if resume is None:
        return
    if resume != 'auto':
        if not osp.isfile(resume):
            raise UserError(f'--resume: checkpoint not found: {resume}')
        reason = unreadable_reason(resume)
        if reason:
            raise UserError(f'--resume: cannot resume from {resume}: {reason}')
        cfg.resume, cfg.load_from = True, resume
        return
    path, bad = find_resume_checkpoint(cfg.work_dir)
    for p, reason in bad:
        print_log(f'--resume: {p} cannot be read ({reason}); '
                  + (f'resuming from {path}, the newest one that can' if path else 'no older checkpoint can be read'),
                  logger='current', level=logging.WARNING)
    if path is None:
        print_log(f'--resume: no checkpoint in {cfg.work_dir}; starting from the beginning', logger='current')
        cfg.resume, cfg.load_from = False, cfg.get('load_from')
    else:
        cfg.resume, cfg.load_from = True, path


# ---------------------------------------------------------------------------------------------------------------------
# The commands

def train_main(argv: Optional[List[str]], task, task_dir: str, description: Optional[str] = None):
    """``train.py`` of ``task`` (``'detection'`` / ``'segmentation'`` or its :mod:`~scalablevit.mm.tasks` object);
    returns the runner, or ``None`` after ``--preflight``."""
    task = get_task(task)
    parser = argparse.ArgumentParser(description=description or f'Train a ScalableViT {task.name} model')
    parser.add_argument('config', help='train config file path')
    parser.add_argument('--amp', action='store_true', help='mixed precision training (CUDA)')
    parser.add_argument('--auto-scale-lr', action='store_true', help='scale the lr by the actual batch size')
    parser.add_argument('--resume', nargs='?', type=str, const='auto',
                        help='resume from this checkpoint, or from the newest readable one in the work dir')
    _scale_args(parser)
    data.add_data_args(parser, train=True)
    _common_args(parser)
    args = parser.parse_args(argv)

    cfg = _load(args, task, task_dir)
    data.apply_data_args(cfg, args, task)
    _apply_scale_args(cfg, args)
    if args.auto_scale_lr:
        if 'auto_scale_lr' not in cfg or 'base_batch_size' not in cfg.auto_scale_lr:
            raise UserError('--auto-scale-lr: the config has no auto_scale_lr.base_batch_size')
        cfg.auto_scale_lr.enable = True
    _make_resumable(cfg)
    _checks(cfg, args, task, ('train_dataloader', 'val_dataloader'), train=True)
    _apply_resume(cfg, args.resume)
    if args.preflight:
        return None
    runner = build_runner(cfg)
    _log_effective_batch(cfg, args)
    _compile(runner, args)
    runner.train()
    return runner


def test_main(argv: Optional[List[str]], task, task_dir: str, description: Optional[str] = None):
    """``test.py`` of ``task``; returns the metrics, or ``None`` after ``--preflight``."""
    task = get_task(task)
    parser = argparse.ArgumentParser(description=description or f'Test a ScalableViT {task.name} model')
    parser.add_argument('config', help='test config file path')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument('--tta', '--aug-test', dest='tta', action='store_true',
                        help="test-time augmentation: the config's tta_model/tta_pipeline (multi-scale + flip)")
    parser.add_argument('--eval', nargs='*', metavar='METRIC',
                        help="the 2.x/0.x command lines' flag, checked against the config's test_evaluator "
                             "(detection: mAP, bbox, segm; segmentation: mIoU, mDice, mFscore)")
    task.add_test_args(parser)
    data.add_data_args(parser, train=False)
    parser.add_argument('--show-dir', help='draw each test image with its prediction beside the ground truth there')
    _common_args(parser)
    args = parser.parse_args(argv)

    cfg = _load(args, task, task_dir)
    if not osp.isfile(args.checkpoint):
        raise UserError(f'checkpoint not found: {args.checkpoint}')
    data.apply_data_args(cfg, args, task)
    cfg.load_from = args.checkpoint
    eval_note = task.select_metrics(cfg, args.eval) if args.eval is not None else None
    task.apply_test_args(cfg, args)
    if args.show_dir:
        _apply_show_dir(cfg, task, args.show_dir)
    tta_scales = None
    if args.tta:
        if 'tta_model' not in cfg or 'tta_pipeline' not in cfg:
            raise UserError(f'--tta/--aug-test: {args.config} defines no tta_model / tta_pipeline')
        tta_scales = data.rescale_tta(cfg)
    if _checks(cfg, args, task, ('test_dataloader',), train=False):
        data.check_checkpoint(cfg, task, args.checkpoint)
    if args.preflight:
        return None
    if args.tta:
        cfg.model = ConfigDict(**cfg.tta_model, module=cfg.model)
        cfg.test_dataloader.dataset.pipeline = cfg.tta_pipeline
    runner = build_runner(cfg)
    if eval_note:
        print_log(f'--eval {" ".join(args.eval)}: {eval_note}', logger='current')
    if args.tta and tta_scales:
        print_log(f'--aug-test: scales {tta_scales} (img_ratios x the test scale), each also flipped',
                  logger='current')
    _compile(runner, args)
    task.before_test(runner, args)
    metrics = runner.test()
    task.check_metrics(cfg, metrics)
    return metrics


def _apply_show_dir(cfg, task, show_dir: str):
    """mmdet's / mmseg's ``--show-dir``: the visualization hook draws each test image's prediction beside its
    ground truth (detection: ``DIR/<image name>``; segmentation, mmseg's layout: ``DIR/vis_data/vis_image/``)."""
    hook = cfg.get('default_hooks', {}).get('visualization')
    if hook is None:
        raise UserError('--show-dir: the config has no default_hooks.visualization (mmdet/mmseg default_runtime)')
    hook.draw = True
    task.show_dir(cfg, hook, osp.abspath(show_dir))  # mmdet's hook would put a relative one under <work dir>/<time>/
    if int(os.environ.get('WORLD_SIZE', 1)) > 1:
        print_log('--show-dir with several processes: mmengine draws on the main process only, so only its share '
                  'of the test images is drawn; run test.py in one process to draw them all',
                  logger='current', level=logging.WARNING)
