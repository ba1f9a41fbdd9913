"""Hooks that the detection / segmentation tests put into a run through ``custom_imports`` (``PYTHONPATH=tests``):
faults at a chosen iteration, and each rank's weights at the end."""
import os
import signal
from collections import namedtuple

import torch
from mmengine.dist import get_rank
from mmengine.hooks import Hook
from mmengine.registry import HOOKS


@HOOKS.register_module()
class SignalAtIterHook(Hook):
    """Send ``sig`` to this process right after training iteration ``iteration`` (1-based) on rank ``rank``: the
    preemption notice as SLURM gives it, at a known place. A resumed run starts after it and never sends it."""

    priority = 'NORMAL'  # before PreemptionHook (LOWEST) in the same iteration

    def __init__(self, iteration: int, rank: int = 0, sig: str = 'SIGTERM', twice: bool = False, job: bool = False):
        self.iteration, self.rank, self.sig, self.twice, self.job = iteration, rank, getattr(signal, sig), twice, job

    def _send(self, runner):
        if not self.job:
            os.kill(os.getpid(), self.sig)
            return
        # SLURM's way: every process of the job, from the launcher (tools/torchrun.py) down to the loader workers
        from conftest import signal_job
        root = os.getppid() if 'TORCHELASTIC_RUN_ID' in os.environ else os.getpid()
        pids = signal_job(root, self.sig)
        with open(os.path.join(runner.work_dir, 'signalled.txt'), 'a') as f:
            f.write(f'{len(pids)}\n')

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        if runner.iter + 1 == self.iteration and get_rank() == self.rank:
            self._send(runner)

    def before_save_checkpoint(self, runner, checkpoint):
        if self.twice and checkpoint['meta'].get('preemption'):  # a second notice while the checkpoint is written
            self._send(runner)


@HOOKS.register_module()
class StartGateHook(Hook):
    """Hold each rank in ``before_run`` (the Runner is built, training has not begun) until a stop signal has
    arrived, after writing ``started_rank{r}`` into the work folder: the test signals the job at that moment, not
    after a guessed delay (a fast machine trains the tiny config to its end in a few seconds)."""

    def __init__(self, timeout: float = 120.0):
        self.timeout = timeout

    def before_run(self, runner):
        import time

        from scalablevit.signals import StopOnSignal
        with open(os.path.join(runner.work_dir, f'started_rank{get_rank()}'), 'w'):
            pass
        end = time.monotonic() + self.timeout
        stop = StopOnSignal.installed()
        while time.monotonic() < end and (stop is None or stop.received is None):
            time.sleep(0.02)
            stop = StopOnSignal.installed()


@HOOKS.register_module()
class FullDiskAfterEpochHook(Hook):
    """From epoch ``epoch`` + 1 on, every file grows to at most ``limit`` bytes (writes beyond fail with EFBIG, as on a
    full disk) and the disk reports ``free`` bytes free."""

    def __init__(self, epoch: int = 1, limit: int = 1 << 20, free: int = 1 << 18):
        self.epoch, self.limit, self.free = epoch, limit, free

    def before_train_epoch(self, runner):
        if runner.epoch != self.epoch:
            return
        import resource
        import shutil
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (self.limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
        usage = namedtuple('usage', 'total used free')
        shutil.disk_usage = lambda path: usage(1 << 30, (1 << 30) - self.free, self.free)


@HOOKS.register_module()
class DumpWeightsHook(Hook):
    """Each rank's weights at the end of the run, as ``weights_rank<r>.pth`` in the work dir (mmengine's checkpoints
    come from rank 0 only)."""

    def after_run(self, runner):
        model = getattr(runner.model, 'module', runner.model)
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()},
                   os.path.join(runner.work_dir, f'weights_rank{get_rank()}.pth'))


@HOOKS.register_module()
class SignalInValHook(Hook):
    """Send ``sig`` to this process before the first iteration of the validation after epoch ``epoch`` (on rank
    ``rank``): the notice arriving while a validation runs. A resumed run, past that epoch, never sends it."""

    def __init__(self, epoch: int = 1, rank: int = 0, sig: str = 'SIGTERM'):
        self.epoch, self.rank, self.sig = epoch, rank, getattr(signal, sig)

    def before_val_iter(self, runner, batch_idx, data_batch=None):
        if runner.epoch == self.epoch and batch_idx == 0 and get_rank() == self.rank:
            os.kill(os.getpid(), self.sig)
