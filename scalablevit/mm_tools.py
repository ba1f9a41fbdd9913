"""The train/test command lines shared by ``detection/`` and ``segmentation/`` (mmengine Runner).

``detection/train.py`` and ``segmentation/train.py`` are a few lines each around :func:`train_main` and
:func:`test_main`; the task-specific part (which registry scope, extra test options) is passed in.

What these add to mmdet's and mmseg's own ``tools/train.py`` / ``tools/test.py``:

* the same config runs on CPU with no edits (gloo, DDP without device ids, SyncBN over gloo; see
  :func:`adapt_cfg_to_device` and :mod:`scalablevit.mm_compat`, the one module of compatibility patches);
* your own data set: ``--data-root DIR``, ``--classes a,b,c``, ``--no-pretrained``, with start-up checks that name
  the problem in one line (:mod:`scalablevit.mm_data`); ``test.py`` refuses a checkpoint that does not fit the
  config's model and says so when a detector found nothing above its score threshold (``--score-thr``);
* the original release's old flags are accepted: ``--eval mAP`` / ``--eval mIoU`` (3.x/1.x evaluate with the config's
  ``test_evaluator``; the flag is noted, not an error) and ``--aug-test`` (= ``--tta``);
* work dirs default to ``<task>/work_dirs/<config name>`` whatever the current directory;
* training at the user's scale: ``--grad-accum-steps N`` (``optim_wrapper.accumulative_counts``, iteration counts
  read as optimizer steps), ``--amp-dtype bfloat16``, ``--tensorboard``, the effective batch in the log; test
  pictures with ``--show-dir`` (mmdet's / mmseg's visualization hooks); see :func:`_apply_scale_args`;
* a missing config, checkpoint or data folder, or mmcv without its compiled ops, is a one-line error, printed by
  one process under torchrun (``tools/dist_run.sh`` runs the checks once with ``--preflight`` before starting the
  processes).
"""
import argparse
import logging
import os
import os.path as osp
import sys
import time
from typing import Callable, List, Optional, Sequence

__all__ = ['check_mm_stack', 'train_main', 'test_main', 'load_config']

_logger = logging.getLogger('scalablevit.mm_tools')
_REPORTED = 3  # exit status under torchrun of an error already printed by rank 0 (tools/torchrun.py)


class SetupError(SystemExit):
    """A user-facing error: Python prints the message alone (no traceback) and exits with status 1."""

    def __init__(self, msg: str):
        super().__init__(f'error: {msg}')


def _one_line_errors(main: Callable) -> Callable:
    """A :class:`SetupError` (or a checkpoint that cannot be read or does not fit) ends the command with one line,
    printed by the process of rank 0 only; the others exit with status 1 silently. Either way the process group,
    if any, is torn down before the interpreter exits."""
    import functools

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        from .checkpoint import CheckpointError
        try:
            result = main(*args, **kwargs)
            if os.environ.get('SCALABLEVIT_PREFLIGHT_DONE') and int(os.environ.get('WORLD_SIZE', '1')) > 1:
                _close_process_group()
                _exit_without_teardown()
            return result
        except (SetupError, CheckpointError) as e:
            error = e if isinstance(e, SetupError) else SetupError(str(e))
            if 'RANK' not in os.environ:  # one process
                raise error from None
            # under torchrun (tools/torchrun.py): rank 0 prints, and all exit with the status meaning "reported"
            if os.environ['RANK'] == '0':
                print(error.code, file=sys.stderr, flush=True)
            else:
                time.sleep(2)  # let rank 0 print before torchrun stops it
            raise SystemExit(_REPORTED) from None
        finally:
            _close_process_group()
    return wrapper


def _exit_without_teardown():
    """End a worker process of ``tools/dist_run.sh`` that finished its work: Python's exit handlers run (log files
    are flushed and closed), the interpreter's teardown of C++ objects does not. On CPU over gloo, 2 of about 15
    finished 2-process runs in two CI runs died in that teardown ('terminate called without an active exception',
    status -6) after writing their results, also with the process group destroyed first; 24 runs of the same
    command outside the test suite never showed it."""
    import atexit
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _close_process_group():
    """Destroy the default process group, which mmengine makes and leaves, as classification's main.py does.
    (It did not stop the exit crash that :func:`_exit_without_teardown` works around.)"""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


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
    # tools/dist_run.sh: check the command line, config, data and checkpoint in one process, then exit
    parser.add_argument('--preflight', action='store_true', help=argparse.SUPPRESS)


def load_config(config: str, args: argparse.Namespace, task_dir: str):
    """Config file + command line -> config adapted to the device, with its work dir set."""
    from mmengine.config import Config

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


def adapt_cfg_to_device(cfg, device: Optional[str] = None):
    """Make a GPU config run on CPU when there is no GPU; does nothing on CUDA.

    gloo instead of NCCL, DDP without device ids, and ``SyncBN`` -> ``SyncBNCPU`` (:mod:`scalablevit.mm_compat`:
    the same statistics over all processes, through gloo), so that every process keeps the same BN running
    statistics and validation during training equals testing the saved checkpoint.
    """
    device = device or ('cuda' if __import__('torch').cuda.is_available() else 'cpu')
    if device != 'cpu':
        return cfg
    from . import mm_compat  # noqa: F401  (registers SyncBNCPU)
    cfg.setdefault('env_cfg', {}).setdefault('dist_cfg', {})['backend'] = 'gloo'
    cfg.model_wrapper_cfg = dict(
        type='MMDistributedDataParallel', device_ids=None, broadcast_buffers=False,
        find_unused_parameters=cfg.get('find_unused_parameters', False))

    def _sync_bn_cpu(node):
        if isinstance(node, dict):
            if node.get('type') == 'SyncBN':
                node['type'] = 'SyncBNCPU'
            for v in node.values():
                _sync_bn_cpu(v)
        elif isinstance(node, (list, tuple)):
            for v in node:
                _sync_bn_cpu(v)

    _sync_bn_cpu(cfg.model)
    return cfg


def _checks(cfg, args, loader_keys: Sequence[str], train: bool):
    """The start-up checks of :mod:`scalablevit.mm_data`; the file-reading ones once per launch (see --preflight)."""
    from .mm_data import check_config
    deep = args.preflight or os.environ.get('SCALABLEVIT_PREFLIGHT_DONE') != '1'
    check_config(cfg, loader_keys, train=train, deep=deep)
    return deep


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
        _count_in_optimizer_steps(cfg, args.grad_accum_steps)
        if getattr(args, 'auto_scale_lr', False) and 'base_batch_size' in cfg.get('auto_scale_lr', {}):
            # mmengine scales the lr by processes x batch / base; the effective batch is N times that
            cfg.auto_scale_lr.base_batch_size = cfg.auto_scale_lr.base_batch_size / args.grad_accum_steps
    if args.tensorboard:
        try:
            from torch.utils.tensorboard import SummaryWriter  # noqa: F401
        except ImportError:
            raise SetupError('--tensorboard needs the tensorboard package: pip install tensorboard')
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
    if 'max_iters' in train_cfg:  # IterBasedTrainLoop
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
    from mmengine.logging import print_log
    world, batch, steps = get_world_size(), cfg.train_dataloader.batch_size, args.grad_accum_steps
    print_log(f'effective batch: {world} processes x {batch} images x {steps} accumulation steps = '
              f'{world * batch * steps} images per optimizer step'
              + (f'; the config\'s iteration counts are optimizer steps ({steps} iterations each)'
                 if steps > 1 else ''),
              logger='current')


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


@_one_line_errors
def train_main(argv: Optional[List[str]], task_dir: str, description: str):
    check_mm_stack()
    import scalablevit.mm  # noqa: F401  (registers the backbone)
    import scalablevit.mm_compat  # noqa: F401  (torch 2.14 / CPU fixes for mmengine)
    from scalablevit.mm_data import add_data_args, apply_data_args

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument('config', help='train config file path')
    parser.add_argument('--amp', action='store_true', help='mixed precision training (CUDA)')
    parser.add_argument('--auto-scale-lr', action='store_true', help='scale the lr by the actual batch size')
    parser.add_argument('--resume', nargs='?', type=str, const='auto',
                        help='resume from this checkpoint, or from the latest in the work dir if none is given')
    _scale_args(parser)
    add_data_args(parser, train=True)
    _common_args(parser)
    args = parser.parse_args(argv)

    cfg = load_config(args.config, args, task_dir)
    apply_data_args(cfg, args)
    _apply_scale_args(cfg, args)
    if args.auto_scale_lr:
        if 'auto_scale_lr' not in cfg or 'base_batch_size' not in cfg.auto_scale_lr:
            raise SetupError('--auto-scale-lr: the config has no auto_scale_lr.base_batch_size')
        cfg.auto_scale_lr.enable = True
    if args.resume == 'auto':
        cfg.resume, cfg.load_from = True, None
    elif args.resume is not None:
        if not osp.isfile(args.resume):
            raise SetupError(f'--resume: checkpoint not found: {args.resume}')
        cfg.resume, cfg.load_from = True, args.resume
    _checks(cfg, args, ('train_dataloader', 'val_dataloader'), train=True)
    if args.preflight:
        return None
    runner = _build_runner(cfg)
    _log_effective_batch(cfg, args)
    runner.train()
    return runner


@_one_line_errors
def test_main(argv: Optional[List[str]], task_dir: str, description: str,
              add_args: Optional[Callable] = None, before_test: Optional[Callable] = None,
              check_args: Optional[Callable] = None):
    """``add_args(parser)`` adds task options; ``before_test(runner, args)`` can add metrics (e.g. a dump);
    ``check_args(args)`` checks the task options before anything is built."""
    check_mm_stack()
    import scalablevit.mm  # noqa: F401  (registers the backbone)
    import scalablevit.mm_compat  # noqa: F401  (torch 2.14 / CPU fixes for mmengine)
    from scalablevit import mm_data

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument('config', help='test config file path')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument('--tta', '--aug-test', dest='tta', action='store_true',
                        help="test-time augmentation: the config's tta_model/tta_pipeline (multi-scale + flip)")
    parser.add_argument('--eval', nargs='*', metavar='METRIC',
                        help="the 2.x/0.x command lines' flag, checked against the config's test_evaluator "
                             "(detection: mAP, bbox, segm; segmentation: mIoU, mDice, mFscore)")
    parser.add_argument('--score-thr', type=float, metavar='T',
                        help="detection: keep boxes scoring at least T (the config's model.test_cfg score_thr)")
    mm_data.add_data_args(parser, train=False)
    parser.add_argument('--show-dir', help='draw each test image with its prediction beside the ground truth there')
    if add_args is not None:
        add_args(parser)
    _common_args(parser)
    args = parser.parse_args(argv)

    if check_args is not None:
        check_args(args)
    cfg = load_config(args.config, args, task_dir)
    if not osp.isfile(args.checkpoint):
        raise SetupError(f'checkpoint not found: {args.checkpoint}')
    mm_data.apply_data_args(cfg, args)
    cfg.load_from = args.checkpoint
    eval_note = mm_data.select_metrics(cfg, args.eval) if args.eval is not None else None
    if args.score_thr is not None:
        if mm_data.task_of(cfg) != 'det':
            raise SetupError('--score-thr is for detectors')
        mm_data.set_score_threshold(cfg, args.score_thr)
    if args.show_dir:
        _apply_show_dir(cfg, args.show_dir)
    tta_scales = None
    if args.tta:
        if 'tta_model' not in cfg or 'tta_pipeline' not in cfg:
            raise SetupError(f'--tta/--aug-test: {args.config} defines no tta_model / tta_pipeline')
        tta_scales = mm_data.rescale_tta(cfg)
    deep = _checks(cfg, args, ('test_dataloader',), train=False)
    if deep:
        mm_data.check_checkpoint(cfg, args.checkpoint)
    if args.preflight:
        return None
    if args.tta:
        from mmengine.config import ConfigDict
        cfg.model = ConfigDict(**cfg.tta_model, module=cfg.model)
        cfg.test_dataloader.dataset.pipeline = cfg.tta_pipeline
    runner = _build_runner(cfg)
    from mmengine.logging import print_log
    if eval_note:
        print_log(f'--eval {" ".join(args.eval)}: {eval_note}', logger='current')
    if args.tta and tta_scales:
        print_log(f'--aug-test: scales {tta_scales} (img_ratios x the test scale), each also flipped',
                  logger='current')
    if before_test is not None:
        before_test(runner, args)
    metrics = runner.test()
    if mm_data.task_of(cfg) == 'det' and not any(k.endswith('_mAP') for k in metrics or {}):
        key, thr = mm_data.score_threshold(cfg)
        raise SetupError(f'the detector found no boxes scoring {thr} or more ({key}) in any test image, so there is '
                         f'no mAP; lower the threshold with --score-thr (e.g. --score-thr 0.001) or train longer')
    return metrics

