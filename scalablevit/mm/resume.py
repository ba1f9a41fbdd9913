"""Detection and segmentation runs that lose nothing on preemption, a kill or a full disk.

* :class:`PreemptionHook` (``custom_hooks`` of every config through the task's ``_base_/scalablevit_runtime.py``):
  on SIGTERM or SIGUSR1 every process agrees on the iteration to stop after (the next one that ends an optimizer
  step), rank 0 writes one checkpoint (``iter_<N>.pth``: model, optimizer, schedulers, message hub, the loop's
  epoch and iteration, the random states) and points ``last_checkpoint`` at it, and the run ends with
  :class:`scalablevit.errors.StoppedToResume`: one line, exit status 75 from our scripts.
* :class:`ResumableEpochBasedTrainLoop` / :class:`ResumableIterBasedTrainLoop`: mmengine's loops, except that a
  resumed run continues at the iteration it stopped at, also in the middle of an epoch, and trains what the run
  that never stopped would have trained: the batches already trained on are skipped in the sampler (no image is
  read for them, none is left out); each sample's augmentation is seeded from its place in the run
  (:class:`ResumableBatchSampler`, :class:`SeededPipeline`), so it does not depend on which worker process loads
  it, with 0, 2 or persistent workers; and the random states of a :class:`PreemptionHook` checkpoint are restored
  just before the first batch is drawn.
* :func:`find_resume_checkpoint`: ``--resume`` without a file takes the newest checkpoint of the work dir that can
  be read, and says so in one line when the newest cannot.

Atomic checkpoint files (every write of mmengine's, and the ``last_checkpoint`` pointer) are the patch 4 of
:mod:`scalablevit.mm.compat`.
"""
import copy
import itertools
import logging
import os.path as osp
import random
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch
from mmengine.dist import all_gather_object, barrier, get_comm_device, get_rank, get_world_size, is_main_process
from mmengine.hooks import CheckpointHook, Hook
from mmengine.logging import print_log
from mmengine.registry import DATA_SAMPLERS, HOOKS, LOOPS
from mmengine.runner import EpochBasedTrainLoop, IterBasedTrainLoop
from torch.utils.data import BatchSampler

from ..checkpoint import CheckpointError, atomic_write, checkpoint_files
from ..errors import StoppedToResume, UserError
from ..signals import StopOnSignal, guard_loader_workers
from .checkpoint import load_mm_checkpoint

__all__ = ['CheckpointHookWriteFirst', 'PreemptionHook', 'ResumableBatchSampler', 'ResumableEpochBasedTrainLoop',
           'ResumableIterBasedTrainLoop', 'SeededIndex', 'SeededPipeline', 'find_resume_checkpoint', 'get_rng_state',
           'set_rng_state']

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
# Batches that can be skipped without reading them, and samples whose augmentation does not depend on the worker

class SeededIndex(int):
    """A sample index that carries the seed of that sample's random augmentation (through the index queue of the
    DataLoader's workers, to the dataset and its :class:`SeededPipeline`)."""

    def __new__(cls, value: int, seed: int):
        self = super().__new__(cls, value)
        self.seed = seed
        return self

    def __reduce__(self):
        return SeededIndex, (int(self), self.seed)


def _sample_seed(seed: int, rank: int, batch: int, position: int) -> int:
    return int(np.random.SeedSequence([seed % 2 ** 32, rank, batch, position]).generate_state(1)[0])


@DATA_SAMPLERS.register_module()
class ResumableBatchSampler:
    """The training batch sampler of the resumable loops: the config's own (``batch_sampler``, e.g. mmdet's
    ``AspectRatioBatchSampler``; torch's ``BatchSampler`` if it has none) with two additions.

    * :meth:`start` makes the next pass leave out its first ``skip`` batches: their indices are drawn (the order of
      the rest is the one the wrapped sampler gives) but no sample is loaded;
    * every index it gives is a :class:`SeededIndex` whose seed is a function of (the run's seed, the rank, the
      batch's number in the whole run, its place in the batch), so a sample's augmentation is the same whichever
      worker process loads it, and a run resumed mid-epoch draws what the uninterrupted run drew, with any number
      of workers, persistent or not.

    The resumable loops put it into their dataloader's config; ``sampler`` / ``batch_size`` / ``drop_last`` are
    what mmengine's ``build_dataloader`` gives a batch sampler.
    """

    def __init__(self, sampler, batch_size: int, batch_sampler: Optional[dict] = None, drop_last: bool = False):
        self.sampler, self.batch_size = sampler, batch_size
        if batch_sampler is None:
            self.batch_sampler = BatchSampler(sampler, batch_size, drop_last)
        else:
            self.batch_sampler = DATA_SAMPLERS.build(batch_sampler, default_args=dict(sampler=sampler,
                                                                                       batch_size=batch_size))
        self.seed, self.rank = 0, get_rank()
        self._first, self._skip, self._armed = 0, 0, False
        # mmengine's InfiniteSampler is one stream for the whole run (its __iter__ hands out one generator): it is
        # read through one iterator, kept here across passes
        self.infinite = type(sampler).__name__.startswith('Infinite')
        self._stream: Optional[Iterator[List[int]]] = None

    def start(self, first: int, skip: int = 0, seed: Optional[int] = None) -> None:
        """Arm the next pass: its first batch is batch number ``first`` of the run, and its first ``skip`` batches
        are left out. ``seed``: the run's (a resumed run has the checkpoint's). A pass not armed gives no batch:
        the loops arm each one, and the iterator mmengine's ``IterBasedTrainLoop`` makes when it is built (and
        this loop replaces) reads nothing from the stream."""
        self._first, self._skip, self._armed = first, skip, True
        if seed is not None:
            self.seed = seed

    def __iter__(self) -> Iterator[List[SeededIndex]]:
        if not self._armed:
            return
        first, skip, self._skip, self._armed = self._first, self._skip, 0, False
        if self.infinite:
            self._stream = self._stream or iter(self.batch_sampler)
            batches = self._stream
        else:
            batches = iter(self.batch_sampler)
        for pos in itertools.count():
            batch = next(batches, None)
            if batch is None:
                return
            if pos >= skip:
                yield [SeededIndex(i, _sample_seed(self.seed, self.rank, first + pos, j)) for j, i in enumerate(batch)]

    def __len__(self) -> int:
        return len(self.batch_sampler)


class SeededPipeline:
    """A dataset's pipeline that runs each :class:`SeededIndex` sample with Python's, NumPy's and torch's random
    streams seeded from the index, then gives the process its own streams back. A sample the pipeline drops
    (``None``: the dataset draws another one) leaves the seeded streams in place, so that draw is reproducible too.
    Any other index runs as before."""

    def __init__(self, pipeline):
        self.pipeline = pipeline

    def __call__(self, data_info: dict):
        idx = data_info.get('sample_idx')
        seed = getattr(idx, 'seed', None)
        if seed is None:
            return self.pipeline(data_info)
        data_info['sample_idx'] = int(idx)
        state = get_rng_state()
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        result = self.pipeline(data_info)
        if result is not None:
            set_rng_state(state)
        return result

    def __getattr__(self, name):  # .transforms, ... of the wrapped pipeline
        return getattr(self.__dict__['pipeline'], name)


def _seed_pipelines(dataset) -> bool:
    """Wrap the pipeline of ``dataset`` (and of the data sets inside mmengine's dataset wrappers) in a
    :class:`SeededPipeline`; returns whether every one had a pipeline."""
    inner = getattr(dataset, 'datasets', None) or ([dataset.dataset] if hasattr(dataset, 'dataset') else None)
    if inner:
        return all([_seed_pipelines(d) for d in inner])
    pipeline = getattr(dataset, 'pipeline', None)
    if pipeline is None:
        return False
    if not isinstance(pipeline, SeededPipeline):
        dataset.pipeline = SeededPipeline(pipeline)
    return True


def resumable_dataloader(dataloader):
    """A training dataloader's config with its batch sampler wrapped in :class:`ResumableBatchSampler` (a
    ``DataLoader`` object is returned as it is)."""
    wrapped = (dataloader.get('batch_sampler') or {}).get('type') if isinstance(dataloader, dict) else None
    if not isinstance(dataloader, dict) or wrapped == 'ResumableBatchSampler':
        return dataloader
    dataloader = copy.deepcopy(dataloader)
    dataloader['batch_sampler'] = dict(type='ResumableBatchSampler', batch_sampler=dataloader.get('batch_sampler'),
                                       drop_last=dataloader.pop('drop_last', False))
    return dataloader


class _ResumeMixin:
    """What both resumable loops share: their dataloader's :class:`ResumableBatchSampler` and seeded pipelines, and
    the random states to restore before the first batch of a resumed run."""

    pending_rng_state: Optional[Dict[str, Any]] = None

    def __init__(self, runner, dataloader, *args, **kwargs):
        if not isinstance(dataloader, dict):
            raise UserError(f'{type(self).__name__} needs its dataloader as a config (a dict), not a built DataLoader')
        # built here, as mmengine's BaseLoop would, so that its workers are set up before mmengine's
        # IterBasedTrainLoop starts an iterator on it (persistent workers are forked then)
        diff_rank_seed = (runner.cfg.get('randomness') or {}).get('diff_rank_seed', False)
        loader = runner.build_dataloader(resumable_dataloader(dataloader), seed=runner.seed,
                                         diff_rank_seed=diff_rank_seed)
        if not _seed_pipelines(loader.dataset):
            print_log(f'{type(self).__name__}: {type(loader.dataset).__name__} has no pipeline to seed; a resumed '
                      f'run draws its augmentations anew', logger='current', level=logging.WARNING)
        guard_loader_workers(loader)  # SLURM signals the workers too: they leave it to the main process
        self.batch_sampler = loader.batch_sampler
        super().__init__(runner, loader, *args, **kwargs)

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
        per_epoch = len(self.dataloader)
        done = self._iter - self._epoch * per_epoch  # batches of this epoch already trained on
        if not 0 <= done <= per_epoch:  # another number of processes or batch size than the checkpoint's
            print_log(f'resuming at iteration {self._iter}, which is not in epoch {self._epoch + 1} of this '
                      f'dataloader ({per_epoch} batches): the epoch starts from its first batch',
                      logger='current', level=logging.WARNING)
            done = 0
        if done:
            print_log(f'resuming epoch {self._epoch + 1} at batch {done + 1} of {per_epoch} (the first {done} are '
                      f'skipped in the sampler, not read)', logger='current')
        self.batch_sampler.start(self._epoch * per_epoch, skip=done, seed=self.runner.seed)
        batches = iter(self.dataloader)
        self._restore_rng()
        for idx, data_batch in enumerate(batches, start=done):
            self.run_iter(idx, data_batch)
        self.runner.call_hook('after_train_epoch')
        self._epoch += 1


class _RunBatches:
    """The iterator of :class:`ResumableIterBasedTrainLoop`: the dataloader's batches without end (a sampler with
    an end starts its next pass, with ``set_epoch``), from the loop's iteration on. mmengine's ``run`` first calls
    ``next`` once per iteration already trained, to advance its own iterator through them: those calls read
    nothing here (the sampler skips the batches)."""

    def __init__(self, loop: 'ResumableIterBasedTrainLoop'):
        self.loop, self.advancing = loop, loop.iter
        done = loop.iter
        self.per_pass = 0 if loop.batch_sampler.infinite else len(loop.dataloader)
        self.epoch, skip = divmod(done, self.per_pass) if self.per_pass else (0, done)
        self._start_pass(skip)
        if done:
            print_log(f'resuming at iteration {done + 1} of {loop.max_iters} (the batches trained on are skipped in '
                      f'the sampler, not read)', logger='current')
        self._batches = None

    def _start_pass(self, skip: int = 0) -> None:
        """Arm the sampler for pass ``self.epoch`` (its ``set_epoch`` after the first), leaving out ``skip``."""
        sampler = self.loop.batch_sampler.sampler
        if self.epoch and hasattr(sampler, 'set_epoch'):
            sampler.set_epoch(self.epoch)
        self.loop.batch_sampler.start(self.epoch * self.per_pass, skip=skip, seed=self.loop.runner.seed)

    def __iter__(self):
        return self

    def __next__(self):
        if self.advancing:
            self.advancing -= 1
            return None
        if self._batches is None:
            self._batches = iter(self.loop.dataloader)
            self.loop._restore_rng()
        try:
            return next(self._batches)
        except StopIteration:  # a sampler with an end: its next pass
            self.epoch += 1
            self._start_pass()
            self._batches = iter(self.loop.dataloader)
            return next(self._batches)


@LOOPS.register_module()
class ResumableIterBasedTrainLoop(_ResumeMixin, IterBasedTrainLoop):
    """mmengine's ``IterBasedTrainLoop``, resuming without reading the batches already trained on (mmengine's own
    loop loads and drops all of them)."""

    def run(self):
        self.dataloader_iterator = _RunBatches(self)
        return super().run()


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
        self.stop: Optional[StopOnSignal] = None
        self._own_stop = False  # installed by this hook (a run outside our scripts), so removed by it too
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
        # the command's handler (scalablevit.cli.run_command: installed at its first line), else one of our own
        self.stop, self._own_stop = StopOnSignal.installed_or_new()
        self._training = True
        # SLURM signals the loader workers too: they leave it to this process
        guard_loader_workers(getattr(loop, 'dataloader', None))
        if runner.val_loop is not None:
            guard_loader_workers(getattr(runner.val_loop, 'dataloader', None))
        if self.stop.requested(get_comm_device()):  # a signal while the run started: nothing trained to save
            self._release()
            runner.call_hook('after_run')  # close the visualizer, copy the logs, as a finished run does
            raise StoppedToResume(f'stopped by {self.stop.received} before training began; nothing new to save; '
                                  f'run the same command again')

    def after_train(self, runner) -> None:
        self._release()

    def _release(self):
        if self._own_stop:
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
        self._release()
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


class _RemoveAfterWrite:
    """A file backend whose ``remove`` / ``rmtree`` wait until :meth:`flush`; everything else is the wrapped one's."""

    def __init__(self, backend):
        self.backend, self.pending = backend, []

    def remove(self, path):
        self.pending.append(('remove', path))

    def rmtree(self, path):
        self.pending.append(('rmtree', path))

    def flush(self):
        pending, self.pending = self.pending, []
        for op, path in pending:
            if op == 'rmtree' or self.backend.isfile(path):
                getattr(self.backend, op)(path)

    def __getattr__(self, name):
        return getattr(self.__dict__['backend'], name)


class CheckpointHookWriteFirst(CheckpointHook):
    """mmengine's ``CheckpointHook`` (same arguments, registered in its place) that writes a checkpoint before it
    deletes the ones it replaces: mmengine deletes the oldest checkpoint (``max_keep_ckpts``) and the previous best
    one first, so a kill during the save, with ``max_keep_ckpts=1`` or of a new best, left no checkpoint at all.
    The deletions of a save happen once it is written; if it fails, the old files stay."""

    def before_train(self, runner) -> None:
        super().before_train(runner)
        self.file_backend = _RemoveAfterWrite(self.file_backend)
        self.file_backend.flush()  # the surplus beyond max_keep_ckpts of a resumed run: nothing replaces them

    def after_train_epoch(self, runner) -> None:
        super().after_train_epoch(runner)
        self.file_backend.flush()

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        super().after_train_iter(runner, batch_idx, data_batch, outputs)
        self.file_backend.flush()

    def after_val_epoch(self, runner, metrics) -> None:
        super().after_val_epoch(runner, metrics)
        self.file_backend.flush()


HOOKS.register_module('CheckpointHook', module=CheckpointHookWriteFirst, force=True)


def _optimizer_stepped(optim_wrapper) -> bool:
    """Whether the iteration that just ran ended an optimizer step (every one does without accumulation)."""
    wrappers = optim_wrapper.values() if hasattr(optim_wrapper, 'values') else [optim_wrapper]
    return all(getattr(w, 'should_update', lambda: True)() for w in wrappers)


# ---------------------------------------------------------------------------------------------------------------------
# Which checkpoint to resume from

def unreadable_reason(path: str) -> Optional[str]:
    """Why ``path`` cannot be resumed from (not a checkpoint, truncated, no training state), or ``None``.

    Reads the pickled structure with the tensors memory-mapped, not their data: cheap even for large files.
    """
    try:
        ckpt = load_mm_checkpoint(path, mmap=True)
    except CheckpointError as e:
        return str(e).replace(f'cannot read checkpoint {path}: ', '')
    if not {'state_dict', 'meta'} <= set(ckpt):
        return 'not an mmengine training checkpoint (no state_dict / meta)'
    if 'iter' not in ckpt['meta'] or 'epoch' not in ckpt['meta']:
        return 'its meta has no epoch / iter'
    return None


def find_resume_checkpoint(work_dir: str) -> Tuple[Optional[str], List[Tuple[str, str]]]:
    """(the newest checkpoint of ``work_dir`` that can be resumed from, or None; the newer ones that cannot, each
    with its reason)."""
    bad = []
    for path in checkpoint_files(work_dir):
        reason = unreadable_reason(path)
        if reason is None:
            return path, bad
        bad.append((path, reason))
    return None, bad
