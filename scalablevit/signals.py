"""SIGTERM / SIGUSR1 as a request to stop at the next safe point, agreed by every process, losing nothing.

SLURM sends one of them to every process of a job step before a preemption or the time limit (``#SBATCH
--signal=USR1@120``), DataLoader workers included; ``kill -- -PGID`` does the same to a process group. The training
commands of the three tasks run inside one :class:`StopOnSignal`, from their first line to their exit:

* the scripts hold the two signals (blocked: a signal that arrives waits) from their first statement, before
  torch is imported, and :meth:`StopOnSignal.install` releases them once its handler is in place, so a signal at
  start-up is a stop request like any other (commands that do not train call :func:`release_stop_signals`
  instead, and a signal stops them the usual way);
* the handler only records the signal; the training loops (``classification/main.py``'s, and
  :class:`scalablevit.mm.resume.PreemptionHook`'s for detection and segmentation) poll :meth:`StopOnSignal.requested`
  before training and between optimizer steps, save what resuming needs, and end with
  :data:`scalablevit.errors.EXIT_STOPPED`; a second signal while a checkpoint is written changes nothing;
* a DataLoader worker ignores both (:func:`ignore_stop_signals`, its ``worker_init_fn``; torch's own worker
  handler would let it die of SLURM's SIGTERM): the main process decides, and ends its workers when it stops. The
  handler a worker inherits does nothing outside the process that installed it.
"""
import os
import signal
import threading
from typing import Callable, Optional, Tuple

import torch
import torch.distributed as dist

__all__ = ['STOP_SIGNALS', 'StopOnSignal', 'WorkerInit', 'guard_loader_workers', 'hold_stop_signals',
           'ignore_stop_signals', 'release_stop_signals']

#: The signals that ask a training run to stop and save.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def hold_stop_signals() -> None:
    """Block :data:`STOP_SIGNALS` in this thread (and the threads and processes it starts): one that arrives waits
    until :meth:`StopOnSignal.install` or :func:`release_stop_signals`. (The scripts do the same in their first
    lines with the standard library alone, before this module, which imports torch, can be.)"""
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)


def release_stop_signals() -> None:
    """Unblock :data:`STOP_SIGNALS`: a held one is delivered now, to whatever handler is in place."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


def _take_worker_signals(parent: int) -> None:
    """The signal thread of a DataLoader worker: SIGTERM from the main process (DataLoader shutting its workers
    down) ends the worker at once with status 0, as torch's own handler does (``_exit(EXIT_SUCCESS)`` in
    ``torch/csrc/DataLoader.cpp``; the only ``os._exit`` of the package); any other SIGTERM or SIGUSR1 is
    dropped."""
    while True:
        info = signal.sigwaitinfo(STOP_SIGNALS)
        if info.si_signo == signal.SIGTERM and info.si_pid == parent:
            os._exit(0)


def ignore_stop_signals(worker_id: int = 0) -> None:
    """A DataLoader ``worker_init_fn``: the worker leaves SIGTERM / SIGUSR1 to the main process.

    torch's worker loop installs a SIGTERM handler of its own that lets the worker die of a SIGTERM not sent by
    its main process, as SLURM's (sent to every process of the job) is, and the main process then fails with
    "DataLoader worker is killed by signal". Here both signals are held in the worker and taken by a thread: a
    SIGTERM from the main process still ends the worker at once (torch's shutdown), every other one is dropped.
    """
    parent = os.getppid()
    hold_stop_signals()
    threading.Thread(target=_take_worker_signals, args=(parent,), name='stop-signals', daemon=True).start()


class WorkerInit:
    """A ``worker_init_fn``: :func:`ignore_stop_signals`, then ``init_fn`` (mmengine's seeding, for example)."""

    def __init__(self, init_fn: Optional[Callable[[int], None]] = None):
        self.init_fn = init_fn

    def __call__(self, worker_id: int) -> None:
        ignore_stop_signals(worker_id)
        if self.init_fn is not None:
            self.init_fn(worker_id)


def guard_loader_workers(loader) -> None:
    """Make the future workers of the DataLoader ``loader`` leave stop signals to the main process (its
    ``worker_init_fn`` becomes a :class:`WorkerInit` around the one it had; read when an iterator starts)."""
    if loader is not None and not isinstance(loader.worker_init_fn, WorkerInit):
        loader.worker_init_fn = WorkerInit(loader.worker_init_fn)


class StopOnSignal:
    """A context that turns SIGTERM / SIGUSR1 into a stop request the training loop polls.

    The handler only records the signal, in the process that installed it; in a forked child it does nothing.
    :meth:`requested` agrees over all processes (one all-reduce), so every rank stops after the same step.
    :meth:`installed` finds the instance whose handler is in place, so that the command and its training loop
    share one.
    """

    def __init__(self):
        self.received: Optional[str] = None
        self.step: Optional[int] = None  # for the loop: where it stopped
        self._pid = os.getpid()
        self._previous = {}

    @classmethod
    def installed(cls) -> Optional['StopOnSignal']:
        """The instance whose handler this process has installed for SIGTERM, if any."""
        handler = signal.getsignal(signal.SIGTERM)
        owner = getattr(handler, '__self__', None)
        return owner if isinstance(owner, cls) and owner._pid == os.getpid() else None

    @classmethod
    def installed_or_new(cls) -> Tuple['StopOnSignal', bool]:
        """The instance whose handler is in place (the command's, :func:`scalablevit.cli.run_command`), else a new
        one installed now; and whether it is new (then the caller uninstalls it when it is done)."""
        stop = cls.installed()
        if stop is not None:
            return stop, False
        stop = cls()
        stop.install()
        return stop, True

    def __enter__(self) -> 'StopOnSignal':
        self.install()
        return self

    def __exit__(self, *exc):
        self.uninstall()

    def install(self):
        """Install the handlers, then release signals held until now (main thread only: Python delivers signals
        there; elsewhere this does nothing)."""
        if threading.current_thread() is not threading.main_thread():
            return
        self._pid = os.getpid()
        for sig in STOP_SIGNALS:
            if sig not in self._previous:
                self._previous[sig] = signal.signal(sig, self._handle)
        release_stop_signals()

    def uninstall(self):
        """Put back the handlers that were there before."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame):
        if os.getpid() == self._pid:  # a forked DataLoader worker leaves the decision to the main process
            self.received = signal.Signals(signum).name

    def requested(self, device: torch.device) -> bool:
        """Whether any process received a signal; a collective when distributed (``device`` is the backend's).
        Every process then holds the same ``received``: the signal one of them got (the higher number of two)."""
        if not (dist.is_available() and dist.is_initialized()):
            return self.received is not None
        number = torch.tensor([float(signal.Signals[self.received]) if self.received else 0.], device=device)
        dist.all_reduce(number, op=dist.ReduceOp.MAX)
        if number.item() > 0:
            self.received = signal.Signals(int(number.item())).name
        return number.item() > 0
