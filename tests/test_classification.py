"""classification/: DIGITS end to end, resume == uninterrupted, two-process torchrun, ImageFolder, clear errors.

CPU only, tiny models (16x16 DIGITS, two stages of 16/32 channels). The training scripts live in
``classification/`` and import each other as top-level modules (DeiT layout), so in-process tests load them through
the ``cls`` fixture, which restores ``sys.path`` and ``sys.modules`` afterwards.
"""
import contextlib
import json
import logging
import os
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from scalablevit.errors import StoppedToResume, UserError

from conftest import CLS_DIR, REPO  # noqa: F401

TINY = ['--model', 'scalable_vit_small', '--model-kwargs', 'embed_dims=(16,32)', 'num_heads=(1,2)', 'depths=(2,2)',
        'sr_ratios=(2,1)', 'c_ratios=(1,1)', 'wss=(4,2)', 'mlp_ratios=(2,2)', 'mlp_head=False']
DIGITS = ['--data-set', 'DIGITS', '--input-size', '16', '--batch-size', '64', '--num_workers', '0',
          '--lr', '4e-3', '--unscale-lr', '--warmup-epochs', '0', '--min-lr', '1e-4', '--print-freq', '100']
NO_MIX = ['--mixup', '0', '--cutmix', '0', '--smoothing', '0', '--drop-path', '0']

# The released README's classification commands, word for word (classification/README.md shows them too).
RELEASED_COMMANDS = [
    'main.py --model scalable_vit_small  --batch-size 128 --data-path ${path_to_imagenet} --dist-eval --drop-path 0.2',
    'main.py --model scalable_vit_base  --batch-size 128 --data-path ${path_to_imagenet} --dist-eval --drop-path 0.5',
    'main.py --model scalable_vit_large  --batch-size 128 --data-path ${path_to_imagenet} --dist-eval --drop-path 0.5',
    'main.py --eval --resume ./scalable_vit_small/checkpoint_best.pth  --model scalable_vit_small '
    '--data-path path_to_imagenet',
    'main.py --eval --resume ./scalable_vit_base/checkpoint_best.pth  --model scalable_vit_base '
    '--data-path path_to_imagenet',
    'main.py --eval --resume ./scalable_vit_large/checkpoint_best.pth  --model scalable_vit_large '
    '--data-path path_to_imagenet',
]
def parse(cls, argv):
    import argparse
    return argparse.ArgumentParser(parents=[cls.get_args_parser()]).parse_args([str(a) for a in argv])


def run_script(argv, launcher=(), timeout=600):
    env = dict(os.environ, PYTHONUNBUFFERED='1', OMP_NUM_THREADS='1')  # tiny models: threads only contend
    env.pop('RANK', None), env.pop('WORLD_SIZE', None)
    cmd = [sys.executable, *launcher, 'main.py', *map(str, argv)]
    return subprocess.run(cmd, cwd=CLS_DIR, env=env, capture_output=True, text=True, timeout=timeout)


@contextlib.contextmanager
def signal_during(cls, epoch: int, forward: int, sig=signal.SIGUSR1):
    """While inside, ``cls.train_one_epoch`` sends ``sig`` to this process during the ``forward``-th forward pass
    of epoch ``epoch`` (SLURM's notice, at a known step)."""
    real = cls.train_one_epoch

    def train_one_epoch(model, *a, **k):
        if a[4] != epoch:  # a[4]: the epoch
            return real(model, *a, **k)
        forwards = []

        def hook(module, inputs, output):
            forwards.append(1)
            if len(forwards) == forward:
                os.kill(os.getpid(), sig)

        handle = model.register_forward_hook(hook)
        try:
            return real(model, *a, **k)
        finally:
            handle.remove()

    cls.train_one_epoch = train_one_epoch
    try:
        yield
    finally:
        cls.train_one_epoch = real


def read_log(path: Path):
    return [json.loads(line) for line in path.read_text().splitlines()]


# ---------------------------------------------------------------------------------------------------------------------

# The released main.py's defaults (ScalableViT's code, which is DeiT's main.py with the changes marked "released"),
# flag by flag. "ours" marks the few defaults that deliberately differ (see the README's table); a change to any
# other default must change this list with a reason.
RELEASED_DEFAULTS = dict(
    batch_size=64,  # released (DeiT: 64; the training commands pass 128)
    epochs=300, input_size=None,  # None: 224 (32 for DIGITS, ours)
    drop=0.0, drop_path=0.1,  # the training commands pass 0.2 (S) / 0.5 (B, L)
    model_ema=False,  # released: no EMA
    model_ema_decay=0.99996, opt='adamw', opt_eps=1e-8, opt_betas=None,
    clip_grad=5.0,  # released (DeiT: none)
    momentum=0.9, weight_decay=0.05, sched='cosine', lr=5e-4, warmup_lr=1e-6, min_lr=1e-5, decay_epochs=30,
    warmup_epochs=5, decay_rate=0.1, color_jitter=0.4, aa='rand-m9-mstd0.5-inc1', smoothing=0.1,
    train_interpolation='bicubic',
    repeated_aug=False,  # released: parser.set_defaults(repeated_aug=False) (DeiT: on)
    reprob=0.25, remode='pixel', recount=1, mixup=0.8, cutmix=1.0, cutmix_minmax=None, mixup_prob=1.0,
    mixup_switch_prob=0.5, mixup_mode='batch', data_set='IMNET', data_path=None,
    seed=42,  # released (DeiT: 0)
    resume='', start_epoch=0, eval=False, dist_eval=False, num_workers=10,
    pin_mem=False,  # released (DeiT: on)
    finetune='',
    # ours, none of which changes what is trained by default
    output_dir=None, eval_crop_ratio=0.875, grad_accum_steps=1, checkpoint_hist=0, tensorboard=False, amp=None,
    amp_dtype=None, unscale_lr=False, model_ema_force_cpu=False, grad_checkpointing=False, throughput=False,
    compile=None, fused_opt=True,
    model='scalable_vit_small', model_kwargs={},
)


def test_defaults_are_the_released_ones(cls):
    defaults = vars(parse(cls, []))
    for name, value in RELEASED_DEFAULTS.items():
        assert defaults[name] == value, f'--{name}: default {defaults[name]!r}, released {value!r}'
    # the on/off pairs really switch
    assert parse(cls, ['--pin-mem']).pin_mem and not parse(cls, ['--pin-mem', '--no-pin-mem']).pin_mem
    assert parse(cls, ['--repeated-aug']).repeated_aug and not parse(cls, ['--no-repeated-aug']).repeated_aug


def test_released_commands_parse(cls):
    readme = ' '.join((CLS_DIR / 'README.md').read_text().split())
    for cmd in RELEASED_COMMANDS:
        assert ' '.join(cmd.split()) in readme, cmd  # the README shows them as released
        args = parse(cls, shlex.split(cmd)[1:])
        assert args.model.startswith('scalable_vit_')
        assert args.data_set == 'IMNET'
    small, base = (parse(cls, shlex.split(c)[1:]) for c in RELEASED_COMMANDS[:2])
    assert (small.drop_path, base.drop_path, small.dist_eval, small.batch_size) == (0.2, 0.5, True, 128)
    ev = parse(cls, shlex.split(RELEASED_COMMANDS[3])[1:])
    assert ev.eval and ev.resume == './scalable_vit_small/checkpoint_best.pth'
    kw = parse(cls, TINY)
    assert kw.model_kwargs['depths'] == (2, 2) and kw.model_kwargs['mlp_head'] is False


@pytest.mark.slow
def test_digits_end_to_end_and_eval_reproduces(tmp_path):
    out = tmp_path / 'digits'
    r = run_script([*TINY, *DIGITS, *NO_MIX, '--epochs', '3', '--output_dir', out])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert 'params: ' in r.stdout and 'FLOPs at 16' in r.stdout
    assert 'eta: ' in r.stdout and 'img/s: ' in r.stdout and 'lr: ' in r.stdout
    log = read_log(out / 'log.txt')
    assert [e['epoch'] for e in log] == [0, 1, 2]
    assert log[-1]['train_loss'] < log[0]['train_loss']
    assert max(e['test_acc1'] for e in log) > 50  # 10 classes: chance is 10%
    assert all(e['test_count'] == 360 for e in log)
    for name in ('checkpoint.pth', 'checkpoint_best.pth'):
        ckpt = torch.load(out / name, weights_only=True)  # only tensors and plain types inside
        assert set(ckpt) >= {'model', 'optimizer', 'lr_scheduler', 'scaler', 'epoch', 'args'}
    assert torch.load(out / 'checkpoint.pth', weights_only=True)['epoch'] == 2
    assert not list(out.glob('*.tmp*'))

    best = max(log, key=lambda e: e['test_acc1'])
    r = run_script([*TINY, *DIGITS, '--eval', '--resume', out / 'checkpoint_best.pth'])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert f'* Acc@1 {best["test_acc1"]:.3f} Acc@5 {best["test_acc5"]:.3f}' in r.stdout
    assert 'on 360 images' in r.stdout


# The README's first run, word for word (classification/README.md, "First run").
FIRST_RUN = ['--data-set', 'DIGITS', '--model', 'scalable_vit_small', '--model-kwargs', 'embed_dims=32,64,128',
             'num_heads=1,2,4', 'depths=2,2,2', 'mlp_ratios=2,2,2', 'sr_ratios=4,2,1', 'c_ratios=1,1,1', 'wss=4,4,2',
             'mlp_head=False', '--input-size', '32', '--batch-size', '64', '--epochs', '8', '--lr', '2e-3',
             '--unscale-lr', '--warmup-epochs', '0', '--mixup', '0', '--cutmix', '0', '--smoothing', '0',
             '--drop-path', '0', '--num_workers', '0']


@pytest.mark.slow
def test_compiled_first_run_reaches_the_eager_accuracy_and_writes_plain_checkpoints(tmp_path):
    """``--compile``: the README's DIGITS run trains and evaluates through torch.compile to the eager run's band
    (>= 95% top-1), and its checkpoint is the plain state dict: it loads strictly into the eager model and
    predict.py reads it."""
    import timm

    import scalablevit  # noqa: F401
    out = tmp_path / 'digits'
    r = subprocess.run([sys.executable, 'main.py', *FIRST_RUN, '--compile', '--output_dir', str(out)], cwd=CLS_DIR,
                       env=dict(os.environ, PYTHONUNBUFFERED='1'), capture_output=True, text=True,
                       timeout=1800)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert '--compile default: the first training and evaluation steps compile the model' in r.stdout
    best = max(e['test_acc1'] for e in read_log(out / 'log.txt'))
    assert best >= 95, best
    ckpt = torch.load(out / 'checkpoint_best.pth', weights_only=True)
    assert not [k for k in ckpt['model'] if k.startswith(('_orig_mod.', 'module.'))]
    meta = ckpt['meta']
    model = timm.create_model(meta['model'], num_classes=meta['num_classes'], **meta['model_kwargs']).eval()
    model.load_state_dict(ckpt['model'], strict=True)
    Image.new('RGB', (16, 16), (255, 255, 255)).save(tmp_path / 'blank.png')
    p = subprocess.run([sys.executable, 'predict.py', str(tmp_path / 'blank.png'), '--checkpoint',
                        str(out / 'checkpoint_best.pth')], cwd=CLS_DIR, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    line, = p.stdout.strip().splitlines()  # one image, one line: '<path>: <label> (<prob>)'
    assert line.startswith(f'{tmp_path / "blank.png"}: ') and line.endswith(')'), line


@pytest.mark.slow
def test_compile_with_ema_accumulation_checkpointing_resume_and_eval(cls, tmp_path):
    """--compile beside --model-ema, --grad-accum-steps, --grad-checkpointing, a mid-epoch stop and --resume auto,
    --eval and --throughput: everything that works eager works compiled (tiny model, one compile per mode)."""
    import torch._dynamo

    torch._dynamo.reset()
    out = tmp_path / 'run'
    common = [*TINY, *DIGITS, *NO_MIX, '--epochs', '2', '--compile', '--model-ema', '--model-ema-decay', '0.9',
              '--grad-accum-steps', '2', '--grad-checkpointing', '--output_dir', out]
    with signal_during(cls, epoch=1, forward=2), pytest.raises(StoppedToResume, match='at epoch 1, step 2 of 22'):
        cls.main(parse(cls, common))  # SIGUSR1 in the second step of epoch 1: after the first group's step
    result = cls.main(parse(cls, [*common, '--resume', 'auto']))
    assert result['max_accuracy'] > 30
    ckpt = torch.load(out / 'checkpoint.pth', weights_only=True)
    assert ckpt['epoch'] == 1 and not [k for k in ckpt['model'] if '_orig_mod' in k]
    assert not [k for k in ckpt['model_ema'] if '_orig_mod' in k]
    stats = cls.main(parse(cls, [*TINY, *DIGITS, '--compile', '--eval', '--resume', out / 'checkpoint.pth']))
    assert stats['count'] == 360
    stats = cls.main(parse(cls, [*TINY, *DIGITS, '--compile', '--throughput', '--batch-size', '4']))
    assert stats['images_per_s'] > 0
    torch._dynamo.reset()


@pytest.mark.slow
def test_resume_equals_uninterrupted(cls, tmp_path, monkeypatch):
    common = [*TINY, *DIGITS, '--epochs', '2', '--model-ema', '--model-ema-decay', '0.9', '--drop-path', '0.1']
    full = tmp_path / 'full'
    cls.main(parse(cls, [*common, '--output_dir', full]))

    # Crash right after the first checkpoint is written, then resume from it.
    part = tmp_path / 'part'
    real_save = cls.utils.save_checkpoint

    def save_then_crash(state, path):
        real_save(state, path)
        raise KeyboardInterrupt

    monkeypatch.setattr(cls.utils, 'save_checkpoint', save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        cls.main(parse(cls, [*common, '--output_dir', part]))
    monkeypatch.setattr(cls.utils, 'save_checkpoint', real_save)
    assert torch.load(part / 'checkpoint.pth', weights_only=True)['epoch'] == 0
    cls.main(parse(cls, [*common, '--output_dir', part, '--resume', part / 'checkpoint.pth']))

    a = torch.load(full / 'checkpoint.pth', weights_only=True)
    b = torch.load(part / 'checkpoint.pth', weights_only=True)
    assert a['epoch'] == b['epoch'] == 1
    for key in ('model', 'model_ema'):
        assert a[key].keys() == b[key].keys()
        for k in a[key]:
            torch.testing.assert_close(a[key][k], b[key][k], rtol=1e-6, atol=1e-7, msg=f'{key}.{k}')
    for sa, sb in zip(a['optimizer']['state'].values(), b['optimizer']['state'].values(), strict=True):
        torch.testing.assert_close(sa['exp_avg'], sb['exp_avg'], rtol=1e-6, atol=1e-7)
    assert a['lr_scheduler'] == b['lr_scheduler']
    assert read_log(full / 'log.txt')[-1]['test_acc1'] == read_log(part / 'log.txt')[-1]['test_acc1']


@pytest.mark.slow
def test_torchrun_two_processes_gloo_dist_eval(tmp_path, free_port):
    out = tmp_path / 'ddp'
    torchrun = ['-m', 'torch.distributed.run', '--nproc_per_node=2', f'--master_port={free_port}']
    r = run_script([*TINY, *DIGITS, *NO_MIX, '--epochs', '1', '--dist-eval', '--output_dir', out], torchrun)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert 'backend gloo' in r.stdout
    assert 'on 360 images' in r.stdout  # the two shards add up to the whole val set, no padding
    assert 'lr 0.004 for an effective batch of 128 (64 per process x 2 processes x 1 accumulation steps)' in r.stdout
    log = read_log(out / 'log.txt')
    assert len(log) == 1 and log[0]['test_count'] == 360

    # The released README's launcher, as written there.
    launch = ['-m', 'torch.distributed.launch', '--nproc_per_node=2', '--use_env', f'--master_port={free_port}']
    r = run_script([*TINY, *DIGITS, '--dist-eval', '--eval', '--resume', out / 'checkpoint.pth'], launch)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert f'* Acc@1 {log[0]["test_acc1"]:.3f}' in r.stdout and 'on 360 images' in r.stdout


@pytest.mark.slow
def test_bad_data_path_is_a_clear_error(cls, tmp_path):
    r = run_script(['--data-path', tmp_path / 'nowhere', '--num_workers', '0'])
    assert r.returncode == 1
    assert f'--data-path {tmp_path / "nowhere"} is not a folder' in r.stderr
    assert 'Traceback' not in r.stderr

    (tmp_path / 'train' / 'a').mkdir(parents=True)
    with pytest.raises(UserError, match=r'train.*one sub-folder per class'):  # class folder, no images
        cls.main(parse(cls, ['--data-path', tmp_path, '--num_workers', '0']))
    shutil.rmtree(tmp_path / 'train')
    make_image_folder(tmp_path, splits=('train',))
    with pytest.raises(UserError, match=f'{tmp_path / "val"} not found'):
        cls.main(parse(cls, ['--data-path', tmp_path, '--num_workers', '0']))


def test_bad_checkpoint_names_the_keys(cls, tmp_path):
    args = parse(cls, [*TINY, '--throughput'])
    model = cls.timm.create_model(args.model, num_classes=10, **args.model_kwargs)
    state = model.state_dict()
    state['bogus.weight'] = torch.zeros(1)
    del state['norm.bias']
    torch.save({'model': state}, tmp_path / 'bad.pth')
    with pytest.raises(UserError, match=r'1 missing \(norm\.bias\); 1 unexpected \(bogus\.weight\)'):
        cls.main(parse(cls, [*TINY, *DIGITS, '--eval', '--resume', tmp_path / 'bad.pth']))
    (tmp_path / 'junk.pth').write_bytes(b'not a checkpoint')
    with pytest.raises(UserError, match='cannot read checkpoint .*junk.pth: not a PyTorch checkpoint'):
        cls.main(parse(cls, [*TINY, *DIGITS, '--eval', '--resume', tmp_path / 'junk.pth']))


def test_finetune_drops_a_head_of_another_size(cls, tmp_path, caplog):
    args = parse(cls, TINY)
    src = cls.timm.create_model(args.model, num_classes=1000, **args.model_kwargs)
    torch.save({'model': src.state_dict()}, tmp_path / 'in1k.pth')
    dst = cls.timm.create_model(args.model, num_classes=10, **args.model_kwargs)
    head_before = dst.head.weight.clone()
    with caplog.at_level(logging.INFO):
        cls.load_finetune(dst, str(tmp_path / 'in1k.pth'))
    assert 'does not fit the model (10 classes); head.bias, head.weight start from scratch' in caplog.text
    torch.testing.assert_close(dst.patch_embeds[0].proj.weight, src.patch_embeds[0].proj.weight)
    assert torch.equal(dst.head.weight, head_before)

    # the released 4096-wide MLP head: its hidden layers fit and are kept, only the classifier is new
    kwargs = {**args.model_kwargs, 'mlp_head': True, 'mlp_head_dim': 64}
    src = cls.timm.create_model(args.model, num_classes=1000, **kwargs)
    torch.save({'model': src.state_dict()}, tmp_path / 'mlp.pth')
    dst = cls.timm.create_model(args.model, num_classes=10, **kwargs)
    with caplog.at_level(logging.INFO):
        cls.load_finetune(dst, str(tmp_path / 'mlp.pth'))
    assert torch.equal(dst.head[0].weight, src.head[0].weight)
    assert 'head.3.bias, head.3.weight start from scratch' in caplog.text


def make_image_folder(root: Path, splits=('train', 'val'), per_class=4, size=40):
    from PIL import Image
    rng = np.random.default_rng(0)
    for split in splits:
        for c, color in (('cat', (200, 30, 30)), ('dog', (30, 30, 200))):
            d = root / split / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per_class if split == 'train' else 2):
                noise = rng.integers(-20, 20, (size, size, 3))
                Image.fromarray(np.clip(np.array(color) + noise, 0, 255).astype(np.uint8)).save(d / f'{i}.png')


def test_image_folder_training_and_unreadable_image(cls, tmp_path):
    make_image_folder(tmp_path)
    args = [*TINY, '--data-path', tmp_path, '--input-size', '48', '--batch-size', '4', '--epochs', '1',
            '--num_workers', '1', '--output_dir', tmp_path / 'out']
    # the default recipe (RandAugment, random erasing, mixup/cutmix, smoothing), under bfloat16 autocast
    result = cls.main(parse(cls, [*args, '--amp']))
    assert result['last']['count'] == 4 and np.isfinite(result['last']['loss'])
    assert (tmp_path / 'out' / 'checkpoint_best.pth').is_file()

    (tmp_path / 'val' / 'dog' / 'broken.jpg').write_bytes(b'\xff\xd8 truncated')
    with pytest.raises(Exception, match=r'cannot read image .*broken\.jpg'):
        cls.main(parse(cls, [*args, '--eval']))


def test_non_finite_loss_stops_naming_epoch_and_step(cls):
    engine = sys.modules['engine']
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3, 2))
    with torch.no_grad():
        model[1].bias.fill_(float('nan'))
    loader = [(torch.randn(2, 3), torch.tensor([0, 1]))] * 3
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler('cpu', enabled=False)
    with pytest.raises(FloatingPointError, match='at epoch 7, step 0'):
        engine.train_one_epoch(model, torch.nn.CrossEntropyLoss(), loader, opt, torch.device('cpu'), 7, scaler)


def test_throughput_reports_device_and_dtype(cls, caplog):
    with caplog.at_level(logging.INFO):
        stats = cls.main(parse(cls, [*TINY, '--throughput', '--batch-size', '4', '--input-size', '32']))
        assert stats['images_per_s'] > 0 and stats['repeats'] == 30
        assert 'device cpu' in caplog.text and 'dtype float32' in caplog.text
        cls.main(parse(cls, [*TINY, '--throughput', '--batch-size', '4', '--input-size', '32', '--amp']))
        assert 'dtype bfloat16' in caplog.text


def test_samplers_cover_the_data(cls):
    samplers = sys.modules['samplers']
    data = list(range(10))
    shards = [list(samplers.ShardedEvalSampler(data, 3, r)) for r in range(3)]
    assert sorted(sum(shards, [])) == data
    ra = [samplers.RASampler(data, 2, r, num_repeats=3, seed=1) for r in range(2)]
    drawn = [list(s) for s in ra]
    assert len(drawn[0]) == len(drawn[1]) == 5
    ra[0].set_epoch(1)
    assert list(ra[0]) != drawn[0]


def test_slurm_environment(cls, monkeypatch):
    utils = cls.utils
    calls = {}
    monkeypatch.setattr(utils.dist, 'init_process_group', lambda **kw: calls.update(kw))
    monkeypatch.setattr(utils.dist, 'barrier', lambda: None)
    for name in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT'):
        monkeypatch.setenv(name, 'x')  # recorded, so that the test restores the environment
        monkeypatch.delenv(name)
    monkeypatch.setenv('SLURM_PROCID', '3')
    monkeypatch.setenv('SLURM_NTASKS', '4')
    monkeypatch.setenv('SLURM_LOCALID', '1')
    monkeypatch.setenv('SLURM_JOB_NODELIST', 'node17')
    args = parse(cls, ['--device', 'cpu'])
    utils.init_distributed_mode(args)
    assert (args.distributed, args.rank, args.world_size, args.gpu) == (True, 3, 4, 1)
    assert (calls['backend'], calls['rank'], calls['world_size']) == ('gloo', 3, 4)
    assert os.environ['MASTER_ADDR'] == 'node17' and os.environ['RANK'] == '3'
