"""The patches that make mmengine 0.10 / mmcv 2.1 run on torch 2.14, on CPU, and write files atomically.

``import scalablevit.mm`` applies them, once; none changes what a CUDA run computes.

1. (Checkpoints are read by :mod:`scalablevit.mm.checkpoint`, mmengine's loader of local files through its
   public ``CheckpointLoader.register_scheme``: no patch, and nothing added to torch's allow-list.)
2. (``torchrun`` on CPU: ``scalablevit.mm.config.init_process_group`` sets up the gloo process group before the
   ``Runner``, which then skips mmengine's launcher and its ``torch.cuda.set_device``: no patch.)
3. ``SyncBN`` on CPU: torch's ``SyncBatchNorm`` only runs on accelerators. :class:`SyncBatchNormCPU` (registered
   as ``SyncBNCPU``) computes the batch statistics over all processes with a differentiable all-reduce (gloo), as
   SyncBN does on GPUs, so every process holds the same running statistics: validation during training equals
   testing the saved checkpoint. ``scalablevit.mm.config.adapt_cfg_to_device`` swaps ``SyncBN`` for it on CPU.
4. Atomic files. mmengine writes checkpoints (scheduled, best, last), dumps and the ``last_checkpoint`` pointer in
   place, so a kill or a full disk during a write leaves a truncated file under the final name. Local writes go
   through :func:`scalablevit.checkpoint.atomic_write` instead (a temporary file in the same folder, fsynced, then
   renamed; a failure leaves what was there and is a one-line ``DiskWriteError``: folder, bytes needed, bytes free):
   the file backend of local paths is :class:`AtomicLocalBackend`, registered with mmengine's public
   ``register_backend('local', ...)``, and the one file ``CheckpointHook`` opens itself (the ``last_checkpoint``
   pointer, with the builtin ``open``) is opened with :func:`atomic_open`: the one patch of this module, listed
   with its test in :mod:`scalablevit.upstream`.
"""
import builtins
import io
import os

import mmengine.hooks.checkpoint_hook as _mm_checkpoint_hook
import torch
import torch.distributed as dist
import torch.nn as nn
from mmengine.fileio import LocalBackend, register_backend
from mmengine.registry import MODELS

from ..checkpoint import atomic_write

__all__ = ['AtomicLocalBackend', 'SyncBatchNormCPU', 'atomic_open']


class SyncBatchNormCPU(nn.BatchNorm2d):
    """Batch norm whose training statistics are those of the whole batch over all processes (SyncBN), on CPU.

    Outside distributed training, or in eval mode, it is ``nn.BatchNorm2d``. Running statistics follow torch's
    ``SyncBatchNorm`` (momentum update with the unbiased variance of the global batch).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        import torch.distributed.nn.functional as dist_nn

        c = x.shape[1]
        flat = x.transpose(0, 1).reshape(c, -1)  # (C, B*H*W)
        count = torch.full((1,), flat.shape[1], dtype=x.dtype, device=x.device)
        stats = dist_nn.all_reduce(torch.cat([flat.sum(1), flat.square().sum(1), count]))  # (2C + 1,), summed
        n = stats[-1]
        mean = stats[:c] / n
        var = (stats[c:2 * c] / n - mean.square()).clamp_min(0)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = self.momentum if self.momentum is not None else 1. / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - momentum).add_(momentum * mean.detach())
                self.running_var.mul_(1 - momentum).add_(momentum * var.detach() * n / (n - 1).clamp_min(1))
        shape = (1, c) + (1,) * (x.dim() - 2)
        y = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y

    def _check_input_dim(self, x):
        if x.dim() < 2:
            raise ValueError(f'expected at least 2D input (got {x.dim()}D input)')


class _AtomicBuffer:
    """A file opened for writing whose content reaches its path, atomically, when it is closed without an error (a
    ``with`` block that raises writes nothing)."""

    def __init__(self, path: str):
        super().__init__()
        self._path = path

    def _content(self) -> bytes:
        raise NotImplementedError

    def close(self):
        if not self.closed:
            data = self._content()
            super().close()
            atomic_write(self._path, data)

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            super().close()  # discard
        else:
            self.close()


class _AtomicTextFile(_AtomicBuffer, io.StringIO):
    def _content(self) -> bytes:
        return self.getvalue().encode()


class _AtomicBinaryFile(_AtomicBuffer, io.BytesIO):
    def _content(self) -> bytes:
        return self.getvalue()


def atomic_open(file, mode: str = 'r', *args, **kwargs):
    """``open`` whose plain write modes (``'w'``, ``'wt'``, ``'wb'``) write atomically on close; any other mode is
    ``open`` itself."""
    if mode in ('w', 'wt'):
        return _AtomicTextFile(os.fspath(file))
    if mode == 'wb':
        return _AtomicBinaryFile(os.fspath(file))
    return builtins.open(file, mode, *args, **kwargs)


class AtomicLocalBackend(LocalBackend):
    """mmengine's file backend of local paths, whose ``put`` / ``put_text`` write atomically."""

    def put(self, obj: bytes, filepath) -> None:
        atomic_write(filepath, obj)

    def put_text(self, obj: str, filepath, encoding: str = 'utf-8') -> None:
        atomic_write(filepath, obj.encode(encoding))


def _apply():
    if 'SyncBNCPU' not in MODELS.module_dict:
        MODELS.register_module('SyncBNCPU', module=SyncBatchNormCPU)
    register_backend('local', AtomicLocalBackend, force=True, prefixes='')
    _mm_checkpoint_hook.open = atomic_open  # the last_checkpoint pointer (scalablevit.upstream)


_apply()
