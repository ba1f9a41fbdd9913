"""Train a detector: ``python train.py configs/X.py [--resume [CKPT]] [--amp] [--cfg-options k=v ...]``.

Your own COCO-format data: ``--data-root DIR --classes a,b,c`` (README, "Your own data set"); from scratch:
``--no-pretrained``.

Several processes: ``bash dist_train.sh configs/X.py GPUS``. Logs and checkpoints go to ``work_dirs/<config>/``.
"""
if __name__ == '__main__':  # first: SIGTERM / SIGUSR1 wait for the stop handler (scalablevit.signals)
    import signal
    signal.pthread_sigmask(signal.SIG_BLOCK, (signal.SIGTERM, signal.SIGUSR1))
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))  # the repository root, for `scalablevit`
from scalablevit.cli import run_mm_command  # noqa: E402


def command(argv):
    from scalablevit.mm.runner import train_main  # here: run_mm_command has checked the OpenMMLab stack
    return train_main(argv, 'detection', osp.dirname(osp.abspath(__file__)))


if __name__ == '__main__':
    sys.exit(run_mm_command(command, sys.argv[1:], training=True))
