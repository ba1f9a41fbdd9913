"""SIGTERM / SIGUSR1 as a request to stop at the next safe point, agreed by every process.

SLURM sends one of them before a preemption or the time limit (``#SBATCH --signal=USR1@120``), and torchrun
forwards SIGTERM to its workers. The training loops of the three tasks (``classification/main.py``'s, and
:class:`scalablevit.mm.resume.PreemptionHook`'s for detection and segmentation) poll :meth:`StopOnSignal.requested`
between optimizer steps, save what resuming needs, and end with :data:`scalablevit.errors.EXIT_STOPPED`.
"""
import os
import signal
import threading
from typing import Optional

import torch
import torch.distributed as dist

__all__ = ['StopOnSignal']


class StopOnSignal:
    """A context that turns SIGTERM / SIGUSR1 into a stop request the training loop polls.

    The handler only records the signal, so a second signal while a checkpoint is written changes nothing. A
    DataLoader worker that inherits the handler gets the signal's default action instead. :meth:`requested` agrees
    over all processes (one all-reduce), so every rank stops after the same step.
    """

    SIGNALS = ('SIGTERM', 'SIGUSR1')

    def __init__(self):
        self.received: Optional[str] = None
        self.step: Optional[int] = None  # for the loop: where it stopped
        self._pid = os.getpid()
        self._previous = {}

    def __enter__(self) -> 'StopOnSignal':
        self.install()
        return self

    def __exit__(self, *exc):
        self.uninstall()

    def install(self):
        """Install the handlers (main thread only: Python delivers signals there; elsewhere this does nothing)."""
        if threading.current_thread() is not threading.main_thread():
            return
        self._pid = os.getpid()
        for name in self.SIGNALS:
            sig = getattr(signal, name, None)
            if sig is not None and sig not in self._previous:
                self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self):
        """Put back the handlers that were there before."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame):
        if os.getpid() != self._pid:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
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
