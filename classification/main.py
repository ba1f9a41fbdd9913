"""Train, evaluate and time ScalableViT on ImageNet (or the built-in DIGITS set); DeiT's ``main.py`` layout.

    python main.py --data-set DIGITS ...                                     # one device (CPU or GPU)
    torchrun --nproc_per_node=8 main.py --model scalable_vit_small ...      # or: python -m torch.distributed.launch
    python main.py --eval --resume ./scalable_vit_small/checkpoint_best.pth --model scalable_vit_small ...
    python main.py --throughput --model scalable_vit_small --batch-size 64
    python main.py --batch-size 128 --grad-accum-steps 8 --resume auto ...   # 8 x 128 on one GPU, requeue-safe

See README.md for the full commands and the flags that differ from DeiT.
"""
import argparse
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
from typing import Optional

import timm
import torch
import torch.backends.cudnn as cudnn
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, RandomSampler, SequentialSampler
from torch.utils.data.distributed import DistributedSampler

import scalablevit  # registers scalable_vit_small/base/large with timm
from scalablevit.cli import AMP_DTYPES, ParseKwargs, check_compile, release_process_group
from scalablevit.errors import EXIT_ERROR, EXIT_STOPPED, UserError, error_line
from scalablevit.info import count_params, describe
from scalablevit.signals import StopOnSignal

# isort: split
import utils
from datasets import DATA_SETS, build_dataset, checkpoint_meta
from engine import evaluate, throughput, train_one_epoch
from samplers import RASampler, ShardedEvalSampler

_logger = logging.getLogger('main')
FUSED_OPTIMIZERS = ('adamw', 'adam')  # timm names of torch optimizers with fused=True on CPU and CUDA
_started: Optional[str] = None  # 'train' / 'eval' once the loop runs: errors from then on may be one process's own


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser('ScalableViT training and evaluation', add_help=False)
    parser.add_argument('--batch-size', default=64, type=int,
                        help='images per process per forward pass (the micro-batch with --grad-accum-steps)')
    parser.add_argument('--epochs', default=300, type=int)
    parser.add_argument('--grad-accum-steps', default=1, type=int, metavar='N',
                        help='step the optimizer every N batches: effective batch = batch size x processes x N')

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

    group = parser.add_argument_group('Mixup / CutMix')
    group.add_argument('--mixup', type=float, default=0.8, help='mixup alpha; on when > 0')
    group.add_argument('--cutmix', type=float, default=1.0, help='cutmix alpha; on when > 0')
    group.add_argument('--cutmix-minmax', type=float, nargs='+', default=None)
    group.add_argument('--mixup-prob', type=float, default=1.0)
    group.add_argument('--mixup-switch-prob', type=float, default=0.5)
    group.add_argument('--mixup-mode', type=str, default='batch', choices=('batch', 'pair', 'elem'))

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
    return AMP_DTYPES[args.amp_dtype or ('float16' if device.type == 'cuda' else 'bfloat16')]


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
                              num_workers=args.num_workers, pin_memory=pin, drop_last=True)
    if len(loader_train) == 0 and not (args.eval or args.throughput):
        raise UserError(f'{len(sampler_train)} training images per process is less than one batch of '
                               f'{args.batch_size}; lower --batch-size')
    loader_val = DataLoader(dataset_val, sampler=sampler_val, batch_size=args.batch_size,
                            num_workers=args.num_workers, pin_memory=pin, drop_last=False)
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


def main(args: argparse.Namespace):
    check_args(args)
    utils.init_distributed_mode(args)
    if not utils.is_main_process():
        logging.getLogger().setLevel(logging.WARNING)
    _logger.info(' '.join(sys.argv))
    device = torch.device(args.device)
    amp_dtype = resolve_amp(args, device)
    utils.seed_all(args.seed + utils.get_rank())
    cudnn.benchmark = True
    output_dir = Path(args.output_dir) if args.output_dir else None
    resume = args.resume
    if resume == 'auto':
        resume = utils.find_resume_checkpoint(output_dir)
        _logger.info(f'--resume auto: resuming from {resume}' if resume else
                     f'--resume auto: no checkpoint in {output_dir}; starting fresh')

    if args.throughput:
        args.nb_classes = 1000
        loader_train = loader_val = None
    else:
        loader_train, loader_val = build_loaders(args)

    mixup_fn = None
    mixup_active = args.mixup > 0 or args.cutmix > 0. or args.cutmix_minmax is not None
    if mixup_active and not (args.eval or args.throughput):
        mixup_fn = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                         prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                         label_smoothing=args.smoothing, num_classes=args.nb_classes)

    _logger.info(f'creating model {args.model}')
    model = create_model(args)
    if args.finetune:
        load_finetune(model, args.finetune)
    if args.grad_checkpointing:
        model.set_grad_checkpointing(True)
    if utils.is_main_process():
        _logger.info(f'{args.model}: {describe(model, args.input_size)}')
    model.to(device)

    if args.throughput:
        stats = throughput(compiled(model, args), device, args.batch_size, args.input_size, amp_dtype)
        dtype = str(amp_dtype or torch.float32).replace('torch.', '')
        _logger.info(f'throughput: {stats["images_per_s"]:.1f} images/s ({args.model}, batch {args.batch_size} at '
                     f'{args.input_size}x{args.input_size}, device {device} '
                     f'[{torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}], dtype {dtype}, '
                     f'median of {stats["repeats"]} batches)')
        return stats

    model_ema = None
    if args.model_ema:
        model_ema = ModelEmaV3(model, decay=args.model_ema_decay,
                               device=torch.device('cpu') if args.model_ema_force_cpu else None)

    model_without_ddp = model
    if args.distributed:
        model = DistributedDataParallel(model, device_ids=[args.gpu] if device.type == 'cuda' else None)
        model_without_ddp = model.module
    n_parameters = count_params(model, trainable_only=True)
    # Compiled around DDP (its graph breaks at the gradient buckets); checkpoints come from model_without_ddp, so
    # they hold the plain state dict. The EMA copy above stays eager.
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
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    lr_scheduler, _ = create_scheduler_v2(optimizer, sched=args.sched, num_epochs=args.epochs,
                                          decay_epochs=args.decay_epochs, decay_rate=args.decay_rate,
                                          min_lr=args.min_lr, warmup_lr=args.warmup_lr,
                                          warmup_epochs=args.warmup_epochs)

    if mixup_fn is not None:
        criterion = SoftTargetCrossEntropy()  # smoothing is inside the mixed targets
    elif args.smoothing > 0.:
        criterion = LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    else:
        criterion = torch.nn.CrossEntropyLoss()

    max_accuracy = -1.0  # the first evaluation is always a new best
    start_step = 0
    if resume:
        checkpoint = utils.load_checkpoint(resume)
        utils.load_model_weights(model_without_ddp, scalablevit.unwrap_state_dict(checkpoint), resume)
        if not args.eval and all(k in checkpoint for k in ('optimizer', 'lr_scheduler', 'epoch')):
            optimizer.load_state_dict(checkpoint['optimizer'])
            lr_scheduler.load_state_dict(checkpoint['lr_scheduler'])
            args.start_epoch = checkpoint['epoch'] + 1
            start_step = int(checkpoint.get('resume_step', 0))
            if 'scaler' in checkpoint:
                scaler.load_state_dict(checkpoint['scaler'])
            max_accuracy = checkpoint.get('max_accuracy', -1.0)
            where = f', step {start_step}' if start_step else ''
            _logger.info(f'resumed {resume} at epoch {args.start_epoch}{where}')
        if model_ema is not None:
            if 'model_ema' in checkpoint:
                utils.load_model_weights(model_ema.module, scalablevit.unwrap_state_dict(checkpoint['model_ema']),
                                         f'{resume} (model_ema)')
            else:
                _logger.warning(f'{resume} has no model_ema; the EMA starts from the loaded weights')
                model_ema.module.load_state_dict(model_without_ddp.state_dict())

    global _started
    _started = 'eval' if args.eval else 'train'
    dist_eval = args.distributed and args.dist_eval
    if args.eval:
        test_stats = evaluate(loader_val, model, device, amp_dtype, dist_eval, args.print_freq)
        _logger.info(f'Accuracy of the network on the {test_stats["count"]} test images: {test_stats["acc1"]:.2f}%')
        if model_ema is not None:
            ema_stats = evaluate(loader_val, model_ema.module, device, amp_dtype, dist_eval, args.print_freq)
            _logger.info(f'Accuracy of the EMA on the {ema_stats["count"]} test images: {ema_stats["acc1"]:.2f}%')
        return test_stats

    def make_checkpoint(epoch: int, **extra) -> dict:
        checkpoint = {
            'model': model_without_ddp.state_dict(),
            'optimizer': optimizer.state_dict(),
            'lr_scheduler': utils.plain(lr_scheduler.state_dict()),
            'scaler': scaler.state_dict(),
            'epoch': epoch,
            'max_accuracy': max_accuracy,
            'args': utils.plain(vars(args)),
            'meta': checkpoint_meta(args, loader_val.dataset),  # what predict.py needs
            **extra,
        }
        if model_ema is not None:
            checkpoint['model_ema'] = model_ema.module.state_dict()
        return checkpoint

    # As released (DeiT's loop): epoch e trains at the schedule's value for e - 1 (the scheduler steps to `epoch`
    # after each epoch, never before the first), so epochs 0 and 1 both run at the warm-up start.
    lr_scheduler.step(max(args.start_epoch - 1, 0))
    writer = None
    test_stats = None
    _logger.info(f'training for {args.epochs - args.start_epoch} epochs')
    start_time = time.time()
    with StopOnSignal() as stop:
        for epoch in range(args.start_epoch, args.epochs):
            # Seed per epoch (sampler order, loader workers) and per step (augmentation, mixup, dropout), so that a
            # resumed run, even one resumed mid-epoch, draws the same numbers as an uninterrupted one.
            utils.seed_all(args.seed + utils.get_rank() + 10007 * (epoch + 1))
            if args.distributed:
                loader_train.sampler.set_epoch(epoch)
            train_stats = train_one_epoch(model, criterion, loader_train, optimizer, device, epoch, scaler,
                                          amp_dtype, args.clip_grad, model_ema, mixup_fn, args.print_freq,
                                          args.grad_accum_steps, start_step, step_seeder(args, epoch), stop)
            start_step = 0
            if stop.step is not None:  # stopped by a signal after an optimizer step: save the exact place
                path = output_dir / 'checkpoint.pth' if output_dir is not None else None
                if path is not None:
                    utils.save_checkpoint(make_checkpoint(epoch - 1, resume_step=stop.step), str(path))
                _logger.warning(f'stopped by {stop.received} at epoch {epoch}, step {stop.step} of '
                                f'{len(loader_train)}' + (f'; saved {path}; rerun with --resume auto to continue '
                                                           f'from there' if path else ' (no --output_dir: not saved)'))
                return dict(max_accuracy=max_accuracy, last=test_stats, model=model_without_ddp,
                            stopped=(epoch, stop.step))
            lr_scheduler.step(epoch)
            test_stats = evaluate(loader_val, model, device, amp_dtype, dist_eval, args.print_freq)
            _logger.info(f'Accuracy of the network on the {test_stats["count"]} test images: '
                         f'{test_stats["acc1"]:.2f}%')
            is_best = test_stats['acc1'] > max_accuracy
            max_accuracy = max(max_accuracy, test_stats['acc1'])
            _logger.info(f'Max accuracy: {max_accuracy:.2f}%')
            log_stats = {**{f'train_{k}': v for k, v in train_stats.items()},
                         **{f'test_{k}': v for k, v in test_stats.items()},
                         'epoch': epoch, 'n_parameters': n_parameters}
            if model_ema is not None:
                ema_stats = evaluate(loader_val, model_ema.module, device, amp_dtype, dist_eval, args.print_freq)
                _logger.info(f'Accuracy of the EMA on the {ema_stats["count"]} test images: '
                             f'{ema_stats["acc1"]:.2f}%')
                log_stats.update({f'test_ema_{k}': v for k, v in ema_stats.items()})

            if output_dir is not None and utils.is_main_process():
                path = output_dir / 'checkpoint.pth'
                utils.save_checkpoint(make_checkpoint(epoch), str(path))
                if is_best:
                    utils.copy_checkpoint(path, output_dir / 'checkpoint_best.pth')
                if args.checkpoint_hist:
                    utils.copy_checkpoint(path, output_dir / f'checkpoint-{epoch}.pth')
                    utils.prune_checkpoints(output_dir, args.checkpoint_hist)
                utils.write_text(output_dir / 'log.txt', json.dumps(log_stats) + '\n')
                if args.tensorboard:
                    writer = writer or tensorboard_writer(output_dir)
                    for k, v in log_stats.items():
                        if k.startswith(('train_', 'test_')) and k != 'test_count':
                            writer.add_scalar(k.replace('_', '/', 1), v, epoch)
                    writer.flush()
            if epoch + 1 < args.epochs and stop.requested(device):
                _logger.warning(f'stopped by {stop.received} after epoch {epoch}'
                                + ('; rerun with --resume auto to continue' if output_dir is not None else ''))
                if writer is not None:
                    writer.close()
                return dict(max_accuracy=max_accuracy, last=test_stats, model=model_without_ddp,
                            stopped=(epoch + 1, 0))
    if writer is not None:
        writer.close()

    total_time = datetime.timedelta(seconds=int(time.time() - start_time))
    _logger.info(f'training time {total_time}; max accuracy {max_accuracy:.2f}%')
    return dict(max_accuracy=max_accuracy, last=test_stats, model=model_without_ddp)


def tensorboard_writer(output_dir: Path):
    from torch.utils.tensorboard import SummaryWriter
    return SummaryWriter(log_dir=str(output_dir))


def _is_comm_error(e: BaseException) -> bool:
    """A collective that failed because another process is gone (it stopped on an error, or was killed)."""
    if isinstance(e, getattr(torch.distributed, 'DistError', ())):
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and any(s in text for s in (
        'Connection closed by peer', 'Connection reset by peer', 'Broken pipe', 'gloo', 'NCCL', 'ProcessGroup'))


def cli(argv=None) -> int:
    parser = argparse.ArgumentParser('ScalableViT training and evaluation', parents=[get_args_parser()])
    args = parser.parse_args(argv)
    rank = int(os.environ.get('RANK', os.environ.get('SLURM_PROCID', '0')))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, stream=sys.stdout,
                        format='%(asctime)s %(message)s', datefmt='%H:%M:%S')
    stopped = False
    try:
        result = main(args)
        stopped = isinstance(result, dict) and bool(result.get('stopped'))
        del result  # the model it holds keeps the process group: freed before the group goes
    except (UserError, FloatingPointError) as e:
        # Problems with the command line, the data set or a checkpoint are the same on every process: rank 0 says
        # it. Problems met while training or evaluating (an unreadable image, a full disk) are said by the process
        # that met them.
        if rank == 0 or _started is not None:
            print(f'error: {error_line(e)}', file=sys.stderr, flush=True)
        return EXIT_ERROR
    except (RuntimeError, OSError) as e:
        if utils.get_world_size() > 1 and _is_comm_error(e):
            print(f'error: process {rank} lost contact with the other processes ({type(e).__name__}): another '
                  f'process stopped first; its error is above', file=sys.stderr, flush=True)
            return 1
        raise
    finally:
        release_process_group()
    # stopped by SIGTERM / SIGUSR1 with its checkpoint written: the status a requeueing script tests for
    return EXIT_STOPPED if stopped else 0


if __name__ == '__main__':
    sys.exit(cli())
