"""``torchrun`` (``python -m torch.distributed.run``) whose failures end in one line, not in its own traceback.

``tools/dist_run.sh`` starts the processes through this. When a process fails, torchrun stops the others and raises
``ChildFailedError``, whose 30-line report follows the process's own output. Here, a failure that the project's
scripts already reported in one line (exit status :data:`REPORTED`: a bad command line, config, data set or
checkpoint, printed by the process of rank 0) ends quietly with status 1; any other failure ends with one line
naming the process and its exit status (its traceback is above, printed by the process itself).
"""
import logging
import sys

REPORTED = 3  # exit status of a process whose error was already printed (scalablevit.mm_tools)


def main(argv=None):
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    logging.getLogger('torch.distributed.elastic').setLevel(logging.CRITICAL)
    try:
        torchrun(sys.argv[1:] if argv is None else argv)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        codes = {f.exitcode for f in e.failures.values()}
        if not codes <= {REPORTED, -15}:  # -15: stopped by torchrun after another process failed
            print(f'error: process {rank} of {e.name} failed with exit status {failure.exitcode} (its output is '
                  f'above)', file=sys.stderr)
        sys.exit(1)


if __name__ == '__main__':
    main()
