"""classification/main.py at the user's scale: gradient accumulation (exact), the released LR sequence across
resumes, ``--resume auto`` and ``--checkpoint-hist``, a stop on SIGTERM/SIGUSR1 resumed exactly mid-epoch, and the
same weights from 2 nodes x 1 process as from 1 node x 2 processes (gloo, one machine)."""
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_classification import CLS_DIR, DIGITS, NO_MIX, TINY, parse, read_log, signal_during  # noqa: F401

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

    with signal_during(cls, epoch=1, forward=3):
        result = cls.main(parse(cls, [*common, '--output_dir', tmp_path / 'part']))
    assert result['stopped'] == (1, 3)  # epoch 1, three of its six steps done
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


@pytest.mark.slow
def test_sigterm_to_torchrun_stops_every_rank_after_the_same_step(tmp_path, free_port):
    """SLURM's preemption as torchrun sees it: SIGTERM to the launcher, which forwards it to both processes. They
    agree on a step, rank 0 writes checkpoint.pth with that place, both exit cleanly; --resume auto finishes."""
    make_folder(tmp_path / 'data', per_class=16)
    out = tmp_path / 'out'
    torchrun = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2', f'--master_port={free_port}']
    argv = [*FOLDER_ARGS, '--data-path', tmp_path / 'data', '--epochs', '1', '--batch-size', '2', '--print-freq', '1',
            '--output_dir', out]
    env = dict(os.environ, PYTHONUNBUFFERED='1', OMP_NUM_THREADS='1')
    env.pop('RANK', None), env.pop('WORLD_SIZE', None)
    p = subprocess.Popen([*torchrun, 'main.py', *map(str, argv)], cwd=CLS_DIR, env=env, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    lines = []
    for line in p.stdout:  # wait until the second step has been logged, then preempt
        lines.append(line)
        if 'Epoch: [0] [ 1/12]' in line:
            p.send_signal(signal.SIGTERM)
            break
    lines += p.stdout.readlines()
    p.wait(timeout=120)
    text = ''.join(lines)
    stops = [line for line in lines if 'stopped by SIGTERM at epoch 0, step' in line]
    assert len(stops) == 2, text[-3000:]  # both processes, the same step
    assert len({line.split('stopped by')[1] for line in stops}) == 1, stops
    ckpt = torch.load(out / 'checkpoint.pth', weights_only=True)
    step = ckpt['resume_step']
    assert ckpt['epoch'] == -1 and 2 <= step < 12 and f'step {step} of 12' in stops[0]
    assert 'Traceback' not in text.split('Sending process')[0]  # none from our processes

    r = subprocess.run([*torchrun, 'main.py', *map(str, argv), '--resume', 'auto'], cwd=CLS_DIR, env=env, text=True,
                       capture_output=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert f'resumed {out}/checkpoint.pth at epoch 0, step {step}' in r.stdout
    assert [e['epoch'] for e in read_log(out / 'log.txt')] == [0]
