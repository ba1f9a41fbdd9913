"""One training epoch, evaluation and throughput (DeiT's ``engine.py``)."""
import logging
import math
import statistics
import time
from contextlib import nullcontext
from typing import Any, Callable, Dict, Iterable, Iterator, Optional, Tuple

import torch
import torch.nn as nn
from timm.data import Mixup
from timm.utils import ModelEmaV3, accuracy
from torch.utils.data import DataLoader

# isort: split
import utils

from scalablevit.errors import UserError
from scalablevit.signals import StopOnSignal

_logger = logging.getLogger(__name__)


class NonFiniteLoss(UserError, FloatingPointError):
    """The loss became NaN or infinite; the message says where and what to try."""


def autocast(device: torch.device, dtype: Optional[torch.dtype]):
    """``torch.autocast`` on ``device`` in ``dtype``; a no-op context when ``dtype`` is None (full precision)."""
    return torch.autocast(device_type=device.type, dtype=dtype) if dtype is not None else nullcontext()


class _Batches:
    """The batches of one epoch from ``start_step`` on, re-seeding the RNGs before each one is drawn.

    Per-step seeds make every step's randomness (augmentation in the main process, mixup, dropout) a function of
    (epoch, step) alone, so a run stopped after step k and resumed there continues exactly as one that never
    stopped: the first k batches are drawn and dropped (data loading only, no compute) so that the loader's worker
    processes reach the same state.
    """

    def __init__(self, data_loader: Iterable, start_step: int = 0, seed_step: Optional[Callable[[int], None]] = None):
        self.data_loader = data_loader
        self.start_step = start_step
        self.seed_step = seed_step

    def __len__(self) -> int:
        return len(self.data_loader) - self.start_step

    def __iter__(self) -> Iterator[Tuple[int, Any]]:
        it = iter(self.data_loader)
        for step in range(len(self.data_loader)):
            if self.seed_step is not None:
                self.seed_step(step)
            batch = next(it)
            if step >= self.start_step:
                yield step, batch


def _forward_backward(model: nn.Module, criterion: nn.Module, samples: torch.Tensor, targets: torch.Tensor,
                      scaler: torch.amp.GradScaler, device: torch.device, amp_dtype: Optional[torch.dtype],
                      sync: bool, divisor: int, where: str) -> float:
    """Loss of one micro-batch and its backward (of the loss over ``divisor``); DDP all-reduces only when ``sync``.
    Returns the unscaled loss; ``NonFiniteLoss`` (nothing backpropagated) when it is not finite."""
    no_sync = getattr(model, 'no_sync', None)
    with no_sync() if no_sync is not None and not sync else nullcontext():
        with autocast(device, amp_dtype):
            outputs = model(samples)
            loss = criterion(outputs, targets)
        loss_value = loss.item()
        if not math.isfinite(loss_value):
            raise NonFiniteLoss(f'loss is {loss_value} at {where}: stopping training '
                                f'(try a lower --lr, --clip-grad, or --no-amp)')
        scaler.scale(loss / divisor).backward()
    return loss_value


def _optimizer_step(model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                    clip_grad: Optional[float], model_ema: Optional[ModelEmaV3]):
    """Step on the accumulated gradient (unscaled and clipped to ``clip_grad`` first if set), then the EMA."""
    if clip_grad is not None and clip_grad > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    if model_ema is not None:
        model_ema.update(model)


def train_one_epoch(
        model: nn.Module,
        criterion: nn.Module,
        data_loader: DataLoader,
        optimizer: torch.optim.Optimizer,
        device: torch.device,
        epoch: int,
        scaler: torch.amp.GradScaler,
        amp_dtype: Optional[torch.dtype] = None,
        clip_grad: Optional[float] = None,
        model_ema: Optional[ModelEmaV3] = None,
        mixup_fn: Optional[Mixup] = None,
        print_freq: int = 10,
        grad_accum_steps: int = 1,
        start_step: int = 0,
        seed_step: Optional[Callable[[int], None]] = None,
        stop: Optional[StopOnSignal] = None,
) -> Dict[str, float]:
    """One epoch (or its rest, from micro-batch ``start_step``); returns the averaged meters.

    The optimizer steps every ``grad_accum_steps`` micro-batches; the loss of each is divided by the number of
    micro-batches in its group, so the accumulated gradient is the mean over the group, as one big batch would
    give. The last group of an epoch that does not divide evenly is shorter and steps too: no gradient is carried
    over. DDP all-reduces only on the stepping micro-batch (``no_sync`` on the others); loss scaling and clipping
    act on the accumulated gradient. When ``stop`` is requested (checked after each optimizer step, agreed over
    processes), the loop ends and ``stop.step`` holds the number of micro-batches of this epoch done.
    """
    model.train()
    metric_logger = utils.MetricLogger()
    metric_logger.add_meter('lr', utils.SmoothedValue(window_size=1, fmt='{value:.6f}'))
    metric_logger.add_meter('img/s', utils.SmoothedValue(window_size=10, fmt='{avg:.1f}'))
    world_size = utils.get_world_size()
    header = f'Epoch: [{epoch}]'
    num_steps = len(data_loader)
    optimizer.zero_grad(set_to_none=True)
    tic = time.time()
    batches = _Batches(data_loader, start_step, seed_step)
    for step, (samples, targets) in metric_logger.log_every(batches, print_freq, header):
        group_start = step - step % grad_accum_steps
        group_size = min(grad_accum_steps, num_steps - group_start)
        last_of_group = step == group_start + group_size - 1
        samples = samples.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        if mixup_fn is not None:
            samples, targets = mixup_fn(samples, targets)

        loss_value = _forward_backward(model, criterion, samples, targets, scaler, device, amp_dtype,
                                       sync=last_of_group, divisor=group_size, where=f'epoch {epoch}, step {step}')
        if last_of_group:
            _optimizer_step(model, optimizer, scaler, clip_grad, model_ema)

        if device.type == 'cuda':
            torch.cuda.synchronize(device)
        toc = time.time()
        metric_logger.update(loss=loss_value, lr=optimizer.param_groups[0]['lr'])
        metric_logger.update(**{'img/s': samples.shape[0] * world_size / max(toc - tic, 1e-9)})
        tic = toc
        if last_of_group and stop is not None and step + 1 < num_steps and stop.requested(device):
            stop.step = step + 1
            break
    metric_logger.synchronize_between_processes(device)
    _logger.info(f'Averaged stats: {metric_logger}')
    return {k: meter.global_avg for k, meter in metric_logger.meters.items() if k != 'img/s'}


@torch.no_grad()
def evaluate(
        data_loader: DataLoader,
        model: nn.Module,
        device: torch.device,
        amp_dtype: Optional[torch.dtype] = None,
        distributed: bool = False,
        print_freq: int = 10,
) -> Dict[str, float]:
    """Top-1 / top-5 accuracy (%) and mean loss; with ``distributed`` the per-process shards are summed."""
    criterion = nn.CrossEntropyLoss(reduction='sum')
    model.eval()
    metric_logger = utils.MetricLogger()
    loss_sum, correct1, correct5, count = 0.0, 0.0, 0.0, 0
    for images, target in metric_logger.log_every(data_loader, print_freq, 'Test:'):
        images = images.to(device, non_blocking=True)
        target = target.to(device, non_blocking=True)
        with autocast(device, amp_dtype):
            output = model(images)
        output = output.float()
        acc1, acc5 = accuracy(output, target, topk=(1, min(5, output.shape[1])))
        n = images.shape[0]
        loss_sum += criterion(output, target).item()
        correct1 += acc1.item() * n / 100
        correct5 += acc5.item() * n / 100
        count += n
        metric_logger.update(acc1=acc1.item(), acc5=acc5.item(), n=n)
    if distributed:
        loss_sum, correct1, correct5, count = utils.all_reduce_sum([loss_sum, correct1, correct5, count], device)
    count = int(round(count))
    stats = dict(acc1=100 * correct1 / max(count, 1), acc5=100 * correct5 / max(count, 1),
                 loss=loss_sum / max(count, 1), count=count)
    _logger.info('* Acc@1 {acc1:.3f} Acc@5 {acc5:.3f} loss {loss:.3f} on {count} images'.format(**stats))
    return stats


@torch.no_grad()
def throughput(
        model: nn.Module,
        device: torch.device,
        batch_size: int,
        input_size: int,
        amp_dtype: Optional[torch.dtype] = None,
        warmup: int = 10,
        repeats: int = 30,
) -> Dict[str, float]:
    """Inference images/s: ``warmup`` untimed batches, then the median of ``repeats`` timed (synchronised) ones."""
    model.eval()
    images = torch.randn(batch_size, 3, input_size, input_size, device=device)

    def sync():
        if device.type == 'cuda':
            torch.cuda.synchronize(device)

    times = []
    with autocast(device, amp_dtype):
        for i in range(warmup + repeats):
            sync()
            tic = time.perf_counter()
            model(images)
            sync()
            if i >= warmup:
                times.append(time.perf_counter() - tic)
    median = statistics.median(times)
    return dict(images_per_s=batch_size / median, median_s=median, batch_size=batch_size, repeats=repeats)
