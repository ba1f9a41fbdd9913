"""Not part of the test suite (minutes): ``kill -9`` a tiny training run at random moments; after each kill,
``--resume`` must continue from a checkpoint that can be read, and the run must finish.

    python tests/stress/kill9_resume.py --kills 20                    # detection, tiny RetinaNet, one process
    python tests/stress/kill9_resume.py --kills 20 --task segmentation  # tiny Semantic FPN

Each round starts ``train.py CONFIG --resume`` and kills its whole process group with SIGKILL after a random time
(start-up, training, checkpoint writes alike); then every ``*.pth`` of the work dir must load
(``torch.load(weights_only=True)``) and ``last_checkpoint`` must name one that does. The next round must say where
it resumed. A last round without a kill must finish. Prints one line per round and a summary; exits 1 on a failure.
"""
import argparse
import os
import os.path as osp
import random
import re
import signal
import subprocess
import sys
import tempfile

import torch

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
sys.path.insert(0, REPO)

import scalablevit.mm  # noqa: E402,F401  (mmengine checkpoints under weights_only=True)

TASKS = {
    'detection': ('configs/tiny/retinanet_scalablevit-tiny_fpn_tiny-coco.py', 'epoch'),
    'segmentation': ('configs/tiny/scalablevit-tiny_fpn_1xb2-40_tiny-ade-64x64.py', 'iter'),
}


def make_config(task: str, work: str, length: int) -> str:
    folder = osp.join(REPO, task)
    config, _ = TASKS[task]
    lines = [f'_base_ = {osp.join(folder, config)!r}', 'val_cfg = None', 'val_dataloader = None',
             'val_evaluator = None']
    if task == 'detection':
        from importlib import util
        spec = util.spec_from_file_location('m', osp.join(folder, 'tools', 'make_tiny_coco.py'))
        module = util.module_from_spec(spec)
        spec.loader.exec_module(module)
        data = module.make_tiny_coco(osp.join(work, 'data'), num_train=8, num_val=1, size=96, seed=0)
        lines += [f"train_dataloader = dict(dataset=dict(data_root={osp.join(data, '')!r}))",
                  f'train_cfg = dict(max_epochs={length}, val_interval=100000)',
                  'default_hooks = dict(checkpoint=dict(interval=1, max_keep_ckpts=3), logger=dict(interval=1))']
    else:
        from importlib import util
        spec = util.spec_from_file_location('m', osp.join(folder, 'tools', 'make_tiny_ade.py'))
        module = util.module_from_spec(spec)
        spec.loader.exec_module(module)
        data = module.make_tiny_ade(osp.join(work, 'data'), size=64, num_train=8, num_val=1)
        lines += [f'train_dataloader = dict(dataset=dict(data_root={data!r}))',
                  f'train_cfg = dict(max_iters={length * 4}, val_interval=100000)',
                  f'param_scheduler = [dict(type="PolyLR", power=0.9, begin=0, end={length * 4}, by_epoch=False)]',
                  'default_hooks = dict(checkpoint=dict(interval=5, max_keep_ckpts=3), logger=dict(interval=5))']
    path = osp.join(work, 'stress.py')
    with open(path, 'w') as f:
        f.write('\n'.join(lines) + '\n')
    return path


def check_files(work: str) -> str:
    """Every checkpoint loads and the pointer names one that does; returns the newest checkpoint's name or ''."""
    if not osp.isdir(work):  # killed before the runner made its work dir
        return ''
    pths = sorted((n for n in os.listdir(work) if n.endswith('.pth')), key=lambda n: osp.getmtime(osp.join(work, n)))
    for name in pths:
        ckpt = torch.load(osp.join(work, name), map_location='cpu', weights_only=True, mmap=True)
        assert 'state_dict' in ckpt and 'meta' in ckpt, f'{name}: not a whole checkpoint'
    pointer = osp.join(work, 'last_checkpoint')
    if osp.exists(pointer):
        target = open(pointer).read().strip()
        assert osp.isfile(target), f'last_checkpoint names {target!r}, which is not there'
        torch.load(target, map_location='cpu', weights_only=True, mmap=True)
    return pths[-1] if pths else ''


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--kills', type=int, default=20)
    parser.add_argument('--task', choices=sorted(TASKS), default='detection')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--length', type=int, default=100,
                        help='epochs of 4 iterations (detection) / 4x as many iterations (segmentation): long enough '
                             'that no round but the last can finish the run, short enough that the last one ends in '
                             'minutes (20 rounds of at most 25 s train about 30 of the 100 epochs)')
    parser.add_argument('--min-s', type=float, default=1.0, help='earliest kill after the start')
    parser.add_argument('--max-s', type=float, default=25.0, help='latest kill after the start')
    parser.add_argument('--work', default=None)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    root = args.work or tempfile.mkdtemp(prefix='kill9_')
    work = osp.join(root, 'work')
    config = make_config(args.task, root, args.length)
    cmd = [sys.executable, 'train.py', config, '--work-dir', work, '--resume']
    env = dict(os.environ, PYTHONUNBUFFERED='1')
    failures = 0
    newest = ''
    for i in range(args.kills + 1):
        last = i == args.kills
        log = osp.join(root, f'round_{i}.log')
        with open(log, 'w') as f:
            p = subprocess.Popen(cmd, cwd=osp.join(REPO, args.task), env=env, stdout=f, stderr=subprocess.STDOUT,
                                 start_new_session=True)
            delay = rng.uniform(args.min_s, args.max_s)
            try:
                p.wait(timeout=None if last else delay)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        text = open(log).read()
        resumed = re.search(r'resumed epoch: (\d+), iter: (\d+)', text)
        trained = re.search(r'(Epoch|Iter)\(train\)', text)
        if resumed:
            where = f'resumed at iteration {resumed.group(2)}'
        else:
            where = 'started from the beginning' if trained else 'killed before it trained'
        ok = True
        if newest and trained and not resumed:
            ok = False
            where += f' although {newest} was there'
        try:
            newest = check_files(work) or newest
        except Exception as e:  # noqa: BLE001  (report any broken file)
            ok, where = False, f'{where}; {type(e).__name__}: {e}'
        if last:
            ok = ok and p.returncode == 0
            what = f'ran to the end: exit status {p.returncode}'
        elif p.returncode != -signal.SIGKILL:
            ok = False
            what = f'ended by itself (status {p.returncode}) before the kill: make --length longer'
        else:
            what = f'killed after {delay:.1f} s'
        failures += not ok
        print(f'round {i + 1}: {where}; {what}; newest checkpoint {newest or "none"}{"" if ok else "  <- FAILED"}',
              flush=True)
    print(f'{args.kills} kills: {args.kills + 1 - failures} of {args.kills + 1} rounds as they should be; '
          f'logs in {root}')
    sys.exit(1 if failures else 0)


if __name__ == '__main__':
    main()
