"""``torchrun`` (``python -m torch.distributed.run``) for the project's scripts, ending in one line.

``tools/dist_run.sh`` starts the detection and segmentation processes through this. Differences from torchrun:

* A worker that reported a line (a user error, or a stop after a signal; :mod:`scalablevit.errors`) writes it into
  its torchelastic error file and exits with :data:`~scalablevit.errors.EXIT_REPORTED` or
  :data:`~scalablevit.errors.EXIT_STOPPED`; this launcher prints the first such line once, without torchrun's
  30-line failure report, and exits with 1, or 75 when the run stopped to be resumed. Any other failure ends with one
  line naming the process and its exit status (its traceback is above, printed by the process itself).
* SIGTERM and SIGUSR1 (SLURM's notice before a preemption or the time limit) are passed on to the workers, which
  save a checkpoint and stop together; torchrun alone would die of SIGUSR1, and on SIGTERM kill the workers
  30 seconds later whatever they are doing. The two signals are held (blocked) from this file's first statement
  and taken by a thread of their own (``sigwait``), so the workers start with them held too: a signal that
  arrives while a worker imports torch waits for its stop handler (:mod:`scalablevit.signals`) instead of killing
  it.
"""
import signal  # isort: skip

FORWARDED = (signal.SIGTERM, signal.SIGUSR1)
if __name__ == '__main__':  # first: held in every thread and process started from here on
    signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED)

import logging  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for `scalablevit`

from scalablevit.errors import EXIT_ERROR, EXIT_REPORTED, EXIT_STOPPED, LAUNCHER_REPORTS  # noqa: E402


def _children():
    """PIDs of this process's children (the workers torchrun started), from /proc."""
    me = str(os.getpid())
    pids = []
    for entry in os.listdir('/proc'):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f'/proc/{entry}/stat').read_text()
        except OSError:
            continue
        if stat.rsplit(')', 1)[1].split()[1] == me:  # the field after the state is the parent's pid
            pids.append(int(entry))
    return pids


def _forward_forever():
    """The signal thread: each SIGTERM / SIGUSR1 this process gets is passed on to the workers."""
    while True:
        signum = signal.sigwait(FORWARDED)
        for pid in _children():
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass


def main(argv=None) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    logging.getLogger('torch.distributed.elastic').setLevel(logging.CRITICAL)
    os.environ[LAUNCHER_REPORTS] = '1'  # the workers leave the printing to this process
    signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED)  # (again, for a call from Python)
    threading.Thread(target=_forward_forever, name='forward-signals', daemon=True).start()
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        torchrun(['--signals-to-handle=SIGINT,SIGHUP,SIGQUIT'] + argv)  # SIGTERM / SIGUSR1 stay ours
    except ChildFailedError as e:
        failures = sorted(e.failures.values(), key=lambda f: f.timestamp)
        reported = [f for f in failures if f.exitcode in (EXIT_REPORTED, EXIT_STOPPED) and f.message
                    and not str(f.message).startswith(('Signal ', 'To enable traceback'))]
        if reported:
            print(reported[0].message, file=sys.stderr)
            stopped = all(f.exitcode in (EXIT_STOPPED, -signal.SIGTERM) for f in failures)
            return EXIT_STOPPED if stopped else EXIT_ERROR
        rank, failure = e.get_first_failure()
        print(f'error: process {rank} of {e.name} failed with exit status {failure.exitcode} (its output is above)',
              file=sys.stderr)
        return EXIT_ERROR
    return 0


if __name__ == '__main__':
    sys.exit(main())
