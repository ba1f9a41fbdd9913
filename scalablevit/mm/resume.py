"""Detection and segmentation runs that lose nothing on preemption, a kill or a full disk.

* :class:`PreemptionHook` (``custom_hooks`` of every config through the task's ``_base_/scalablevit_runtime.py``):
  on SIGTERM or SIGUSR1 every process agrees on the iteration to stop after (the next one that ends an optimizer
  step), rank 0 writes one checkpoint (``iter_<N>.pth``: model, optimizer, schedulers, message hub, the loop's
  epoch and iteration, the random states) and points ``last_checkpoint`` at it, and the run ends with
  :class:`scalablevit.errors.StoppedToResume`: one line, exit status 75 from our scripts.
* :class:`ResumableEpochBasedTrainLoop` / :class:`ResumableIterBasedTrainLoop`: mmengine's loops, except that a
  resumed run continues at the iteration it stopped at, also in the middle of an epoch: the batches already
  trained on are skipped in the sampler (no image is read for them) and none is left out; the random states of a
  :class:`PreemptionHook` checkpoint are restored just before the first batch is drawn, so with ``num_workers=0``
  the resumed run trains the same weights as one that never stopped. (With worker processes, which restart, the
  batches are the same and their augmentations are drawn anew.)
* :func:`find_resume_checkpoint`: ``--resume`` without a file takes the newest checkpoint of the work dir that can
  be read, and says so in one line when the newest cannot.

Atomic checkpoint files (every write of mmengine's, and the ``last_checkpoint`` pointer) are the patch 4 of
:mod:`scalablevit.mm.compat`.
"""
import contextlib
import itertools
import logging
import os
import os.path as osp
import random
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch
from mmengine.dist import all_gather_object, barrier, get_comm_device, get_rank, get_world_size, is_main_process
from mmengine.hooks import Hook
from mmengine.logging import print_log
from mmengine.registry import HOOKS, LOOPS
from mmengine.runner import EpochBasedTrainLoop, IterBasedTrainLoop
from mmengine.runner.loops import _InfiniteDataloaderIterator

from ..checkpoint import atomic_write
from ..errors import StoppedToResume
from ..signals import StopOnSignal

__all__ = ['PreemptionHook', 'ResumableEpochBasedTrainLoop', 'ResumableIterBasedTrainLoop', 'find_resume_checkpoint',
           'get_rng_state', 'set_rng_state']

#: Loops of mmengine and their resumable forms (``scalablevit.mm.runner`` swaps them in a config).
RESUMABLE_LOOPS = {'EpochBasedTrainLoop': 'ResumableEpochBasedTrainLoop',
                   'IterBasedTrainLoop': 'ResumableIterBasedTrainLoop'}


# ---------------------------------------------------------------------------------------------------------------------
# Random states, as types that torch.load(weights_only=True) reads

def get_rng_state() -> Dict[str, Any]:
    """Python's, NumPy's and torch's (CPU and every CUDA device) random states."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = dict(python=random.getstate(), torch=torch.get_rng_state(),
                 numpy=dict(kind=kind, keys=torch.from_numpy(keys.astype(np.int64)), pos=int(pos),
                            has_gauss=int(has_gauss), gauss=float(gauss)))
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    """Undo :func:`get_rng_state`."""
    version, internal, gauss = state['python']
    random.setstate((version, tuple(internal), gauss))
    n = state['numpy']
    np.random.set_state((n['kind'], n['keys'].numpy().astype(np.uint32), n['pos'], n['has_gauss'], n['gauss']))
    torch.set_rng_state(state['torch'])
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])


# ---------------------------------------------------------------------------------------------------------------------
# Skipping batches without reading them

class _SkipBatches:
    """A batch sampler that leaves out the first ``skip`` batches of another (their indices are drawn, so the order
    of the rest is the one the other gives; no sample is loaded)."""

    def __init__(self, batch_sampler, skip: int):
        self.batch_sampler, self.skip = batch_sampler, skip

    def __iter__(self) -> Iterator[List[int]]:
        return itertools.islice(iter(self.batch_sampler), self.skip, None)

    def __len__(self) -> int:
        return max(len(self.batch_sampler) - self.skip, 0)

    def __getattr__(self, name):  # .sampler, .batch_size, ... of the wrapped one
        return getattr(self.batch_sampler, name)


@contextlib.contextmanager
def _skipping(loader, skip: int):
    """``loader`` yields from its ``skip``-th batch on while inside (the iterators made inside keep doing so)."""
    if skip <= 0:
        yield loader
        return
    original = loader.batch_sampler
    if original is None:
        raise RuntimeError('resuming mid-epoch needs a dataloader with a batch sampler')
    object.__setattr__(loader, 'batch_sampler', _SkipBatches(original, skip))  # DataLoader forbids setting it
    try:
        yield loader
    finally:
        object.__setattr__(loader, 'batch_sampler', original)


class _ResumeMixin:
    """What both resumable loops share: the random states to restore before the first batch of a resumed run."""

    pending_rng_state: Optional[Dict[str, Any]] = None

    def _restore_rng(self):
        if self.pending_rng_state is not None:
            set_rng_state(self.pending_rng_state)
            self.pending_rng_state = None


@LOOPS.register_module()
class ResumableEpochBasedTrainLoop(_ResumeMixin, EpochBasedTrainLoop):
    """mmengine's ``EpochBasedTrainLoop`` that resumes in the middle of an epoch (same arguments)."""

    def run_epoch(self) -> None:
        self.runner.call_hook('before_train_epoch')  # sets the sampler's epoch
        self.runner.model.train()
        done = self._iter - self._epoch * len(self.dataloader)  # batches of this epoch already trained on
        if not 0 <= done <= len(self.dataloader):  # another number of processes or batch size than the checkpoint's
            print_log(f'resuming at iteration {self._iter}, which is not in epoch {self._epoch + 1} of this '
                      f'dataloader ({len(self.dataloader)} batches): the epoch starts from its first batch',
                      logger='current', level=logging.WARNING)
            done = 0
        if done:
            print_log(f'resuming epoch {self._epoch + 1} at batch {done + 1} of {len(self.dataloader)} (the first '
                      f'{done} are skipped in the sampler, not read)', logger='current')
        with _skipping(self.dataloader, done):
            batches = iter(self.dataloader)
        self._restore_rng()
        for idx, data_batch in enumerate(batches, start=done):
            self.run_iter(idx, data_batch)
        self.runner.call_hook('after_train_epoch')
        self._epoch += 1


@LOOPS.register_module()
class ResumableIterBasedTrainLoop(_ResumeMixin, IterBasedTrainLoop):
    """mmengine's ``IterBasedTrainLoop``, resuming without reading the batches already trained on (mmengine's own
    loop loads and drops all of them: minutes to hours at 40k of 80k iterations)."""

    def run(self):
        self.runner.call_hook('before_train')
        self.runner.call_hook('before_train_epoch')
        if self._iter > 0:
            loader, skip = self.dataloader, self._iter
            sampler = getattr(loader.batch_sampler, 'sampler', None)
            finite = not type(sampler).__name__.startswith('Infinite')
            epoch = 0
            if finite and len(loader):  # a sampler with an end: whole passes first, as _InfiniteDataloaderIterator
                epoch, skip = divmod(skip, len(loader))
                if epoch and hasattr(sampler, 'set_epoch'):
                    sampler.set_epoch(epoch)
            print_log(f'resuming at iteration {self._iter + 1} of {self._max_iters} (the batches trained on are '
                      f'skipped in the sampler, not read)', logger='current')
            with _skipping(loader, skip):
                self.dataloader_iterator = _InfiniteDataloaderIterator(loader)
            self.dataloader_iterator._epoch = epoch
        self._restore_rng()
        while self._iter < self._max_iters and not self.stop_training:
            self.runner.model.train()
            data_batch = next(self.dataloader_iterator)
            self.run_iter(data_batch)
            self._decide_current_val_interval()
            if (self.runner.val_loop is not None and self._iter >= self.val_begin
                    and (self._iter % self.val_interval == 0 or self._iter == self._max_iters)):
                self.runner.val_loop.run()
        self.runner.call_hook('after_train_epoch')
        self.runner.call_hook('after_train')
        return self.runner.model


# ---------------------------------------------------------------------------------------------------------------------
# The hook

@HOOKS.register_module()
class PreemptionHook(Hook):
    """On SIGTERM / SIGUSR1: agree on an iteration, write one checkpoint there, stop with a one-line message.

    The check runs after every training iteration that ended an optimizer step (with gradient accumulation, the
    accumulated gradient is never cut in half) and after each validation during training; it is one all-reduce of
    one number. The hook runs after every other hook of an iteration, so the checkpoint holds the iteration's
    scheduler step and logs. A second signal while saving changes nothing; the write is atomic.

    Args:
        check_interval: check every N iterations (1: every one). Default: 1.
    """

    priority = 'LOWEST'

    def __init__(self, check_interval: int = 1):
        self.check_interval = max(1, int(check_interval))
        self.stop = StopOnSignal()
        self._training = False
        self._resumed_rng: Optional[Dict[str, Any]] = None

    # resuming
    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        states = ((checkpoint.get('meta') or {}).get('preemption') or {}).get('rng')
        if not states:
            return
        if len(states) != get_world_size():
            print_log(f'PreemptionHook: the checkpoint holds the random states of {len(states)} processes, this run '
                      f'has {get_world_size()}; the random streams restart from the seed', logger='current',
                      level=logging.WARNING)
            return
        self._resumed_rng = states[get_rank()]

    def before_train(self, runner) -> None:
        loop = runner.train_loop
        if self._resumed_rng is not None:
            if isinstance(loop, _ResumeMixin):
                loop.pending_rng_state = self._resumed_rng
            self._resumed_rng = None
        if not isinstance(loop, _ResumeMixin):
            print_log(f'PreemptionHook: the train loop is {type(loop).__name__}; a run resumed from a checkpoint taken '
                      f'mid-epoch starts that epoch again (use ResumableEpochBasedTrainLoop / '
                      f'ResumableIterBasedTrainLoop)', logger='current', level=logging.WARNING)
        self.stop.received = None
        self.stop.install()
        self._training = True

    def after_train(self, runner) -> None:
        self.stop.uninstall()
        self._training = False

    # stopping
    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        if (runner.iter + 1) % self.check_interval or not _optimizer_stepped(runner.optim_wrapper):
            return
        if self.stop.requested(get_comm_device()):
            self._save_and_stop(runner, iters_done=runner.iter + 1, mid_epoch=True)

    def after_val_epoch(self, runner, metrics=None) -> None:
        # a validation during training; after the last one the run ends in moments with nothing left to resume
        if self._training and runner.iter < runner.train_loop.max_iters and self.stop.requested(get_comm_device()):
            self._save_and_stop(runner, iters_done=runner.iter, mid_epoch=False)

    def _save_and_stop(self, runner, iters_done: int, mid_epoch: bool):
        loop = runner.train_loop
        epoch = runner.epoch  # the epoch being trained (mid-epoch), or the next one (after an epoch's validation)
        name = f'iter_{iters_done}.pth'
        rng = all_gather_object(get_rng_state())  # every process's, in rank order: each resumes its own streams
        meta = dict(epoch=epoch, iter=iters_done,
                    preemption=dict(signal=self.stop.received, rng=rng if mid_epoch else None))
        runner.save_checkpoint(runner.work_dir, name, save_optimizer=True, save_param_scheduler=True, meta=meta)
        path = osp.join(runner.work_dir, name)
        if is_main_process():
            atomic_write(osp.join(runner.work_dir, 'last_checkpoint'), path)  # what mmengine's resume reads
        barrier()  # nobody leaves before the checkpoint is whole
        self.stop.uninstall()
        self._training = False
        if not isinstance(loop, EpochBasedTrainLoop):
            where = f'iteration {iters_done} of {loop.max_iters}'
        elif mid_epoch:
            per_epoch = len(loop.dataloader)
            where = (f'epoch {epoch + 1} of {loop.max_epochs}, iteration {iters_done - epoch * per_epoch} of '
                     f'{per_epoch} ({iters_done} of {loop.max_iters} in all)')
        else:
            where = f'epoch {epoch} of {loop.max_epochs} and its validation'
        runner.call_hook('after_run')  # close the visualizer, copy the logs, as a finished run does
        raise StoppedToResume(f'stopped by {self.stop.received} after {where}; saved {path}; run the same command '
                              f'with --resume to continue')


def _optimizer_stepped(optim_wrapper) -> bool:
    """Whether the iteration that just ran ended an optimizer step (every one does without accumulation)."""
    wrappers = optim_wrapper.values() if hasattr(optim_wrapper, 'values') else [optim_wrapper]
    return all(getattr(w, 'should_update', lambda: True)() for w in wrappers)


# ---------------------------------------------------------------------------------------------------------------------
# Which checkpoint to resume from

def _checkpoints(work_dir: str) -> List[str]:
    """The work dir's ``*.pth`` files, newest first (atomic writes: the modification time is when it was done)."""
    try:
        names = [n for n in os.listdir(work_dir) if n.endswith('.pth')]
    except OSError:
        return []
    paths = [osp.join(work_dir, n) for n in names if osp.isfile(osp.join(work_dir, n))]
    return sorted(paths, key=lambda p: (osp.getmtime(p), p), reverse=True)


def unreadable_reason(path: str) -> Optional[str]:
    """Why ``path`` cannot be resumed from (not a checkpoint, truncated, no training state), or ``None``.

    Reads the pickled structure with the tensors memory-mapped, not their data: cheap even for large files.
    """
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001  (any reason a load fails)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        return f'{type(e).__name__}: {first[:200]}'
    if not isinstance(ckpt, dict) or not {'state_dict', 'meta'} <= set(ckpt):
        return 'not an mmengine training checkpoint (no state_dict / meta)'
    if 'iter' not in ckpt['meta'] or 'epoch' not in ckpt['meta']:
        return 'its meta has no epoch / iter'
    return None


def find_resume_checkpoint(work_dir: str) -> Tuple[Optional[str], List[Tuple[str, str]]]:
    """(the newest checkpoint of ``work_dir`` that can be resumed from, or None; the newer ones that cannot, each
    with its reason)."""
    bad = []
    for path in _checkpoints(work_dir):
        reason = unreadable_reason(path)
        if reason is None:
            return path, bad
        bad.append((path, reason))
    return None, bad
