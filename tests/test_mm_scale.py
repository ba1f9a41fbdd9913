"""Training detection/segmentation at the user's scale: --grad-accum-steps (mmengine's accumulative_counts),
--amp-dtype, --tensorboard, and several nodes (NNODES / NODE_RANK through dist_train.sh and torchrun, on one
machine over gloo) ending with the same weights as one node with two processes.
"""
import argparse
import glob
import os
import os.path as osp
import subprocess
import sys

import mmdet  # noqa: F401  (the OpenMMLab stack is part of the install: no skipping)
import mmseg  # noqa: F401
import pytest
import torch

from scalablevit.errors import UserError
from scalablevit.mm.checkpoint import load_mm_checkpoint

from tiny_data import make_tiny_ade, make_tiny_coco

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
DET = osp.join(ROOT, 'detection')
SEG = osp.join(ROOT, 'segmentation')
TINY_RETINA = osp.join(DET, 'configs', 'tiny', 'retinanet_scalablevit-tiny_fpn_tiny-coco.py')
TINY_FPN = osp.join(SEG, 'configs', 'tiny', 'scalablevit-tiny_fpn_1xb2-40_tiny-ade-64x64.py')
UPERNET_S = osp.join(SEG, 'configs', 'scalablevit-s_upernet_8xb2-160k_ade20k-512x512.py')


def _env(**extra):
    env = dict(os.environ, PYTHONUNBUFFERED='1', OMP_NUM_THREADS='1', **extra)
    env['PYTHONPATH'] = os.pathsep.join([ROOT] + [p for p in [env.get('PYTHONPATH')] if p])
    env.pop('TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD', None)
    return env


def _run(args, cwd, **env):
    proc = subprocess.run(args, cwd=cwd, env=_env(**env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-6000:]
    return proc.stdout


def _train_args(**over):
    args = dict(amp=False, amp_dtype=None, grad_accum_steps=1, tensorboard=False)
    args.update(over)
    return argparse.Namespace(**args)


def _config(path=UPERNET_S):
    from mmengine.config import Config
    return Config.fromfile(path)


# ----------------------------------------------------------------------------------------------------------------
# The flags -> the config (fast, in-process).

def test_grad_accum_and_amp_dtype_map_to_the_optim_wrapper(monkeypatch):
    from scalablevit.mm import runner as mm_runner
    cfg = _config()
    mm_runner._apply_scale_args(cfg, _train_args(grad_accum_steps=4))
    assert cfg.optim_wrapper.accumulative_counts == 4
    assert cfg.optim_wrapper.get('type', 'OptimWrapper') == 'OptimWrapper'

    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    cfg = _config()
    mm_runner._apply_scale_args(cfg, _train_args(amp=True))
    assert cfg.optim_wrapper.type == 'AmpOptimWrapper' and 'dtype' not in cfg.optim_wrapper  # float16, the default
    assert cfg.optim_wrapper.optimizer.type == 'AdamW'  # the rest of the wrapper is kept
    cfg = _config()
    mm_runner._apply_scale_args(cfg, _train_args(amp_dtype='bfloat16'))  # implies --amp
    assert cfg.optim_wrapper.type == 'AmpOptimWrapper' and cfg.optim_wrapper.dtype == 'bfloat16'


def test_grad_accum_counts_iteration_schedules_in_optimizer_steps():
    """UperNet 8x2 on 1 GPU x 2 images x 8 steps: 160k optimizer steps = 1.28M iterations, warm-up and poly decay
    over the same optimizer steps; RetinaNet 1x: epochs and epoch milestones unchanged, the 500-step warm-up x N."""
    from scalablevit.mm import runner as mm_runner
    cfg = _config()
    mm_runner._apply_scale_args(cfg, _train_args(grad_accum_steps=8))
    assert cfg.train_cfg.max_iters == 160000 * 8 and cfg.train_cfg.val_interval == 16000 * 8
    assert cfg.default_hooks.checkpoint.interval == 16000 * 8
    assert [(s.type, s.begin, s.end) for s in cfg.param_scheduler] == [('LinearLR', 0, 1500 * 8),
                                                                        ('PolyLR', 1500 * 8, 160000 * 8)]
    det = _config(osp.join(DET, 'configs', 'retinanet_scalablevit-s_fpn_1x_coco.py'))
    mm_runner._apply_scale_args(det, _train_args(grad_accum_steps=8))
    assert det.train_cfg.max_epochs == 12 and 'max_iters' not in det.train_cfg
    warmup, steps = det.param_scheduler
    assert (warmup.begin, warmup.end) == (0, 500 * 8) and steps.milestones == [8, 11] and steps.by_epoch
    plain = _config()
    mm_runner._apply_scale_args(plain, _train_args(grad_accum_steps=1))
    assert plain.train_cfg.max_iters == 160000 and 'accumulative_counts' not in plain.optim_wrapper


def test_amp_without_gpu_and_bad_counts_are_one_line(monkeypatch):
    from scalablevit.mm import runner as mm_runner
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    for args, message in [(_train_args(amp=True), 'needs a GPU'), (_train_args(amp_dtype='bfloat16'), 'needs a GPU'),
                          (_train_args(grad_accum_steps=0), 'at least 1')]:
        with pytest.raises(UserError, match=message) as err:
            mm_runner._apply_scale_args(_config(), args)
        assert '\n' not in str(err.value)


def test_auto_scale_lr_counts_the_accumulated_batch():
    """mmengine scales the lr by processes x batch / base; with N accumulation steps the effective batch is N times
    that, so the base is divided by N (8 GPUs x 2 = 1 GPU x 2 x 8 steps: lr unchanged)."""
    from scalablevit.mm import runner as mm_runner
    parser = argparse.ArgumentParser()
    parser.add_argument('--auto-scale-lr', action='store_true')
    parser.add_argument('--amp', action='store_true')
    mm_runner._scale_args(parser)
    cfg = _config(osp.join(DET, 'configs', 'retinanet_scalablevit-s_fpn_1x_coco.py'))
    assert cfg.auto_scale_lr.base_batch_size == 16 and cfg.train_dataloader.batch_size == 2
    mm_runner._apply_scale_args(cfg, parser.parse_args(['--grad-accum-steps', '8', '--auto-scale-lr']))
    # mmengine's rule (Runner.scale_lr): lr x (processes x batch) / base_batch_size
    assert 1 * cfg.train_dataloader.batch_size / cfg.auto_scale_lr.base_batch_size == 1.0
    cfg = _config(osp.join(DET, 'configs', 'retinanet_scalablevit-s_fpn_1x_coco.py'))
    mm_runner._apply_scale_args(cfg, parser.parse_args(['--grad-accum-steps', '8']))  # no --auto-scale-lr: untouched
    assert cfg.auto_scale_lr.base_batch_size == 16


# ----------------------------------------------------------------------------------------------------------------
# Real runs.

@pytest.fixture(scope='module')
def ade(tmp_path_factory):
    return make_tiny_ade(str(tmp_path_factory.mktemp('scale_ade')), size=64, num_train=4, num_val=2)


@pytest.mark.slow
def test_grad_accum_steps_and_tensorboard_in_a_real_run(ade, tmp_path):
    """max_iters=4 with --grad-accum-steps 2: 8 iterations of 2 images, 4 AdamW steps; TensorBoard gets the
    losses and the lr of every iteration."""
    work = tmp_path / 'work'
    opts = [f'{k}_dataloader.dataset.data_root={ade}' for k in ('train', 'val', 'test')]
    out = _run([sys.executable, osp.join(SEG, 'train.py'), TINY_FPN, '--work-dir', str(work), '--grad-accum-steps',
                '2', '--tensorboard', '--cfg-options', *opts, 'train_cfg.max_iters=4', 'train_cfg.val_interval=100',
                'default_hooks.checkpoint.interval=4', 'default_hooks.logger.interval=1', 'param_scheduler.0.end=4'],
               SEG)
    assert 'effective batch: 1 processes x 2 images x 2 accumulation steps = 4 images per optimizer step' in out
    assert 'Iter(train) [8/8]' in out
    ckpt = load_mm_checkpoint(work / 'iter_8.pth')
    assert ckpt['meta']['iter'] == 8
    steps = {int(s['step']) for s in ckpt['optimizer']['state'].values()}
    assert steps == {4}, steps  # 8 batches / 2 = 4 AdamW steps (8 without accumulation)

    events = glob.glob(str(work / '*' / 'vis_data' / 'events.out.tfevents.*'))
    assert len(events) == 1, os.listdir(work)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(events[0])
    acc.Reload()
    tags = acc.Tags()['scalars']
    assert 'loss' in tags and 'lr' in tags, tags
    assert [e.step for e in acc.Scalars('loss')] == list(range(1, 9))


def _retina_config(tmp_path, data_root):
    """The tiny RetinaNet (no BN anywhere) on absolute data paths, no validation, and a hook that saves each
    rank's weights at the end (mmengine checkpoints come from rank 0 only)."""
    (tmp_path / 'dump_weights_hook.py').write_text(
        'import os\n'
        'import torch\n'
        'from mmengine.dist import get_rank\n'
        'from mmengine.hooks import Hook\n'
        'from mmengine.registry import HOOKS\n\n\n'
        '@HOOKS.register_module()\n'
        'class DumpWeightsHook(Hook):\n'
        '    def _dump(self, runner, name):\n'
        '        model = getattr(runner.model, "module", runner.model)\n'
        '        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()},\n'
        '                   os.path.join(runner.work_dir, f"{name}_rank{get_rank()}.pth"))\n\n'
        '    def before_train(self, runner):\n'
        '        self._dump(runner, "init")\n\n'
        '    def after_run(self, runner):\n'
        '        self._dump(runner, "weights")\n')
    cfg = tmp_path / 'retina_dump.py'
    cfg.write_text(
        f'_base_ = {TINY_RETINA!r}\n'
        f"custom_imports = dict(imports=['scalablevit.mm', 'dump_weights_hook'], allow_failed_imports=False)\n"
        f'custom_hooks = [dict(type="DumpWeightsHook")]\n'
        f'train_dataloader = dict(dataset=dict(data_root={data_root!r}))\n'
        'train_cfg = dict(max_epochs=1)\n'
        'val_cfg = None\nval_dataloader = None\nval_evaluator = None\n'
        'default_hooks = dict(checkpoint=dict(interval=100), logger=dict(interval=1))\n')
    return str(cfg)


@pytest.mark.slow
def test_two_nodes_end_with_the_weights_of_one_node_two_processes(tmp_path, free_port):
    """NNODES=2 NODE_RANK=0/1 bash dist_train.sh CONFIG 1 (two torchrun agents, one process each) trains the same
    weights, on every rank, as bash dist_train.sh CONFIG 2 on one node."""
    data = make_tiny_coco(str(tmp_path / 'tiny_coco'), num_train=8, num_val=1, size=96, seed=1)
    config = _retina_config(tmp_path, osp.join(data, ''))
    hook_path = str(tmp_path)

    one = tmp_path / 'one_node'
    out = _run(['bash', osp.join(DET, 'dist_train.sh'), config, '2', '--work-dir', str(one)], DET,
               PORT=str(free_port), PYTHONPATH=hook_path)
    assert 'Epoch(train) [1][2/2]' in out  # 8 images / (2 processes x 2 images)

    two = tmp_path / 'two_nodes'
    import socket
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen(['bash', osp.join(DET, 'dist_train.sh'), config, '1', '--work-dir', str(two)], cwd=DET,
                              env=_env(NNODES='2', NODE_RANK=str(rank), MASTER_ADDR='127.0.0.1', PORT=str(port),
                                       PYTHONPATH=hook_path),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for p, o in zip(procs, outs):
        assert p.returncode == 0, o[-6000:]
    assert 'Epoch(train) [1][2/2]' in outs[0] and 'effective batch: 2 processes x 2 images' in outs[0]

    weights = {(name, rank): torch.load(d / f'weights_rank{rank}.pth', weights_only=True)
               for name, d in (('one', one), ('two', two)) for rank in (0, 1)}
    ref = weights[('one', 0)]
    for key, sd in weights.items():
        assert sd.keys() == ref.keys()
        for k in ref:
            torch.testing.assert_close(sd[k], ref[k], rtol=0, atol=1e-6, msg=f'{key} {k}')
    init = torch.load(one / 'init_rank0.pth', weights_only=True)
    changed = [k for k, v in ref.items() if v.is_floating_point() and (v - init[k]).abs().max() > 1e-4]
    assert len(changed) > len(ref) // 2  # the two steps trained (equal weights are not just the equal init)


@pytest.mark.slow
def test_compile_trains_and_tests_the_tiny_segmenter(ade, tmp_path):
    """--compile: backbone and neck compiled in training and testing; both run to their metric and the checkpoint
    keeps the plain names (it loads strictly into the eager model)."""
    work = tmp_path / 'work'
    opts = [f'{k}_dataloader.dataset.data_root={ade}' for k in ('train', 'val', 'test')]
    out = _run([sys.executable, osp.join(SEG, 'train.py'), TINY_FPN, '--work-dir', str(work), '--compile',
                '--cfg-options', *opts, 'train_cfg.max_iters=2', 'train_cfg.val_interval=2',
                'default_hooks.checkpoint.interval=2', 'param_scheduler.0.end=2'], SEG)
    assert '--compile default: backbone and neck compiled' in out and 'Iter(train) [2/2]' in out and 'mIoU' in out
    ckpt = load_mm_checkpoint(work / 'iter_2.pth')
    assert not [k for k in ckpt['state_dict'] if '_orig_mod' in k]
    out = _run([sys.executable, osp.join(SEG, 'test.py'), TINY_FPN, str(work / 'iter_2.pth'), '--work-dir', str(work),
                '--compile', '--cfg-options', *opts], SEG)
    assert 'mIoU' in out


@pytest.mark.parametrize('script', ['detection/train.py', 'segmentation/test.py', 'classification/main.py'])
def test_compile_without_a_cpp_compiler_is_one_line(script, tmp_path):
    """Inductor compiles C++ on CPU: without a compiler, --compile is refused before anything is built."""
    folder = osp.join(ROOT, osp.dirname(script))
    args = {'detection/train.py': [TINY_RETINA], 'segmentation/test.py': [TINY_FPN, 'none.pth'],
            'classification/main.py': ['--data-set', 'DIGITS', '--epochs', '1']}[script]
    env = dict(os.environ, PATH=str(tmp_path), CXX='')  # no g++, clang++ or c++ to be found
    r = subprocess.run([sys.executable, osp.basename(script), *args, '--compile'], cwd=folder, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, r.stdout[-2000:] + r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1] == ('error: --compile: torch.compile on CPU needs a C++ compiler (g++ '
                                                 'or clang++; the CXX variable names another); install one (e.g. apt '
                                                 'install g++) or drop --compile'), r.stderr[-2000:]
