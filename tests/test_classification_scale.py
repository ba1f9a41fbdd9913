"""classification/main.py at the user's scale: gradient accumulation (exact), the released LR sequence across
resumes, ``--resume auto`` and ``--checkpoint-hist``, a stop on SIGTERM/SIGUSR1 resumed exactly mid-epoch, and the
same weights from 2 nodes x 1 process as from 1 node x 2 processes (gloo, one machine)."""
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Tuple

import numpy as np
import pytest
import torch
from PIL import Image
from test_classification import CLS_DIR, DIGITS, NO_MIX, TINY, parse, read_log, signal_during  # noqa: F401

from scalablevit.errors import EXIT_STOPPED, StoppedToResume

from conftest import REPO, signal_job

TINY_MODEL = dict(embed_dims=(16, 32), num_heads=(1, 2), depths=(2, 2), sr_ratios=(2, 1), c_ratios=(1, 1),
                  wss=(4, 2), mlp_ratios=(2, 2), mlp_head=False)


def make_folder(root: Path, per_class: int = 8) -> Path:
    """A small ImageFolder of real files in the modes users have: RGB/gray JPEG, RGBA/palette PNG, odd sizes."""
    rng = np.random.default_rng(0)
    kinds = [('RGB', 'jpg', (40, 30)), ('L', 'jpg', (36, 36)), ('RGBA', 'png', (50, 41)), ('P', 'png', (33, 60))]
    for split, n in (('train', per_class), ('val', 3)):
        for c, color in enumerate(((200, 30, 30), (30, 30, 200), (30, 200, 30))):
            d = root / split / f'class{c}'
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                mode, ext, (w, h) = kinds[i % len(kinds)]
                rgb = np.clip(np.array(color) + rng.integers(-40, 40, (h, w, 3)), 0, 255).astype(np.uint8)
                img = Image.fromarray(rgb, 'RGB')
                img = img.quantize(32) if mode == 'P' else img.convert(mode)
                img.save(d / f'{i}.{ext}')
    return root


FOLDER_ARGS = [*TINY, '--input-size', '32', '--batch-size', '4', '--num_workers', '0', '--print-freq', '100',
               '--warmup-epochs', '2', '--lr', '1e-3', '--unscale-lr']


# ---------------------------------------------------------------------------------------------------------------------
# Gradient accumulation

def _train(cls, batches, accum, ddp=False, clip_grad=None):
    """Plain SGD: unlike Adam, its update changes with the gradient's scale, so a mis-scaled loss shows."""
    engine = sys.modules['engine']
    torch.manual_seed(0)
    model = cls.timm.create_model('scalable_vit_small', num_classes=10, **TINY_MODEL)
    if ddp:
        model = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    scaler = torch.amp.GradScaler('cpu', enabled=False)
    engine.train_one_epoch(model, torch.nn.CrossEntropyLoss(), batches, opt, torch.device('cpu'), 0, scaler,
                           clip_grad=clip_grad, print_freq=100, grad_accum_steps=accum)
    model = getattr(model, 'module', model)
    return {k: v.clone() for k, v in model.state_dict().items()}, opt


def test_grad_accumulation_is_exact(cls, monkeypatch, free_port):
    """32 x 2 trains the same weights as 64 x 1, with the (small) clipping norm acting on the accumulated gradient,
    and a 5-batch epoch at N = 2 (last group of one) as 3 big batches; DDP all-reduces only on stepping batches."""
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(192, 3, 16, 16, generator=g), torch.randint(0, 10, (192,), generator=g)
    big = [(x[i:i + 64], y[i:i + 64]) for i in range(0, 192, 64)]
    small = [(x[i:i + 32], y[i:i + 32]) for i in range(0, 192, 32)]
    ref_big, _ = _train(cls, big, 1)
    acc, opt = _train(cls, small, 2)
    for k in ref_big:
        torch.testing.assert_close(acc[k], ref_big[k], rtol=1e-5, atol=1e-6, msg=k)
    plain, _ = _train(cls, small, 1)
    assert not all(torch.allclose(plain[k], ref_big[k]) for k in ref_big)  # the comparison can fail
    # clipping (a norm it always hits) acts on the accumulated gradient, as on the big batch's
    ref, _ = _train(cls, big, 1, clip_grad=0.05)
    acc, opt = _train(cls, small, 2, clip_grad=0.05)
    for k in ref:
        torch.testing.assert_close(acc[k], ref[k], rtol=1e-5, atol=1e-6, msg=k)

    # 5 batches with N=2: (32+32), (32+32), (32): the last group steps on its own, nothing left over
    odd = small[:5]
    uneven = [(torch.cat([x[:32], x[32:64]]), torch.cat([y[:32], y[32:64]])),
              (torch.cat([x[64:96], x[96:128]]), torch.cat([y[64:96], y[96:128]])), small[4]]
    ref, _ = _train(cls, uneven, 1)
    acc, opt = _train(cls, odd, 2)
    for k in ref:
        torch.testing.assert_close(acc[k], ref[k], rtol=1e-5, atol=1e-6, msg=k)
    assert all(p.grad is None for group in opt.param_groups for p in group['params'])

    # DDP (one gloo process): no_sync on the micro-batches that do not step
    monkeypatch.setenv('MASTER_ADDR', '127.0.0.1')
    monkeypatch.setenv('MASTER_PORT', str(free_port))
    torch.distributed.init_process_group('gloo', rank=0, world_size=1)
    entered = []
    real = torch.nn.parallel.DistributedDataParallel.no_sync

    def counting_no_sync(self):
        entered.append(1)
        return real(self)

    monkeypatch.setattr(torch.nn.parallel.DistributedDataParallel, 'no_sync', counting_no_sync)
    acc, _ = _train(cls, small, 2, ddp=True)
    assert len(entered) == 3  # batches 0, 2, 4 accumulate; 1, 3, 5 step and all-reduce
    for k in ref_big:
        torch.testing.assert_close(acc[k], ref_big[k], rtol=1e-5, atol=1e-6, msg=k)


def test_grad_accumulation_scales_lr_by_the_effective_batch(cls, tmp_path, caplog):
    make_folder(tmp_path)
    with caplog.at_level('INFO'):
        cls.main(parse(cls, [*FOLDER_ARGS[:-1], '--data-path', tmp_path, '--epochs', '1', '--grad-accum-steps', '3',
                             '--output_dir', '']))
    assert 'lr 2.34e-05 for an effective batch of 12 (4 per process x 1 processes x 3 accumulation steps)' \
        in caplog.text  # 1e-3 x 12 / 512


# ---------------------------------------------------------------------------------------------------------------------
# The released LR sequence, --resume auto, --checkpoint-hist

def released_lr(epoch, warmup_epochs=2, epochs=4, lr=1e-3, warmup_lr=1e-6, min_lr=1e-5):
    """The LR epoch `epoch` trains at in the released loop: the schedule's value for epoch - 1 (0 for epoch 0)."""
    t = max(epoch - 1, 0)
    if t < warmup_epochs:
        return warmup_lr + t * (lr - warmup_lr) / warmup_epochs
    return min_lr + 0.5 * (lr - min_lr) * (1 + np.cos(np.pi * t / epochs))


def test_released_lr_sequence_and_resume_auto(cls, tmp_path):
    make_folder(tmp_path / 'data')
    common = [*FOLDER_ARGS, '--data-path', tmp_path / 'data', '--epochs', '4']
    full = tmp_path / 'full'
    cls.main(parse(cls, [*common, '--output_dir', full]))
    lrs = [e['train_lr'] for e in read_log(full / 'log.txt')]
    np.testing.assert_allclose(lrs, [released_lr(e) for e in range(4)], rtol=1e-9)
    assert lrs[0] == lrs[1] == 1e-6 and lrs[2] > lrs[1]  # epochs 0 and 1 both at the warm-up start

    # a job preempted (SIGTERM) while evaluating epoch 1: it stops after saving that epoch; then it is requeued with
    # the same command, which has --resume auto
    part = tmp_path / 'part'
    real_evaluate = cls.evaluate

    def evaluate_then_sigterm(*a, **k):
        stats = real_evaluate(*a, **k)
        if len(read_log(part / 'log.txt') if (part / 'log.txt').exists() else []) == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return stats

    cls.evaluate = evaluate_then_sigterm
    try:
        with pytest.raises(StoppedToResume, match=f'stopped by SIGTERM after epoch 1; saved {part}/checkpoint.pth'):
            cls.main(parse(cls, [*common, '--output_dir', part, '--resume', 'auto', '--checkpoint-hist', '2',
                                 '--tensorboard']))
    finally:
        cls.evaluate = real_evaluate
    assert [e['epoch'] for e in read_log(part / 'log.txt')] == [0, 1]
    assert sorted(p.name for p in part.glob('checkpoint*')) == [
        'checkpoint-0.pth', 'checkpoint-1.pth', 'checkpoint.pth', 'checkpoint_best.pth']
    cls.main(parse(cls, [*common, '--output_dir', part, '--resume', 'auto', '--checkpoint-hist', '2',
                         '--tensorboard']))
    log = read_log(part / 'log.txt')
    assert [e['epoch'] for e in log] == [0, 1, 2, 3]
    assert [e['train_lr'] for e in log] == lrs  # the resumed run continues the same sequence
    assert [e['train_loss'] for e in log] == [e['train_loss'] for e in read_log(full / 'log.txt')]
    assert sorted(p.name for p in part.glob('checkpoint-*')) == ['checkpoint-2.pth', 'checkpoint-3.pth']
    assert torch.load(part / 'checkpoint-2.pth', weights_only=True)['epoch'] == 2

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(part)).Reload()
    assert {'train/loss', 'train/lr', 'test/acc1', 'test/acc5', 'test/loss'} <= set(events.Tags()['scalars'])
    assert [s.step for s in events.Scalars('train/lr')] == [0, 1, 2, 3]
    np.testing.assert_allclose([s.value for s in events.Scalars('train/lr')], lrs, rtol=1e-6)


def test_signal_stops_after_the_step_and_resumes_exactly(cls, tmp_path, monkeypatch):
    """SIGUSR1 (SLURM's warning signal) during step 2 of epoch 1: the step finishes, checkpoint.pth records the
    place, the run returns; --resume auto continues mid-epoch and ends with the weights of a run that never
    stopped."""
    make_folder(tmp_path / 'data')
    common = [*FOLDER_ARGS, '--data-path', tmp_path / 'data', '--epochs', '2', '--num_workers', '1']
    full = cls.main(parse(cls, [*common, '--output_dir', tmp_path / 'full']))['model'].state_dict()

    with signal_during(cls, epoch=1, forward=3), pytest.raises(StoppedToResume) as stopped:
        cls.main(parse(cls, [*common, '--output_dir', tmp_path / 'part']))
    assert str(stopped.value) == (f'stopped by SIGUSR1 at epoch 1, step 3 of 6; saved {tmp_path}/part/checkpoint.pth; '
                                  f'rerun with --resume auto to continue from there')  # three of its six steps done
    ckpt = torch.load(tmp_path / 'part' / 'checkpoint.pth', weights_only=True)
    assert (ckpt['epoch'], ckpt['resume_step']) == (0, 3)
    assert len(read_log(tmp_path / 'part' / 'log.txt')) == 1
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL  # the handler is gone once training ends

    resumed = cls.main(parse(cls, [*common, '--output_dir', tmp_path / 'part', '--resume', 'auto']))
    state = resumed['model'].state_dict()
    for k in full:
        assert torch.equal(state[k], full[k]), k
    assert [e['epoch'] for e in read_log(tmp_path / 'part' / 'log.txt')] == [0, 1]


# ---------------------------------------------------------------------------------------------------------------------
# Launchers

WRAPPER = """import sys, torch
sys.path.insert(0, {cls_dir!r})
import main
args = main.argparse.ArgumentParser(parents=[main.get_args_parser()]).parse_args(sys.argv[1:])
result = main.main(args)
torch.save(result['model'].state_dict(), f'{{args.output_dir}}/rank{{args.rank}}.pth')
"""


def _launch(launcher, argv, tmp_path, name):
    script = tmp_path / 'train_and_dump.py'
    script.write_text(WRAPPER.format(cls_dir=str(CLS_DIR)))
    env = dict(os.environ, PYTHONUNBUFFERED='1', OMP_NUM_THREADS='1')
    env.pop('RANK', None), env.pop('WORLD_SIZE', None)
    return subprocess.Popen([sys.executable, *launcher, str(script), *map(str, argv)], cwd=CLS_DIR, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_launch_two_epochs_and_two_nodes_give_the_same_weights(tmp_path, free_port):
    """torch.distributed.launch --use_env (the released command) on ImageFolder data of mixed modes at input size
    32, across an epoch boundary; then torchrun --nnodes 2 on one machine: every rank ends with the same weights."""
    make_folder(tmp_path / 'data')
    common = [*FOLDER_ARGS, '--data-path', tmp_path / 'data', '--epochs', '2', '--dist-eval']
    one = tmp_path / 'one_node'
    one.mkdir()
    p = _launch(['-m', 'torch.distributed.launch', '--nproc_per_node=2', '--use_env', f'--master_port={free_port}'],
                [*common, '--output_dir', one], tmp_path, 'one')
    out = p.communicate(timeout=600)[0]
    assert p.returncode == 0, out[-3000:]
    assert [e['epoch'] for e in read_log(one / 'log.txt')] == [0, 1]
    assert read_log(one / 'log.txt')[-1]['test_count'] == 9

    two = tmp_path / 'two_nodes'
    two.mkdir()
    nodes = [_launch(['-m', 'torch.distributed.run', '--nnodes=2', f'--node_rank={r}', '--nproc_per_node=1',
                      '--master_addr=127.0.0.1', f'--master_port={free_port}'],
                     [*common, '--output_dir', two], tmp_path, f'node{r}') for r in (0, 1)]
    outs = [n.communicate(timeout=600)[0] for n in nodes]
    assert [n.returncode for n in nodes] == [0, 0], outs[0][-2000:] + outs[1][-2000:]
    ref = torch.load(one / 'rank0.pth', weights_only=True)
    for path in (one / 'rank1.pth', two / 'rank0.pth', two / 'rank1.pth'):
        state = torch.load(path, weights_only=True)
        for k in ref:
            assert torch.equal(state[k], ref[k]), (path, k)
    assert read_log(two / 'log.txt') and [e['train_loss'] for e in read_log(two / 'log.txt')] == \
        [e['train_loss'] for e in read_log(one / 'log.txt')]


def _start(cmd, env=None):
    env = dict(os.environ, PYTHONUNBUFFERED='1', OMP_NUM_THREADS='1', **(env or {}))
    env.pop('RANK', None), env.pop('WORLD_SIZE', None)
    return subprocess.Popen(cmd, cwd=CLS_DIR, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)  # a process group of its own, as a job step has


def _signal_at(p, marker: str, sig) -> Tuple[List[str], List[int]]:
    """Read ``p``'s stdout until a line contains ``marker``, then signal every process of the job (SLURM's way);
    returns the lines read and the pids that got the signal."""
    lines = []
    for line in p.stdout:
        lines.append(line)
        if marker in line:
            return lines, signal_job(p.pid, sig)
    raise AssertionError(f'{marker!r} never came: {"".join(lines)[-3000:]}{p.stderr.read()[-3000:]}')


DIGITS_JOB = [sys.executable, 'main.py', *TINY, *DIGITS[:-2], '--print-freq', '5', *NO_MIX, '--epochs', '2',
              '--num_workers', '2']


def test_signal_to_the_whole_job_with_loader_workers_resumes_exactly(tmp_path):
    """SIGUSR1 to every process of a one-process run with two loader workers (SLURM's --signal=USR1@120), in the
    middle of epoch 1: the workers ignore it, the main process finishes its step, saves the place and exits with
    75 and one line; --resume auto ends with the weights of a run that never stopped. A SIGTERM to the job while it
    is still starting (importing torch, reading the data) stops it with 75 too, before anything is saved."""
    full = subprocess.run([*DIGITS_JOB, '--output_dir', tmp_path / 'full'], cwd=CLS_DIR, capture_output=True,
                          text=True, env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert full.returncode == 0, full.stderr[-3000:]

    part = tmp_path / 'part'
    p = _start([*map(str, DIGITS_JOB), '--output_dir', str(part)])
    _, pids = _signal_at(p, 'Epoch: [1] [ 5/', signal.SIGUSR1)
    out, err = p.communicate(timeout=300)
    assert len(pids) == 3, pids  # the main process and its two workers, all alive at the signal
    assert p.returncode == EXIT_STOPPED, err[-3000:]
    line = err.strip().splitlines()[-1]
    assert re.fullmatch(rf'stopped by SIGUSR1 at epoch 1, step \d+ of 22; saved {part}/checkpoint.pth; rerun with '
                        r'--resume auto to continue from there', line), err[-3000:]
    assert 'Traceback' not in err and 'killed by signal' not in err
    step = torch.load(part / 'checkpoint.pth', weights_only=True)['resume_step']
    assert f'step {step} of 22' in line and step >= 6

    r = subprocess.run([*DIGITS_JOB, '--output_dir', part, '--resume', 'auto'], cwd=CLS_DIR, capture_output=True,
                       text=True, env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert r.returncode == 0, r.stderr[-3000:]
    got = torch.load(part / 'checkpoint.pth', weights_only=True)['model']
    want = torch.load(tmp_path / 'full' / 'checkpoint.pth', weights_only=True)['model']
    assert [k for k in want if not torch.equal(got[k], want[k])] == []

    # importing torch (0.2 s in); the data read, the model being built (at its log line: a fixed delay can land
    # after training began on a fast machine)
    for when in ('importing torch', 'creating model'):
        early = tmp_path / when.replace(' ', '_')
        p = _start([*map(str, DIGITS_JOB), '--output_dir', str(early)])
        if when == 'importing torch':
            time.sleep(0.2)
            signal_job(p.pid, signal.SIGTERM)
            lines = []
        else:
            lines, _ = _signal_at(p, 'creating model', signal.SIGTERM)
        out, err = p.communicate(timeout=120)
        assert p.returncode == EXIT_STOPPED, err[-3000:]
        assert err.strip().splitlines()[-1] == ('stopped by SIGTERM before training began; nothing new to save; run '
                                                'the same command again'), err[-3000:]
        assert 'Epoch: [0]' not in ''.join(lines) + out
        assert not early.exists()


@pytest.mark.slow
def test_signal_to_every_process_of_a_two_process_job(tmp_path, free_port):
    """SLURM's preemption of a two-process job launched by tools/torchrun.py: SIGTERM to every process (the
    launcher, both ranks, their loader workers) mid-epoch. The ranks agree on a step, rank 0 writes checkpoint.pth
    with that place, the job ends with 75 and one line; --resume auto finishes the epoch."""
    make_folder(tmp_path / 'data', per_class=16)
    out = tmp_path / 'out'
    launcher = [sys.executable, str(REPO / 'tools' / 'torchrun.py'), '--nproc_per_node=2',
                f'--master_port={free_port}', 'main.py']
    argv = [*FOLDER_ARGS[:-5], '--num_workers', '2', '--print-freq', '1', '--warmup-epochs', '2', '--lr', '1e-3',
            '--unscale-lr', '--data-path', tmp_path / 'data', '--epochs', '1', '--batch-size', '2', '--output_dir', out]
    p = _start([*launcher, *map(str, argv)])
    _, pids = _signal_at(p, 'Epoch: [0] [ 1/12]', signal.SIGTERM)
    stdout, err = p.communicate(timeout=300)
    assert len(pids) >= 7, pids  # launcher, 2 ranks, 2 x 2 workers
    assert p.returncode == EXIT_STOPPED, err[-3000:]
    stops = [line for line in err.splitlines() if line.startswith('stopped by')]
    assert len(stops) == 1 and re.fullmatch(rf'stopped by SIGTERM at epoch 0, step \d+ of 12; saved {out}/'
                                            r'checkpoint.pth; rerun with --resume auto to continue from there',
                                            stops[0]), err[-3000:]
    assert 'Traceback' not in err and 'killed by signal' not in err, err[-3000:]
    ckpt = torch.load(out / 'checkpoint.pth', weights_only=True)
    step = ckpt['resume_step']
    assert ckpt['epoch'] == -1 and 2 <= step < 12 and f'step {step} of 12' in stops[0]

    r = subprocess.run([*launcher, *map(str, argv), '--resume', 'auto'], cwd=CLS_DIR, text=True,
                       capture_output=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert f'resumed {out}/checkpoint.pth at epoch 0, step {step}' in r.stdout
    assert [e['epoch'] for e in read_log(out / 'log.txt')] == [0]
