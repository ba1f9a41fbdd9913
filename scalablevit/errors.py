"""The errors a user can act on, and how a command ends on them.

Library code raises :class:`UserError` (a wrong path, data set, checkpoint or flag: the message says what and how to
fix it) and :class:`StoppedToResume` (a run that saved its state on SIGTERM / SIGUSR1). Only a script's entry point
turns them into one line and an exit status, through :func:`run_main`; called from a notebook, they are ordinary
exceptions.

Exit statuses of the project's commands:

* 0: done; :data:`EXIT_ERROR` (1): a user error, its line printed;
* :data:`EXIT_STOPPED` (75, ``EX_TEMPFAIL``): stopped by a signal after writing a checkpoint; run the same command
  with ``--resume`` (``--resume auto`` in ``classification/``) to continue. A requeueing script tests for it;
* :data:`EXIT_REPORTED` (3): under ``torchrun``, a worker whose line (an error, or the stop) is in its torchelastic
  error file. ``tools/torchrun.py`` prints that line once and exits 1 (75 for a stop); plain ``torchrun`` shows it
  in its failure report.
"""
import contextlib
import json
import os
import sys
import time
from typing import Any, Callable

__all__ = ['EXIT_ERROR', 'EXIT_REPORTED', 'EXIT_STOPPED', 'StoppedToResume', 'UserError', 'error_line',
           'met_by_this_process', 'report', 'run_main']

EXIT_ERROR = 1
EXIT_REPORTED = 3
EXIT_STOPPED = 75

#: Set by ``tools/torchrun.py`` for its workers: it prints their reported line itself.
LAUNCHER_REPORTS = 'SCALABLEVIT_LAUNCHER_REPORTS'


class UserError(Exception):
    """A problem with the user's input that the message explains in one line (no traceback is shown)."""


class StoppedToResume(Exception):
    """A run stopped by a signal after saving what resuming needs; the message says where and how to go on."""


def error_line(error: BaseException) -> str:
    """The one line to show for ``error``. An exception re-raised by a ``DataLoader`` worker carries the worker's
    whole traceback in its message; the original message is its last line."""
    text = str(error).strip()
    if 'Original Traceback' in text:
        last = text.splitlines()[-1]
        text = last.split(': ', 1)[1] if ': ' in last else last
    return text or type(error).__name__


@contextlib.contextmanager
def met_by_this_process():
    """Marks the :class:`UserError` raised inside as this process's own (an unreadable image met while training, a
    full disk): unlike a wrong flag or data set, which every process meets alike and rank 0 alone reports, every
    process that meets one reports it."""
    try:
        yield
    except UserError as e:
        e.own = True
        raise


def report(line: str, own: bool = False) -> None:
    """Show ``line`` once per command, whatever the number of processes.

    One process: stderr. Under ``torchrun``: the line goes into this worker's torchelastic error file (the launcher
    reads it when the worker exits); the process of rank 0, or any process for a line of its ``own``
    (:func:`met_by_this_process`), also prints it unless ``tools/torchrun.py`` will.
    """
    error_file = os.environ.get('TORCHELASTIC_ERROR_FILE')
    if error_file:
        try:
            with open(error_file, 'w') as f:
                json.dump({'message': line, 'timestamp': int(time.time())}, f)
        except OSError:
            error_file = None  # print it instead
    if not error_file or (os.environ.get(LAUNCHER_REPORTS) != '1' and (own or os.environ.get('RANK', '0') == '0')):
        print(line, file=sys.stderr, flush=True)


def _under_torchrun() -> bool:
    return bool(os.environ.get('TORCHELASTIC_ERROR_FILE'))


def run_main(main: Callable[..., Any], *args: Any, **kwargs: Any) -> int:
    """Run a command's ``main`` and return its exit status: 0, :data:`EXIT_STOPPED` after a :class:`StoppedToResume`,
    and for a :class:`UserError` its line ``error: ...`` and :data:`EXIT_ERROR` (:data:`EXIT_REPORTED` under
    ``torchrun``). Any other exception propagates with its traceback: it is a bug, not a user error."""
    try:
        main(*args, **kwargs)
    except UserError as e:
        report(f'error: {error_line(e)}', own=getattr(e, 'own', False))
        return EXIT_REPORTED if _under_torchrun() else EXIT_ERROR
    except StoppedToResume as e:
        report(str(e))
        return EXIT_STOPPED
    return 0
