"""Detection and segmentation lose nothing on a preemption, a full disk or a broken checkpoint.

A tiny run stopped by SIGTERM mid-epoch (mid-run for the iteration-based segmenters) writes one checkpoint, ends
with exit status 75 and one line, and ``--resume`` ends with the same weights as a run that never stopped: RetinaNet,
Mask R-CNN, Semantic FPN and UperNet, in one process and in two over gloo.
"""
import os
import os.path as osp
import signal
import subprocess
import sys
import time

import pytest
import torch

from scalablevit.errors import EXIT_STOPPED
from scalablevit.mm.checkpoint import load_mm_checkpoint

from conftest import signal_job

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
TESTS = osp.join(ROOT, 'tests')
DET, SEG = osp.join(ROOT, 'detection'), osp.join(ROOT, 'segmentation')
MODELS = {
    'retinanet': (DET, 'configs/tiny/retinanet_scalablevit-tiny_fpn_tiny-coco.py'),
    'mask_rcnn': (DET, 'configs/tiny/mask-rcnn_scalablevit-tiny_fpn_tiny-coco.py'),
    'fpn': (SEG, 'configs/tiny/scalablevit-tiny_fpn_1xb2-40_tiny-ade-64x64.py'),
    'upernet': (SEG, 'configs/tiny/scalablevit-tiny_upernet_1xb2-40_tiny-ade-64x64.py'),
}
ITERS = 4  # per run: 2 epochs of 2 (detection, 8 images, batch 2 x 2 processes) or 4 iterations (segmentation)


@pytest.fixture(scope='module')
def data(tmp_path_factory, load_script):
    root = tmp_path_factory.mktemp('preempt_data')
    make_tiny_coco = load_script('detection/tools/make_tiny_coco.py').make_tiny_coco
    make_tiny_ade = load_script('segmentation/tools/make_tiny_ade.py').make_tiny_ade
    return dict(det=make_tiny_coco(str(root / 'coco'), num_train=8, num_val=1, size=96, seed=1),
                seg=make_tiny_ade(str(root / 'ade'), size=64, num_train=4, num_val=1))


def _config(tmp_path, model: str, data: dict, nproc: int, hooks=(), workers: int = 0, persistent: bool = False,
            name: str = '') -> str:
    """The tiny config on the test data: no validation, a checkpoint per epoch (detection) or at the end;
    ``workers`` loader processes per rank."""
    folder, config = MODELS[model]
    loader = f'num_workers={workers}, persistent_workers={persistent}, '
    det = folder == DET
    hooks = [dict(type='PreemptionHook'), dict(type='DumpWeightsHook'), *hooks]
    lines = [f'_base_ = {osp.join(folder, config)!r}',
             "custom_imports = dict(imports=['scalablevit.mm', 'mm_test_hooks'], allow_failed_imports=False)",
             f'custom_hooks = {hooks!r}',
             'val_cfg = None', 'val_dataloader = None', 'val_evaluator = None']
    if det:
        epochs = ITERS * 2 * nproc // 8  # 8 images, 2 a batch
        lines += [f"train_dataloader = dict({loader}dataset=dict(data_root={osp.join(data['det'], '')!r}))",
                  f'train_cfg = dict(max_epochs={epochs}, val_interval=100)',
                  'default_hooks = dict(checkpoint=dict(interval=1, max_keep_ckpts=5), logger=dict(interval=1))']
    else:
        lines += [f"train_dataloader = dict({loader}dataset=dict(data_root={data['seg']!r}))",
                  f'train_cfg = dict(max_iters={ITERS}, val_interval=100)',
                  f'param_scheduler = [dict(type="PolyLR", eta_min=0.0, power=0.9, begin=0, end={ITERS}, '
                  'by_epoch=False)]',
                  f'default_hooks = dict(checkpoint=dict(interval={ITERS}), logger=dict(interval=1))']
    path = tmp_path / f'{model}_{nproc}{name}.py'
    path.write_text('\n'.join(lines) + '\n')
    return str(path)


def _env(**extra):
    env = dict(os.environ, PYTHONUNBUFFERED='1', OMP_NUM_THREADS='1', PYTHONPATH=TESTS, **extra)
    for k in ('PORT', 'RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'TORCHELASTIC_ERROR_FILE'):
        env.pop(k, None)
    return env


def _train(model: str, config: str, work, nproc: int, *args, timeout=900):
    folder = MODELS[model][0]
    cmd = ([sys.executable, 'train.py'] if nproc == 1 else ['bash', 'dist_train.sh']) + [config] + \
        ([] if nproc == 1 else [str(nproc)]) + ['--work-dir', str(work), *args]
    r = subprocess.run(cmd, cwd=folder, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                       timeout=timeout)
    return r.returncode, r.stdout, r.stderr


def _weights(work, ranks):
    return [torch.load(osp.join(work, f'weights_rank{r}.pth'), weights_only=True) for r in range(ranks)]


def _assert_same(a, b, what):
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f'{what}: {len(different)} tensors differ, e.g. {different[:3]}'


def _stopped_line(stderr: str) -> str:
    lines = [line for line in stderr.strip().splitlines() if line.startswith('stopped by')]
    assert len(lines) == 1, stderr[-4000:]
    return lines[0]


@pytest.mark.slow
@pytest.mark.parametrize('nproc', [1, 2])
@pytest.mark.parametrize('model', sorted(MODELS))
def test_sigterm_mid_epoch_then_resume_trains_the_same_weights(model, nproc, data, tmp_path):
    plain = _config(tmp_path, model, data, nproc)
    rc, out, err = _train(model, plain, tmp_path / 'plain', nproc)
    assert rc == 0, out[-4000:] + err[-4000:]
    reference = _weights(tmp_path / 'plain', nproc)

    stop_at = 1 if nproc == 2 else 3  # detection: inside the first epoch (2 per epoch) or the second (4 per epoch)
    config = _config(tmp_path, model, data, nproc, [dict(type='SignalAtIterHook', iteration=stop_at, twice=True)])
    work = tmp_path / 'stopped'
    rc, out, err = _train(model, config, work, nproc)
    assert rc == EXIT_STOPPED, out[-4000:] + err[-4000:]
    line = _stopped_line(err)
    ckpt = osp.join(work, f'iter_{stop_at}.pth')
    assert line.startswith('stopped by SIGTERM after ') and f'saved {ckpt}; run the same command with --resume' in line
    if MODELS[model][0] == DET:
        per_epoch = 8 // (2 * nproc)
        epoch, inner = divmod(stop_at, per_epoch)
        assert f'epoch {epoch + 1} of {ITERS // per_epoch}, iteration {inner} of {per_epoch}' in line, line
    else:
        assert f'iteration {stop_at} of {ITERS}' in line
    saved = load_mm_checkpoint(ckpt)
    assert saved['meta']['iter'] == stop_at and {'state_dict', 'optimizer', 'param_schedulers'} <= set(saved)
    assert saved['meta']['preemption']['signal'] == 'SIGTERM' and saved['meta']['preemption']['rng'] is not None
    assert open(osp.join(work, 'last_checkpoint')).read() == ckpt
    assert not [n for n in os.listdir(work) if '.tmp.' in n]

    rc, out, err = _train(model, config, work, nproc, '--resume')
    assert rc == 0, out[-4000:] + err[-4000:]
    assert 'resumed epoch' in out and 'skipped in the sampler' in out, out[-4000:]
    for r, (got, want) in enumerate(zip(_weights(work, nproc), reference)):
        _assert_same(got, want, f'{model}, {nproc} processes, rank {r}')


@pytest.mark.slow
def test_signal_during_validation_stops_after_it_and_resumes_at_the_next_epoch(data, tmp_path):
    """SIGTERM while the first epoch's validation runs: the validation finishes, the checkpoint is the epoch's end,
    and --resume trains the second epoch without validating the first again. A signal in the last validation lets
    the run finish (exit status 0): nothing would be left to resume."""
    det = osp.join(data['det'], '')
    config = tmp_path / 'val_stop.py'
    config.write_text('\n'.join([
        f"_base_ = {osp.join(DET, MODELS['retinanet'][1])!r}",
        "custom_imports = dict(imports=['scalablevit.mm', 'mm_test_hooks'], allow_failed_imports=False)",
        "custom_hooks = [dict(type='PreemptionHook'), dict(type='SignalInValHook', epoch=1), "
        "dict(type='SignalInValHook', epoch=2)]",
        f"train_dataloader = dict(dataset=dict(data_root={det!r}))",
        f"val_dataloader = dict(dataset=dict(data_root={det!r}))",
        "test_dataloader = val_dataloader",
        f"val_evaluator = dict(ann_file={det + 'annotations/instances_val2017.json'!r}, metric=['bbox'])",
        "test_evaluator = val_evaluator",
        "train_cfg = dict(max_epochs=2, val_interval=1)",
        "default_hooks = dict(checkpoint=dict(interval=100), logger=dict(interval=1))"]) + '\n')
    work = tmp_path / 'work'
    rc, out, err = _train('retinanet', str(config), work, 1)
    assert rc == EXIT_STOPPED, out[-4000:] + err[-4000:]
    ckpt = osp.join(work, 'iter_4.pth')  # 8 images, 2 a batch: the end of epoch 1
    assert _stopped_line(err) == (f'stopped by SIGTERM after epoch 1 of 2 and its validation; saved {ckpt}; run '
                                  'the same command with --resume to continue')
    assert 'coco/bbox_mAP' in out and 'Epoch(train) [2]' not in out  # the validation ran to its metrics
    saved = load_mm_checkpoint(ckpt)
    assert (saved['meta']['epoch'], saved['meta']['iter']) == (1, 4)
    assert saved['meta']['preemption']['signal'] == 'SIGTERM'

    rc, out, err = _train('retinanet', str(config), work, 1, '--resume')
    assert rc == 0, out[-4000:] + err[-4000:]
    assert 'resumed epoch: 1, iter: 4' in out, out[-4000:]
    assert 'Epoch(train) [1]' not in out and 'Epoch(val) [1]' not in out  # epoch 1 and its validation: done
    assert 'Epoch(train) [2]' in out and 'Epoch(val) [2]' in out and 'coco/bbox_mAP' in out
    assert 'stopped by' not in err and not osp.exists(osp.join(work, 'iter_8.pth'))  # the last validation's signal


@pytest.mark.slow
@pytest.mark.parametrize('model,nproc,workers,persistent', [('retinanet', 1, 2, True), ('fpn', 1, 2, False),
                                                             ('upernet', 2, 2, True)])
def test_signal_to_the_whole_job_with_loader_workers_resumes_exactly(model, nproc, workers, persistent, data,
                                                                      tmp_path):
    """SIGTERM to every process of the job (SLURM's way: the launcher, each rank and its loader workers, persistent
    or not), in the middle of the run and again while the checkpoint is written: the workers ignore it, the ranks
    agree on an iteration, one checkpoint, exit status 75 and one line; ``--resume`` ends with the weights of a run
    that never stopped (each sample's augmentation is seeded from its place in the run, not by the worker)."""
    kw = dict(workers=workers, persistent=persistent)
    rc, out, err = _train(model, _config(tmp_path, model, data, nproc, **kw), tmp_path / 'plain', nproc)
    assert rc == 0, out[-4000:] + err[-4000:]
    reference = _weights(tmp_path / 'plain', nproc)

    stop_at = 1 if nproc == 2 else 3
    hook = dict(type='SignalAtIterHook', iteration=stop_at, twice=True, job=True)
    config = _config(tmp_path, model, data, nproc, [hook], name='stopped', **kw)
    work = tmp_path / 'stopped'
    rc, out, err = _train(model, config, work, nproc)
    assert rc == EXIT_STOPPED, out[-4000:] + err[-4000:]
    signalled = [int(n) for n in open(work / 'signalled.txt').read().split()]
    assert signalled[0] >= 1 + nproc * (1 + workers) - (nproc == 1), signalled  # workers alive at the signal
    ckpt = osp.join(work, f'iter_{stop_at}.pth')
    assert _stopped_line(err).startswith('stopped by SIGTERM after ') and f'saved {ckpt}' in err
    assert 'Traceback' not in err and 'killed by signal' not in err, err[-4000:]

    rc, out, err = _train(model, config, work, nproc, '--resume')
    assert rc == 0, out[-4000:] + err[-4000:]
    for r, (got, want) in enumerate(zip(_weights(work, nproc), reference)):
        _assert_same(got, want, f'{model}, {nproc} processes, {workers} workers (persistent: {persistent}), rank {r}')


def _wait_for_files(p, paths, timeout=300):
    """Wait until every one of ``paths`` exists, while ``p`` runs."""
    end = time.monotonic() + timeout
    while not all(osp.exists(f) for f in paths):
        assert p.poll() is None and time.monotonic() < end, f'the job ended ({p.returncode}) before {paths} appeared'
        time.sleep(0.02)


def test_signal_while_the_job_starts_stops_it_with_75(data, tmp_path):
    """SIGTERM to the whole of ``dist_train.sh`` while it starts: 0.5 s in (the checks, importing torch in each
    process), and once both Runners are built but before training begins (a hook holds each rank in ``before_run``
    until the signal is there: a fixed delay lands after the end of the tiny run on a fast machine): nothing is
    trained, nothing is saved, exit status 75 and one line: a requeueing script runs it again."""
    gate = _config(tmp_path, 'retinanet', data, 1, [dict(type='StartGateHook')], name='gate')
    for when, config in (('early', _config(tmp_path, 'retinanet', data, 1)), ('runner built', gate)):
        work = tmp_path / when.replace(' ', '_')
        p = subprocess.Popen(['bash', 'dist_train.sh', config, '2', '--work-dir', str(work)], cwd=DET, env=_env(),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        if when == 'early':
            time.sleep(0.5)
        else:
            _wait_for_files(p, [work / f'started_rank{r}' for r in range(2)])
        signal_job(p.pid, signal.SIGTERM)
        out, err = p.communicate(timeout=300)
        assert p.returncode == EXIT_STOPPED, out[-4000:] + err[-4000:]
        line = _stopped_line(err)
        expected = ['stopped by SIGTERM before training began; nothing new to save; run the same command again']
        if when == 'early':
            expected.append('stopped by SIGTERM before the processes started; nothing to save; run the same '
                            'command again')
        assert line in expected, (when, err[-4000:])
        assert 'Epoch(train)' not in out, (when, out[-4000:])
        saved = [n for n in (os.listdir(work) if osp.isdir(work) else []) if n.endswith('.pth')]
        assert not [n for n in saved if not n.startswith('weights_rank')], saved  # (DumpWeightsHook's, at after_run)


@pytest.mark.slow
def test_full_disk_leaves_the_previous_checkpoint_and_one_line(data, tmp_path):
    config = _config(tmp_path, 'retinanet', data, 1, [dict(type='FullDiskAfterEpochHook', epoch=1)])
    work = tmp_path / 'work'
    rc, out, err = _train('retinanet', config, work, 1, '--cfg-options', 'train_cfg.max_epochs=2')
    assert rc == 1, out[-4000:] + err[-4000:]
    lines = err.strip().splitlines()
    assert lines[-1].startswith(f'error: disk full: writing {work}/epoch_2.pth needs about ') and \
        f'MB, 0.2 MB free in {work}; nothing was written under epoch_2.pth; the newest checkpoint, epoch_1.pth, is ' \
        f'intact; free some space and resume' in lines[-1], err[-3000:]
    assert 'Traceback' not in err
    names = sorted(os.listdir(work))
    assert 'epoch_1.pth' in names and 'epoch_2.pth' not in names and not [n for n in names if '.tmp.' in n]
    assert load_mm_checkpoint(work / 'epoch_1.pth')['meta']['epoch'] == 1
    assert open(work / 'last_checkpoint').read() == str(work / 'epoch_1.pth')


@pytest.mark.slow
def test_resume_falls_back_from_an_unreadable_newest_checkpoint(data, tmp_path):
    config = _config(tmp_path, 'retinanet', data, 1)
    work = tmp_path / 'work'
    rc, out, err = _train('retinanet', config, work, 1, '--cfg-options', 'train_cfg.max_epochs=2')
    assert rc == 0, err[-4000:]
    newest = work / 'epoch_2.pth'
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # truncated, as a write killed midway
    rc, out, err = _train('retinanet', config, work, 1, '--resume', '--cfg-options', 'train_cfg.max_epochs=3')
    assert rc == 0, out[-4000:] + err[-4000:]
    assert f'--resume: {newest} cannot be read (' in out and f'resuming from {work}/epoch_1.pth, the newest one ' \
        f'that can' in out, out[-4000:]
    assert 'Epoch(train) [2][4/4]' in out and 'Epoch(train) [3][4/4]' in out
