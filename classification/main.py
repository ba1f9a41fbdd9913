"""Train, evaluate and time ScalableViT on ImageNet (or the built-in DIGITS set); DeiT's ``main.py`` layout.

    python main.py --data-set DIGITS ...                                     # one device (CPU or GPU)
    torchrun --nproc_per_node=8 main.py --model scalable_vit_small ...      # or: python -m torch.distributed.launch
    python main.py --eval --resume ./scalable_vit_small/checkpoint_best.pth --model scalable_vit_small ...
    python main.py --throughput --model scalable_vit_small --batch-size 64
    python main.py --batch-size 128 --grad-accum-steps 8 --resume auto ...   # 8 x 128 on one GPU, requeue-safe

See README.md for the full commands and the flags that differ from DeiT.
"""
if __name__ == '__main__':  # first: SIGTERM / SIGUSR1 wait for the stop handler (scalablevit.signals)
    import signal
    signal.pthread_sigmask(signal.SIG_BLOCK, (signal.SIGTERM, signal.SIGUSR1))
import argparse
import dataclasses
import datetime
import difflib
import importlib.util
import inspect
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import timm
import torch
import torch.backends.cudnn as cudnn
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2, list_optimizers
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, RandomSampler, SequentialSampler
from torch.utils.data.distributed import DistributedSampler

import scalablevit  # registers scalable_vit_small/base/large with timm
from scalablevit.cli import AMP_DTYPES, ParseKwargs, amp_dtype, check_compile, check_device, run_command
from scalablevit.errors import StoppedToResume, UserError, met_by_this_process
from scalablevit.info import count_params, describe
from scalablevit.signals import StopOnSignal, ignore_stop_signals

# isort: split
import utils
from datasets import DATA_SETS, build_dataset, checkpoint_meta
from engine import evaluate, throughput, train_one_epoch
from samplers import RASampler, ShardedEvalSampler

_logger = logging.getLogger('main')
FUSED_OPTIMIZERS = ('adamw', 'adam')  # timm names of torch optimizers with fused=True on CPU and CUDA
#: --sched: timm's epoch schedules (its 'plateau' needs a metric, 'none' no schedule: neither is wired here)
SCHEDULERS = ('cosine', 'tanh', 'step', 'multistep', 'poly', 'wsd', 'rsqrt', 'constant')


def _model_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group('Model')
    group.add_argument('--model', default='scalable_vit_small', type=str, metavar='MODEL',
                       help='timm model name (scalable_vit_small/base/large or any timm model)')
    group.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs, metavar='KEY=VALUE',
                       help='extra model arguments as Python literals, e.g. depths=1,1,1,1 mlp_head=False')
    group.add_argument('--input-size', default=None, type=int,
                       help='image size (default: 224; 32 for DIGITS)')
    group.add_argument('--drop', type=float, default=0.0, metavar='PCT', help='dropout rate')
    group.add_argument('--drop-path', type=float, default=0.1, metavar='PCT',
                       help='stochastic depth rate (released: 0.2 for S, 0.5 for B and L)')
    group.add_argument('--model-ema', action='store_true', default=False,
                       help='keep an exponential moving average of the weights and evaluate it too')
    group.add_argument('--no-model-ema', action='store_false', dest='model_ema')
    group.add_argument('--model-ema-decay', type=float, default=0.99996)
    group.add_argument('--model-ema-force-cpu', action='store_true', default=False)
    group.add_argument('--compile', nargs='?', const='default', default=None, metavar='MODE',
                       help='train and evaluate through torch.compile (MODE: default, reduce-overhead, max-autotune); '
                            'the first steps compile (see README, "Compiled training"); checkpoints stay plain')
    group.add_argument('--grad-checkpointing', action='store_true', default=False,
                       help='recompute activations in the backward pass to save memory')


def _optimizer_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group('Optimizer')
    group.add_argument('--opt', default='adamw', type=str, metavar='OPTIMIZER')
    group.add_argument('--opt-eps', default=1e-8, type=float, metavar='EPSILON')
    group.add_argument('--opt-betas', default=None, type=float, nargs='+', metavar='BETA')
    group.add_argument('--fused-opt', action='store_true', default=True,
                       help="torch's fused AdamW / Adam (default; CPU and CUDA): the released update, one kernel "
                            "for all parameters instead of a loop over them")
    group.add_argument('--no-fused-opt', action='store_false', dest='fused_opt')
    group.add_argument('--clip-grad', type=float, default=5.0, metavar='NORM',
                       help='clip the gradient norm (released: 5.0; 0 turns it off)')
    group.add_argument('--momentum', type=float, default=0.9, metavar='M', help='SGD momentum')
    group.add_argument('--weight-decay', type=float, default=0.05)


def _schedule_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group('Learning rate schedule')
    group.add_argument('--sched', default='cosine', type=str, metavar='SCHEDULER')
    group.add_argument('--lr', type=float, default=5e-4, metavar='LR',
                       help='learning rate for a total batch of 512; scaled linearly to the actual total batch')
    group.add_argument('--unscale-lr', action='store_true', help='use --lr as given, without batch scaling')
    group.add_argument('--warmup-lr', type=float, default=1e-6, metavar='LR')
    group.add_argument('--min-lr', type=float, default=1e-5, metavar='LR')
    group.add_argument('--decay-epochs', type=float, default=30, metavar='N', help='for step schedules')
    group.add_argument('--warmup-epochs', type=int, default=5, metavar='N')
    group.add_argument('--decay-rate', '--dr', type=float, default=0.1, metavar='RATE')


def _augmentation_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group('Augmentation (ImageFolder data)')
    group.add_argument('--color-jitter', type=float, default=0.4, metavar='PCT')
    group.add_argument('--aa', type=str, default='rand-m9-mstd0.5-inc1', metavar='NAME',
                       help='timm AutoAugment policy; "none" turns it off')
    group.add_argument('--smoothing', type=float, default=0.1, help='label smoothing')
    group.add_argument('--train-interpolation', type=str, default='bicubic')
    group.add_argument('--repeated-aug', action='store_true', default=False,
                       help="DeiT's repeated augmentation sampler when distributed (off, as released)")
    group.add_argument('--no-repeated-aug', action='store_false', dest='repeated_aug')
    group.add_argument('--reprob', type=float, default=0.25, metavar='PCT', help='random erasing probability')
    group.add_argument('--remode', type=str, default='pixel')
    group.add_argument('--recount', type=int, default=1)
    group.add_argument('--eval-crop-ratio', type=float, default=0.875, help='eval resize = input_size / ratio')


def _mixup_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group('Mixup / CutMix')
    group.add_argument('--mixup', type=float, default=0.8, help='mixup alpha; on when > 0')
    group.add_argument('--cutmix', type=float, default=1.0, help='cutmix alpha; on when > 0')
    group.add_argument('--cutmix-minmax', type=float, nargs='+', default=None)
    group.add_argument('--mixup-prob', type=float, default=1.0)
    group.add_argument('--mixup-switch-prob', type=float, default=0.5)
    group.add_argument('--mixup-mode', type=str, default='batch', choices=('batch', 'pair', 'elem'))


def _run_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group('Data, output, precision, launch')
    group.add_argument('--data-path', default=None, type=str, help='folder holding train/ and val/ (ImageFolder)')
    group.add_argument('--data-set', default='IMNET', choices=DATA_SETS, type=str)
    group.add_argument('--output_dir', default=None,
                       help='where checkpoints and log.txt go (default: ./<model>; "" writes nothing)')
    group.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    group.add_argument('--seed', default=42, type=int)
    group.add_argument('--resume', default='',
                       help='checkpoint (file or URL) to resume from or to --eval; "auto": the newest checkpoint in '
                            '--output_dir if there is one, else a fresh start')
    group.add_argument('--checkpoint-hist', default=0, type=int, metavar='K',
                       help='also keep the last K epochs as checkpoint-<epoch>.pth')
    group.add_argument('--tensorboard', action='store_true',
                       help='write loss, lr and accuracy per epoch as TensorBoard scalars into --output_dir')
    group.add_argument('--finetune', default='', help='checkpoint to start from; a head of another size is dropped')
    group.add_argument('--start_epoch', default=0, type=int, metavar='N')
    group.add_argument('--eval', action='store_true', help='only evaluate (--resume gives the weights)')
    group.add_argument('--throughput', action='store_true', help='only measure inference images/s')
    group.add_argument('--dist-eval', action='store_true', default=False,
                       help='shard evaluation over the processes (default: every process evaluates all)')
    group.add_argument('--num_workers', default=10, type=int)
    group.add_argument('--pin-mem', action='store_true', default=False,
                       help='pin host memory for faster transfers to the GPU (off, as released)')
    group.add_argument('--no-pin-mem', action='store_false', dest='pin_mem')
    group.add_argument('--amp', action='store_true', default=None,
                       help='mixed precision (default: on for CUDA, off on CPU)')
    group.add_argument('--no-amp', action='store_false', dest='amp')
    group.add_argument('--amp-dtype', default=None, choices=tuple(AMP_DTYPES),
                       help='autocast dtype (default: float16 with loss scaling on CUDA, bfloat16 on CPU)')
    group.add_argument('--print-freq', default=10, type=int, help='progress line every N steps')
    group.add_argument('--world_size', default=1, type=int, help='set by the launcher')
    group.add_argument('--dist_url', default='env://', help='process group rendezvous')
    group.add_argument('--local-rank', '--local_rank', default=None, type=int,
                       help='set by torch.distributed.launch without --use_env')


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser('ScalableViT training and evaluation', add_help=False)
    parser.add_argument('--batch-size', default=64, type=int,
                        help='images per process per forward pass (the micro-batch with --grad-accum-steps)')
    parser.add_argument('--epochs', default=300, type=int)
    parser.add_argument('--grad-accum-steps', default=1, type=int, metavar='N',
                        help='step the optimizer every N batches: effective batch = batch size x processes x N')
    _model_args(parser)
    _optimizer_args(parser)
    _schedule_args(parser)
    _augmentation_args(parser)
    _mixup_args(parser)
    _run_args(parser)
    return parser


def check_args(args: argparse.Namespace):
    """Input problems that can be found from the command line alone, before any data is scanned or model built.

    Raises :class:`UserError` with one line naming the problem and the fix.
    """
    if args.input_size is None:
        args.input_size = 32 if args.data_set == 'DIGITS' else 224
    if args.output_dir is None:
        args.output_dir = f'./{args.model}'
    for flag, value, low in (('--batch-size', args.batch_size, 1), ('--epochs', args.epochs, 1),
                             ('--grad-accum-steps', args.grad_accum_steps, 1), ('--input-size', args.input_size, 1),
                             ('--num_workers', args.num_workers, 0), ('--checkpoint-hist', args.checkpoint_hist, 0)):
        if value < low:
            raise UserError(f'{flag} must be at least {low}, got {value}')
    check_device('--device', args.device)
    check_choice('--opt', args.opt.lower().split('_')[-1], list_optimizers(), 'timm optimizer',
                 f'timm.optim.list_optimizers() names all {len(list_optimizers())} (e.g. adamw, sgd, lamb, lion)')
    check_choice('--sched', args.sched, SCHEDULERS, 'schedule')
    if not timm.is_model(args.model):
        close = difflib.get_close_matches(args.model, timm.list_models(), n=3)
        hint = f'did you mean {", ".join(close)}?' if close else 'see timm.list_models()'
        raise UserError(f'--model {args.model}: no such timm model; {hint}')
    check_model_kwargs(args.model, args.model_kwargs)
    training = not (args.eval or args.throughput)
    mixup_active = args.mixup > 0 or args.cutmix > 0. or args.cutmix_minmax is not None
    if training and mixup_active and args.batch_size % 2:
        raise UserError(f'mixup/cutmix pair the images of a batch: --batch-size must be even, got '
                               f'{args.batch_size} (or turn them off with --mixup 0 --cutmix 0)')
    for flag, path in (('--resume', args.resume), ('--finetune', args.finetune)):
        if path and path != 'auto' and not path.startswith(('https://', 'http://')) and not os.path.isfile(path):
            raise UserError(f'{flag} {path}: checkpoint not found')
    if args.finetune == 'auto':
        raise UserError('--finetune auto: give a checkpoint file (only --resume takes "auto")')
    if args.resume == 'auto' and not args.output_dir:
        raise UserError('--resume auto looks for checkpoints in --output_dir; give one')
    if args.resume == 'auto' and not training:
        raise UserError('--resume auto is for training; give --eval a checkpoint file')
    if args.output_dir and training:
        check_output_dir(args.output_dir)
    if args.compile:
        check_compile('cuda' if str(args.device).startswith('cuda') else 'cpu')
    if args.tensorboard and importlib.util.find_spec('tensorboard') is None:
        raise UserError('--tensorboard needs the tensorboard package: pip install tensorboard')
    if args.data_set == 'IMNET' and not args.throughput:
        if args.data_path is None:
            raise UserError('--data-path is required for --data-set IMNET (a folder with train/ and val/)')
        if not os.path.isdir(args.data_path):
            raise UserError(f'--data-path {args.data_path} is not a folder; expected {args.data_path}/train/'
                                   f'<class>/<image> and {args.data_path}/val/<class>/<image> (the ImageFolder layout)')


def check_choice(flag: str, value: str, choices, what: str, listing: str = ''):
    """A :class:`UserError` naming the nearest of ``choices`` and listing them (or where ``listing`` says they are)
    when ``value`` is not one of them."""
    choices = list(choices)
    if value in choices:
        return
    close = difflib.get_close_matches(value, choices, n=1)
    hint = f'did you mean {close[0]}? ' if close else ''
    raise UserError(f'{flag} {value}: no such {what}; {hint}{listing or "choose one of " + ", ".join(choices)}')


def check_model_kwargs(model_name: str, kwargs: dict):
    """``--model-kwargs`` names that a ScalableViT does not take (other timm models are checked when built)."""
    if not kwargs or not model_name.startswith('scalable_vit'):
        return
    params = inspect.signature(scalablevit.ScalableViT).parameters
    if any(p.kind == p.VAR_KEYWORD for p in params.values()):
        return
    names = [n for n in params if n not in ('num_classes', 'drop_rate', 'drop_path_rate')]
    known = set(names) | {'features_only', 'out_indices', 'feature_cfg', 'pretrained_cfg', 'pretrained_cfg_overlay'}
    unknown = [k for k in kwargs if k not in known]
    if unknown:
        close = difflib.get_close_matches(unknown[0], names, n=1)
        hint = f' (did you mean {close[0]}?)' if close else ''
        raise UserError(f'--model-kwargs: {model_name} takes no argument {", ".join(unknown)}{hint}; '
                               f'it takes {", ".join(names)}')


def check_output_dir(output_dir: str):
    """``output_dir`` can be created (it is created only when the first file is written)."""
    path = Path(output_dir).absolute()
    for folder in (path, *path.parents):
        if folder.exists():
            if not folder.is_dir():
                raise UserError(f'--output_dir {output_dir}: {folder} is a file, not a folder; '
                                       f'choose another --output_dir')
            if not os.access(folder, os.W_OK | os.X_OK):
                raise UserError(f'--output_dir {output_dir}: no permission to write in {folder}; '
                                       f'choose another --output_dir')
            return


def create_model(args: argparse.Namespace) -> torch.nn.Module:
    try:
        return timm.create_model(args.model, pretrained=False, num_classes=args.nb_classes, drop_rate=args.drop,
                                 drop_path_rate=args.drop_path, **args.model_kwargs)
    except TypeError as e:
        if 'unexpected keyword argument' not in str(e):
            raise
        raise UserError(f'--model-kwargs: {args.model} does not take one of {", ".join(args.model_kwargs)} '
                               f'({e})') from e


def resolve_amp(args: argparse.Namespace, device: torch.device):
    """The autocast dtype, or None for full precision."""
    use_amp = args.amp if args.amp is not None else device.type == 'cuda'
    if not use_amp:
        return None
    return amp_dtype(args.amp_dtype, device)


def build_loaders(args: argparse.Namespace):
    dataset_train, args.nb_classes = build_dataset(is_train=True, args=args)
    dataset_val, nb_val = build_dataset(is_train=False, args=args)
    world, rank = utils.get_world_size(), utils.get_rank()
    if args.distributed:
        if args.repeated_aug:
            sampler_train = RASampler(dataset_train, num_replicas=world, rank=rank, shuffle=True, seed=args.seed)
        else:
            sampler_train = DistributedSampler(dataset_train, num_replicas=world, rank=rank, shuffle=True,
                                               seed=args.seed)
    else:
        sampler_train = RandomSampler(dataset_train)
    if args.distributed and args.dist_eval:
        sampler_val = ShardedEvalSampler(dataset_val, num_replicas=world, rank=rank)
    else:
        sampler_val = SequentialSampler(dataset_val)
    pin = args.pin_mem and args.device.startswith('cuda')
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else (os.cpu_count() or 1)
    if args.num_workers > cpus:
        _logger.info(f'--num_workers {args.num_workers}: this machine has {cpus} CPUs for this process; using {cpus}')
        args.num_workers = cpus
    loader_train = DataLoader(dataset_train, sampler=sampler_train, batch_size=args.batch_size,
                              num_workers=args.num_workers, pin_memory=pin, drop_last=True,
                              worker_init_fn=ignore_stop_signals)
    if len(loader_train) == 0 and not (args.eval or args.throughput):
        raise UserError(f'{len(sampler_train)} training images per process is less than one batch of '
                               f'{args.batch_size}; lower --batch-size')
    loader_val = DataLoader(dataset_val, sampler=sampler_val, batch_size=args.batch_size,
                            num_workers=args.num_workers, pin_memory=pin, drop_last=False,
                            worker_init_fn=ignore_stop_signals)
    _logger.info(f'data: {args.data_set}, {len(dataset_train)} train / {len(dataset_val)} val images, '
                 f'{args.nb_classes} classes')
    return loader_train, loader_val


def load_finetune(model: torch.nn.Module, path: str):
    """Weights from ``path`` into ``model``; head tensors that do not fit (another class count or head type) are
    dropped with a message and train from scratch. Any other mismatch is an error naming the keys."""
    checkpoint = utils.load_checkpoint(path)
    if isinstance(model, scalablevit.ScalableViT):
        state_dict = scalablevit.checkpoint_filter_fn(checkpoint, model)
    else:
        state_dict = scalablevit.unwrap_state_dict(checkpoint)
    own = model.state_dict()
    state_dict = {k: v for k, v in state_dict.items()
                  if not (k.startswith('head.') and (k not in own or v.shape != own[k].shape))}
    new_head = sorted(k for k in own if k.startswith('head.') and k not in state_dict)
    if new_head:
        _logger.info(f'finetune: the head of {path} does not fit the model ({getattr(model, "num_classes", "?")} '
                     f'classes); {", ".join(new_head)} start from scratch')
    utils.load_model_weights(model, state_dict, path, allow_missing=new_head)
    _logger.info(f'finetune: loaded {len(state_dict)} tensors from {path}')


def compiled(model: torch.nn.Module, args: argparse.Namespace) -> torch.nn.Module:
    """``model`` through ``torch.compile`` with ``--compile``'s mode, else ``model``."""
    if not args.compile:
        return model
    _logger.info(f'--compile {args.compile}: the first training and evaluation steps compile the model')
    return torch.compile(model, mode=None if args.compile == 'default' else args.compile)


def step_seeder(args: argparse.Namespace, epoch: int):
    """Re-seeds the RNGs before each batch from (seed, rank, epoch, step), for exact resume within an epoch."""
    rank = utils.get_rank()

    def seed_step(step: int):
        utils.seed_all(args.seed + rank + 10007 * (epoch + 1) + 1000003 * (step + 1))
    return seed_step


# ---------------------------------------------------------------------------------------------------------------------
# The steps of main()

def set_up(args: argparse.Namespace) -> Tuple[torch.device, Optional[torch.dtype]]:
    """Check the command line, join the process group, seed; returns the device and the autocast dtype."""
    check_args(args)
    utils.init_distributed_mode(args)
    if not utils.is_main_process():
        logging.getLogger().setLevel(logging.WARNING)
    _logger.info(' '.join(sys.argv))
    device = torch.device(args.device)
    utils.seed_all(args.seed + utils.get_rank())
    cudnn.benchmark = True
    return device, resolve_amp(args, device)


def build_model(args: argparse.Namespace, device: torch.device) -> Tuple[torch.nn.Module, Optional[ModelEmaV3]]:
    """The model (``--finetune`` weights loaded) on ``device``, and its EMA with ``--model-ema``."""
    _logger.info(f'creating model {args.model}')
    model = create_model(args)
    if args.finetune:
        load_finetune(model, args.finetune)
    if args.grad_checkpointing:
        model.set_grad_checkpointing(True)
    if utils.is_main_process():
        _logger.info(f'{args.model}: {describe(model, args.input_size)}')
    model.to(device)
    model_ema = None
    if args.model_ema and not args.throughput:
        model_ema = ModelEmaV3(model, decay=args.model_ema_decay,
                               device=torch.device('cpu') if args.model_ema_force_cpu else None)
    return model, model_ema


def measure_throughput(args: argparse.Namespace, model: torch.nn.Module, device: torch.device,
                       amp_dtype: Optional[torch.dtype]) -> dict:
    """``--throughput``: inference images/s on random input."""
    stats = throughput(compiled(model, args), device, args.batch_size, args.input_size, amp_dtype)
    dtype = str(amp_dtype or torch.float32).replace('torch.', '')
    _logger.info(f'throughput: {stats["images_per_s"]:.1f} images/s ({args.model}, batch {args.batch_size} at '
                 f'{args.input_size}x{args.input_size}, device {device} '
                 f'[{torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}], dtype {dtype}, '
                 f'median of {stats["repeats"]} batches)')
    return stats


@dataclasses.dataclass
class Training:
    """What the loop works with; ``model`` is the one to call (DDP, compiled), ``model_without_ddp`` the one saved."""
    model: torch.nn.Module
    model_without_ddp: torch.nn.Module
    model_ema: Optional[ModelEmaV3]
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    lr_scheduler: Any
    criterion: torch.nn.Module
    mixup_fn: Optional[Mixup]
    n_parameters: int
    max_accuracy: float = -1.0  # the first evaluation is always a new best
    start_step: int = 0  # micro-batches of args.start_epoch already trained (a checkpoint saved mid-epoch)


def build_training(args: argparse.Namespace, model: torch.nn.Module, model_ema: Optional[ModelEmaV3],
                   device: torch.device, amp_dtype: Optional[torch.dtype]) -> Training:
    """DDP and ``--compile`` around the model, the lr scaled to the effective batch, optimizer, loss scaler,
    scheduler, mixup and the loss."""
    model_without_ddp = model
    if args.distributed:
        model = DistributedDataParallel(model, device_ids=[args.gpu] if device.type == 'cuda' else None)
    n_parameters = count_params(model, trainable_only=True)
    # Compiled around DDP (its graph breaks at the gradient buckets); checkpoints come from model_without_ddp, so
    # they hold the plain state dict. The EMA copy stays eager.
    model = compiled(model, args)

    world = utils.get_world_size()
    effective_batch = args.batch_size * world * args.grad_accum_steps
    if not args.unscale_lr:
        args.lr = args.lr * effective_batch / 512.0
    _logger.info(f'lr {args.lr:.3g} for an effective batch of {effective_batch} ({args.batch_size} per process x '
                 f'{world} processes x {args.grad_accum_steps} accumulation steps)')
    opt_kwargs = dict(eps=args.opt_eps) if args.opt_eps is not None else {}
    if args.opt_betas is not None:
        opt_kwargs['betas'] = tuple(args.opt_betas)
    if args.fused_opt and args.opt.lower() in FUSED_OPTIMIZERS:
        opt_kwargs['fused'] = True  # one kernel over all parameters; the same update to float rounding
    optimizer = create_optimizer_v2(model_without_ddp, opt=args.opt, lr=args.lr, weight_decay=args.weight_decay,
                                    momentum=args.momentum, **opt_kwargs)
    lr_scheduler, _ = create_scheduler_v2(optimizer, sched=args.sched, num_epochs=args.epochs,
                                          decay_epochs=args.decay_epochs, decay_rate=args.decay_rate,
                                          min_lr=args.min_lr, warmup_lr=args.warmup_lr,
                                          warmup_epochs=args.warmup_epochs)
    mixup_fn = None
    if args.mixup > 0 or args.cutmix > 0. or args.cutmix_minmax is not None:
        mixup_fn = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                         prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                         label_smoothing=args.smoothing, num_classes=args.nb_classes)
    if mixup_fn is not None:
        criterion = SoftTargetCrossEntropy()  # smoothing is inside the mixed targets
    elif args.smoothing > 0.:
        criterion = LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    else:
        criterion = torch.nn.CrossEntropyLoss()
    return Training(model, model_without_ddp, model_ema, optimizer,
                    torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16), lr_scheduler, criterion,
                    mixup_fn, n_parameters)


def load_weights(path: str, model: torch.nn.Module, model_ema: Optional[ModelEmaV3]) -> Dict[str, Any]:
    """``--resume`` / ``--eval``'s weights (and the EMA's) from ``path``, strictly; returns the checkpoint."""
    checkpoint = utils.load_checkpoint(path)
    utils.load_model_weights(model, scalablevit.unwrap_state_dict(checkpoint), path)
    if model_ema is not None:
        if 'model_ema' in checkpoint:
            utils.load_model_weights(model_ema.module, scalablevit.unwrap_state_dict(checkpoint['model_ema']),
                                     f'{path} (model_ema)')
        else:
            _logger.warning(f'{path} has no model_ema; the EMA starts from the loaded weights')
            model_ema.module.load_state_dict(model.state_dict())
    return checkpoint


def resume_training(args: argparse.Namespace, training: Training, path: str):
    """The weights, and the optimizer, scheduler, scaler, epoch and step of a training checkpoint (a weights-only
    file resumes the weights alone)."""
    checkpoint = load_weights(path, training.model_without_ddp, training.model_ema)
    if not all(k in checkpoint for k in ('optimizer', 'lr_scheduler', 'epoch')):
        return
    training.optimizer.load_state_dict(checkpoint['optimizer'])
    training.lr_scheduler.load_state_dict(checkpoint['lr_scheduler'])
    args.start_epoch = checkpoint['epoch'] + 1
    training.start_step = int(checkpoint.get('resume_step', 0))
    if 'scaler' in checkpoint:
        training.scaler.load_state_dict(checkpoint['scaler'])
    training.max_accuracy = checkpoint.get('max_accuracy', -1.0)
    where = f', step {training.start_step}' if training.start_step else ''
    _logger.info(f'resumed {path} at epoch {args.start_epoch}{where}')


def evaluate_only(args: argparse.Namespace, model: torch.nn.Module, model_ema: Optional[ModelEmaV3],
                  loader_val: DataLoader, device: torch.device, amp_dtype: Optional[torch.dtype]) -> dict:
    """``--eval``: top-1/top-5 of the model (and its EMA) on the validation set."""
    with met_by_this_process():
        test_stats, _ = evaluate_with_ema(args, compiled(model, args), model_ema, loader_val, device, amp_dtype)
    return test_stats


def evaluate_with_ema(args: argparse.Namespace, model: torch.nn.Module, model_ema: Optional[ModelEmaV3],
                      loader_val: DataLoader, device: torch.device, amp_dtype: Optional[torch.dtype]
                      ) -> Tuple[dict, Optional[dict]]:
    """Top-1/top-5 of the model and of its EMA (``None`` without one) on the validation set, each logged."""
    dist_eval = args.distributed and args.dist_eval
    stats = []
    for name, net in [('network', model)] + ([('EMA', model_ema.module)] if model_ema is not None else []):
        stats.append(evaluate(loader_val, net, device, amp_dtype, dist_eval, args.print_freq))
        _logger.info(f'Accuracy of the {name} on the {stats[-1]["count"]} test images: {stats[-1]["acc1"]:.2f}%')
    return stats[0], (stats[1] if len(stats) > 1 else None)


def make_checkpoint(args: argparse.Namespace, training: Training, loader_val: DataLoader, epoch: int,
                    **extra) -> dict:
    """Everything resuming needs after ``epoch`` (``-1``: before the first), and what ``predict.py`` needs."""
    checkpoint = {
        'model': training.model_without_ddp.state_dict(),
        'optimizer': training.optimizer.state_dict(),
        'lr_scheduler': utils.plain(training.lr_scheduler.state_dict()),
        'scaler': training.scaler.state_dict(),
        'epoch': epoch,
        'max_accuracy': training.max_accuracy,
        'args': utils.plain(vars(args)),
        'meta': checkpoint_meta(args, loader_val.dataset),
        **extra,
    }
    if training.model_ema is not None:
        checkpoint['model_ema'] = training.model_ema.module.state_dict()
    return checkpoint


def save_epoch(args: argparse.Namespace, training: Training, loader_val: DataLoader, epoch: int, is_best: bool,
               log_stats: dict, output_dir: Path):
    """After an epoch (main process): checkpoint.pth, checkpoint_best.pth, the ``--checkpoint-hist`` copies, a JSON
    line in log.txt."""
    path = output_dir / 'checkpoint.pth'
    utils.save_checkpoint(make_checkpoint(args, training, loader_val, epoch), str(path))
    if is_best:
        utils.copy_checkpoint(path, output_dir / 'checkpoint_best.pth')
    if args.checkpoint_hist:
        utils.copy_checkpoint(path, output_dir / f'checkpoint-{epoch}.pth')
        utils.prune_checkpoints(output_dir, args.checkpoint_hist)
    utils.write_text(output_dir / 'log.txt', json.dumps(log_stats) + '\n')


def train_and_evaluate_epoch(args: argparse.Namespace, training: Training, loaders: Tuple[DataLoader, DataLoader],
                             epoch: int, device: torch.device, amp_dtype: Optional[torch.dtype],
                             stop: StopOnSignal) -> Optional[dict]:
    """One epoch and its evaluation; returns its log line, or ``None`` when a signal stopped it mid-epoch (then
    ``stop.step`` is the micro-batches done)."""
    loader_train, loader_val = loaders
    # Seed per epoch (sampler order, loader workers) and per step (augmentation, mixup, dropout), so that a resumed
    # run, even one resumed mid-epoch, draws the same numbers as an uninterrupted one.
    utils.seed_all(args.seed + utils.get_rank() + 10007 * (epoch + 1))
    if args.distributed:
        loader_train.sampler.set_epoch(epoch)
    train_stats = train_one_epoch(training.model, training.criterion, loader_train, training.optimizer, device, epoch,
                                  training.scaler, amp_dtype, args.clip_grad, training.model_ema, training.mixup_fn,
                                  args.print_freq, args.grad_accum_steps, training.start_step,
                                  step_seeder(args, epoch), stop)
    training.start_step = 0
    if stop.step is not None:
        return None
    training.lr_scheduler.step(epoch)
    test_stats, ema_stats = evaluate_with_ema(args, training.model, training.model_ema, loader_val, device,
                                              amp_dtype)
    log_stats = {**{f'train_{k}': v for k, v in train_stats.items()},
                 **{f'test_{k}': v for k, v in test_stats.items()},
                 'epoch': epoch, 'n_parameters': training.n_parameters}
    if ema_stats is not None:
        log_stats.update({f'test_ema_{k}': v for k, v in ema_stats.items()})
    return log_stats


def train(args: argparse.Namespace, training: Training, loaders: Tuple[DataLoader, DataLoader],
          device: torch.device, amp_dtype: Optional[torch.dtype], stop: StopOnSignal) -> dict:
    """The epochs from ``args.start_epoch``; raises :class:`StoppedToResume` after saving when a signal came."""
    output_dir = Path(args.output_dir) if args.output_dir else None
    resume_hint = 'rerun with --resume auto to continue from there' if output_dir else '(no --output_dir: not saved)'
    if stop.requested(device):
        raise StoppedToResume(f'stopped by {stop.received} before training began; nothing new to save; run the '
                              f'same command again')
    # As released (DeiT's loop): epoch e trains at the schedule's value for e - 1 (the scheduler steps to `epoch`
    # after each epoch, never before the first), so epochs 0 and 1 both run at the warm-up start.
    training.lr_scheduler.step(max(args.start_epoch - 1, 0))
    writer = tensorboard_writer(output_dir) if args.tensorboard and output_dir and utils.is_main_process() else None
    _logger.info(f'training for {args.epochs - args.start_epoch} epochs')
    start_time, test_stats = time.time(), None
    try:
        for epoch in range(args.start_epoch, args.epochs):
            log_stats = train_and_evaluate_epoch(args, training, loaders, epoch, device, amp_dtype, stop)
            if log_stats is None:  # stopped by a signal after an optimizer step: save the exact place
                where = f'at epoch {epoch}, step {stop.step} of {len(loaders[0])}'
                if output_dir is not None:
                    path = output_dir / 'checkpoint.pth'
                    utils.save_checkpoint(make_checkpoint(args, training, loaders[1], epoch - 1,
                                                          resume_step=stop.step), str(path))
                    where += f'; saved {path}'
                raise StoppedToResume(f'stopped by {stop.received} {where}; {resume_hint}')
            test_stats = {k[len('test_'):]: v for k, v in log_stats.items() if k.startswith('test_')
                          and not k.startswith('test_ema_')}
            is_best = test_stats['acc1'] > training.max_accuracy
            training.max_accuracy = max(training.max_accuracy, test_stats['acc1'])
            _logger.info(f'Max accuracy: {training.max_accuracy:.2f}%')
            if output_dir is not None and utils.is_main_process():
                save_epoch(args, training, loaders[1], epoch, is_best, log_stats, output_dir)
                if writer is not None:
                    for k, v in log_stats.items():
                        if k.startswith(('train_', 'test_')) and k != 'test_count':
                            writer.add_scalar(k.replace('_', '/', 1), v, epoch)
                    writer.flush()
            if epoch + 1 < args.epochs and stop.requested(device):
                saved = f'; saved {output_dir / "checkpoint.pth"}' if output_dir is not None else ''
                raise StoppedToResume(f'stopped by {stop.received} after epoch {epoch}{saved}; {resume_hint}')
    finally:
        if writer is not None:
            writer.close()
    total_time = datetime.timedelta(seconds=int(time.time() - start_time))
    _logger.info(f'training time {total_time}; max accuracy {training.max_accuracy:.2f}%')
    return dict(max_accuracy=training.max_accuracy, last=test_stats, model=training.model_without_ddp)


def main(args: argparse.Namespace) -> dict:
    """Train (the default), ``--eval`` or ``--throughput``, as DeiT's main: the steps above, in order.

    Returns the throughput statistics, the evaluation's, or ``dict(max_accuracy, last, model)`` after training.
    A stop on SIGTERM / SIGUSR1 saves what resuming needs and raises :class:`StoppedToResume`; problems with the
    input raise :class:`UserError`. SIGTERM / SIGUSR1 are the stop handler's of the command (:func:`cli`) or, called
    from Python, one of its own while it trains.
    """
    device, amp_dtype = set_up(args)
    resume = utils.find_resume_checkpoint(Path(args.output_dir)) if args.resume == 'auto' else args.resume
    if args.resume == 'auto':
        _logger.info(f'--resume auto: resuming from {resume}' if resume else
                     f'--resume auto: no checkpoint in {args.output_dir}; starting fresh')
    if args.throughput:
        args.nb_classes = 1000
        model, _ = build_model(args, device)
        return measure_throughput(args, model, device, amp_dtype)
    loaders = build_loaders(args)
    model, model_ema = build_model(args, device)
    if args.eval:
        if resume:
            load_weights(resume, model, model_ema)
        return evaluate_only(args, model, model_ema, loaders[1], device, amp_dtype)
    training = build_training(args, model, model_ema, device, amp_dtype)
    if resume:
        resume_training(args, training, resume)
    stop, own = StopOnSignal.installed_or_new()
    try:
        with met_by_this_process():
            return train(args, training, loaders, device, amp_dtype, stop)
    finally:
        if own:
            stop.uninstall()


def tensorboard_writer(output_dir: Path):
    from torch.utils.tensorboard import SummaryWriter
    return SummaryWriter(log_dir=str(output_dir))


def cli(argv=None) -> int:
    """``python main.py ...``: :func:`main` through :func:`scalablevit.cli.run_command` (one line and an exit
    status for a user error, 75 after a stop on a signal)."""
    parser = argparse.ArgumentParser('ScalableViT training and evaluation', parents=[get_args_parser()])
    args = parser.parse_args(argv)
    rank = int(os.environ.get('RANK', os.environ.get('SLURM_PROCID', '0')))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, stream=sys.stdout,
                        format='%(asctime)s %(message)s', datefmt='%H:%M:%S')
    return run_command(lambda: main(args), training=not (args.eval or args.throughput))


if __name__ == '__main__':
    sys.exit(cli())
