"""Distributed set-up, metric logging and checkpoint I/O for the classification scripts (DeiT's ``utils.py``)."""
import argparse
import datetime
import logging
import os
import random
import subprocess
import time
from collections import defaultdict, deque
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional

import numpy as np
import torch
import torch.distributed as dist

import scalablevit.checkpoint as scalablevit_checkpoint

_logger = logging.getLogger(__name__)


def seed_all(seed: int):
    """Seed Python, NumPy and torch (all devices) from one integer."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2 ** 32)
    random.seed(seed)


# ---------------------------------------------------------------------------------------------------------------------
# Distributed

def is_dist_avail_and_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_world_size() -> int:
    return dist.get_world_size() if is_dist_avail_and_initialized() else 1


def get_rank() -> int:
    return dist.get_rank() if is_dist_avail_and_initialized() else 0


def is_main_process() -> bool:
    return get_rank() == 0


def _slurm_master_addr() -> Optional[str]:
    nodelist = os.environ.get('SLURM_JOB_NODELIST', os.environ.get('SLURM_NODELIST', ''))
    if not nodelist:
        return None
    try:
        out = subprocess.run(['scontrol', 'show', 'hostnames', nodelist], capture_output=True, text=True, check=True)
        return out.stdout.split()[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        first = nodelist.split(',')[0]
        return None if '[' in first else first


def init_distributed_mode(args: argparse.Namespace):
    """Set ``args.distributed``, ``rank``, ``world_size``, ``gpu`` (local rank) and join the process group.

    Reads, in this order: ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` (torchrun, ``torch.distributed.launch --use_env``),
    ``--local-rank`` given by ``torch.distributed.launch`` without ``--use_env``, and ``SLURM_PROCID``/
    ``SLURM_NTASKS``/``SLURM_LOCALID`` (``srun``; ``MASTER_ADDR`` defaults to the job's first node). Backend: NCCL
    on CUDA, gloo on CPU.
    """
    if 'RANK' in os.environ and 'WORLD_SIZE' in os.environ:
        args.rank = int(os.environ['RANK'])
        args.world_size = int(os.environ['WORLD_SIZE'])
        args.gpu = int(os.environ.get('LOCAL_RANK', args.local_rank if args.local_rank is not None else 0))
    elif 'SLURM_PROCID' in os.environ and int(os.environ.get('SLURM_NTASKS', '1')) > 1:
        args.rank = int(os.environ['SLURM_PROCID'])
        args.world_size = int(os.environ['SLURM_NTASKS'])
        args.gpu = int(os.environ.get('SLURM_LOCALID', 0))
        os.environ.setdefault('MASTER_ADDR', _slurm_master_addr() or '127.0.0.1')
        os.environ.setdefault('MASTER_PORT', '29500')
        os.environ['RANK'], os.environ['WORLD_SIZE'] = str(args.rank), str(args.world_size)
        os.environ['LOCAL_RANK'] = str(args.gpu)
    else:
        args.distributed = False
        args.rank, args.world_size, args.gpu = 0, 1, 0
        return

    args.distributed = True
    use_cuda = str(args.device).startswith('cuda') and torch.cuda.is_available()
    if use_cuda:
        args.gpu = args.gpu % torch.cuda.device_count()
        torch.cuda.set_device(args.gpu)
        args.device = f'cuda:{args.gpu}'
    args.dist_backend = 'nccl' if use_cuda else 'gloo'
    _logger.info('distributed init (rank %d of %d, backend %s): %s', args.rank, args.world_size,
                 args.dist_backend, args.dist_url)
    kwargs = dict(device_id=torch.device(args.device)) if use_cuda else {}
    dist.init_process_group(backend=args.dist_backend, init_method=args.dist_url, world_size=args.world_size,
                            rank=args.rank, **kwargs)
    dist.barrier()


def all_reduce_sum(values: Iterable[float], device: torch.device) -> list:
    """Sum a few numbers over all processes (identity when not distributed)."""
    t = torch.tensor(list(values), dtype=torch.float64, device=device)
    if is_dist_avail_and_initialized():
        dist.all_reduce(t)
    return t.tolist()


# ---------------------------------------------------------------------------------------------------------------------
# Metrics and progress

class SmoothedValue:
    """A window of recent values (median/avg shown per line) plus the global average."""

    def __init__(self, window_size: int = 20, fmt: str = '{median:.4f} ({global_avg:.4f})'):
        self.deque = deque(maxlen=window_size)
        self.total = 0.0
        self.count = 0
        self.fmt = fmt

    def update(self, value: float, n: int = 1):
        self.deque.append(value)
        self.count += n
        self.total += value * n

    def synchronize_between_processes(self, device: torch.device):
        self.count, self.total = all_reduce_sum([self.count, self.total], device)
        self.count = int(self.count)

    @property
    def median(self) -> float:
        return float(torch.tensor(list(self.deque)).median().item()) if self.deque else 0.0

    @property
    def avg(self) -> float:
        return sum(self.deque) / len(self.deque) if self.deque else 0.0

    @property
    def global_avg(self) -> float:
        return self.total / max(self.count, 1)

    @property
    def value(self) -> float:
        return self.deque[-1] if self.deque else 0.0

    def __str__(self) -> str:
        return self.fmt.format(median=self.median, avg=self.avg, global_avg=self.global_avg, value=self.value)


class MetricLogger:
    """Named ``SmoothedValue`` meters and a ``log_every`` loop that logs progress with ETA."""

    def __init__(self, delimiter: str = '  '):
        self.meters: Dict[str, SmoothedValue] = defaultdict(SmoothedValue)
        self.delimiter = delimiter

    def update(self, n: int = 1, **kwargs: float):
        for k, v in kwargs.items():
            if isinstance(v, torch.Tensor):
                v = v.item()
            self.meters[k].update(float(v), n=n)

    def add_meter(self, name: str, meter: SmoothedValue):
        self.meters[name] = meter

    def __str__(self) -> str:
        return self.delimiter.join(f'{name}: {meter}' for name, meter in self.meters.items())

    def synchronize_between_processes(self, device: torch.device):
        for meter in self.meters.values():
            meter.synchronize_between_processes(device)

    def log_every(self, iterable: Iterable, print_freq: int, header: str = '') -> Iterator:
        total = len(iterable)
        width = len(str(total))
        start = end = time.time()
        iter_time = SmoothedValue(fmt='{avg:.4f}')
        data_time = SmoothedValue(fmt='{avg:.4f}')
        for i, obj in enumerate(iterable):
            data_time.update(time.time() - end)
            yield obj
            iter_time.update(time.time() - end)
            if i % print_freq == 0 or i == total - 1:
                eta = datetime.timedelta(seconds=int(iter_time.global_avg * (total - i - 1)))
                line = f'{header} [{i:>{width}}/{total}]  eta: {eta}  {self}  time: {iter_time}  data: {data_time}'
                if torch.cuda.is_available() and torch.cuda.is_initialized():
                    line += f'  max mem: {torch.cuda.max_memory_allocated() / 2 ** 20:.0f}MB'
                _logger.info(line)
            end = time.time()
        total_time = datetime.timedelta(seconds=int(time.time() - start))
        _logger.info(f'{header} total time: {total_time} ({(time.time() - start) / max(total, 1):.4f} s / it)')


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoints

DISK_FULL_ADVICE = 'free some space (or point --output_dir elsewhere) and rerun with --resume auto'


def save_checkpoint(state: Dict[str, Any], path: str):
    """Write ``state`` atomically from the main process (``scalablevit.checkpoint.save_checkpoint``: a temporary file
    in the same folder, fsynced, then renamed; a failed write is a one-line :class:`UserError` saying how much room
    it needed and that the previous file is intact). The folder is created at the first write, so a run that fails
    earlier leaves nothing behind."""
    if is_main_process():
        scalablevit_checkpoint.save_checkpoint(state, path, advice=DISK_FULL_ADVICE)


def copy_checkpoint(src: Path, dst: Path):
    """``dst`` becomes a copy of the checkpoint ``src`` (main process; ``scalablevit.checkpoint.atomic_copy``: a
    hard link where the file system has them, else a byte copy; fsynced and atomic either way)."""
    if is_main_process():
        scalablevit_checkpoint.atomic_copy(src, dst, advice=DISK_FULL_ADVICE)


def write_text(path: Path, line: str):
    """Append ``line`` to ``path`` (main process), creating the folder; a full disk is a one-line error."""
    if not is_main_process():
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open('a') as f:
            f.write(line)
    except OSError as e:
        raise scalablevit_checkpoint.DiskWriteError(
            scalablevit_checkpoint.write_failure(str(path), len(line), e, DISK_FULL_ADVICE)) from e


def epoch_checkpoints(output_dir: Path) -> List[Path]:
    """``checkpoint-<epoch>.pth`` files of ``output_dir`` (``--checkpoint-hist``), oldest epoch first."""
    found = []
    for p in output_dir.glob('checkpoint-*.pth'):
        stem = p.stem.split('-', 1)[1]
        if stem.isdigit():
            found.append((int(stem), p))
    return [p for _, p in sorted(found)]


def prune_checkpoints(output_dir: Path, keep: int):
    """Delete all but the newest ``keep`` epoch checkpoints (main process)."""
    if not is_main_process():
        return
    for p in epoch_checkpoints(output_dir)[:-keep] if keep > 0 else epoch_checkpoints(output_dir):
        p.unlink(missing_ok=True)


def find_resume_checkpoint(output_dir: Optional[Path]) -> Optional[str]:
    """``--resume auto``: the newest complete checkpoint in ``output_dir`` (``checkpoint.pth``, written last and
    atomically, else the newest ``checkpoint-<epoch>.pth``), or None for a fresh start."""
    if output_dir is None or not output_dir.is_dir():
        return None
    if (output_dir / 'checkpoint.pth').is_file():
        return str(output_dir / 'checkpoint.pth')
    hist = epoch_checkpoints(output_dir)
    return str(hist[-1]) if hist else None


def load_checkpoint(path: str) -> Dict[str, Any]:
    """Load a checkpoint (file or https URL) with ``weights_only=True``; a bad file is a one-line error.

    DeiT-style files store ``args`` as an ``argparse.Namespace``; that one class is allowed for this load only.
    """
    if path.startswith(('https://', 'http://')):
        with scalablevit_checkpoint.allowed_globals([argparse.Namespace]):
            return torch.hub.load_state_dict_from_url(path, map_location='cpu', check_hash=True, weights_only=True)
    return scalablevit_checkpoint.load_checkpoint(path)


def load_model_weights(model: torch.nn.Module, state_dict: Dict[str, torch.Tensor], source: str,
                       allow_missing: Iterable[str] = ()):
    """Strict load that names what does not fit (missing, unexpected and wrongly shaped keys) in the project's one
    message (``scalablevit.checkpoint``); nothing is loaded when anything does not fit."""
    scalablevit_checkpoint.load_state_dict_strict(model, state_dict, source, allow_missing=allow_missing)


def plain(value: Any) -> Any:
    """``value`` reduced to types that ``torch.load(weights_only=True)`` reads (for ``args`` in checkpoints)."""
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return str(value)
