"""classification/main.py on bad input: one line on stderr naming the problem and the fix, exit status 1, found
before the data set is scanned or a model is built where the command line alone tells, and no output folder left
behind. One test per row of the README's troubleshooting table."""
import resource
import shutil
from collections import namedtuple

import pytest
import torch
from test_classification import CLS_DIR, DIGITS, NO_MIX, TINY, make_image_folder, run_script  # noqa: F401

TINY_DIGITS = [*TINY, *DIGITS, *NO_MIX]


def one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith('error: '), stderr[-3000:]
    return lines[0]


@pytest.fixture
def run_cli(cls, capsys, monkeypatch):
    """``main.cli(argv)`` in-process: (exit status, the one error line). Scanning data or building a model fails
    the test, unless ``allow_work``."""
    def forbidden(*a, **k):
        raise AssertionError('data scanned / model built before the input was checked')

    def run(argv, allow_work=False):
        capsys.readouterr()
        with monkeypatch.context() as m:
            if not allow_work:
                m.setattr(cls, 'build_loaders', forbidden)
                m.setattr(cls, 'create_model', forbidden)
            status = cls.cli([str(a) for a in argv])
        err = capsys.readouterr().err
        return status, (one_error_line(err) if status else err)
    return run


def test_unknown_model(run_cli, tmp_path):
    status, line = run_cli(['--model', 'scalable_vit_smal', '--data-path', tmp_path, '--output_dir', tmp_path / 'o'])
    assert status == 1 and line == 'error: --model scalable_vit_smal: no such timm model; did you mean ' \
                                   'scalable_vit_small, scalable_vit_base, scalable_vit_large?'
    status, line = run_cli(['--model', 'nonexistent_model', '--data-path', tmp_path])
    assert status == 1 and 'error: --model nonexistent_model: no such timm model' in line
    assert not (tmp_path / 'o').exists()


def test_batch_size_zero(run_cli, tmp_path):
    status, line = run_cli(['--batch-size', '0', '--data-path', tmp_path, '--output_dir', tmp_path / 'o'])
    assert (status, line) == (1, 'error: --batch-size must be at least 1, got 0')
    status, line = run_cli(['--grad-accum-steps', '0', '--data-path', tmp_path])
    assert (status, line) == (1, 'error: --grad-accum-steps must be at least 1, got 0')
    assert not (tmp_path / 'o').exists()


def test_odd_batch_size_with_mixup(cls, run_cli, tmp_path):
    status, line = run_cli(['--batch-size', '7', '--data-path', tmp_path])
    assert status == 1 and line == ('error: mixup/cutmix pair the images of a batch: --batch-size must be even, '
                                    'got 7 (or turn them off with --mixup 0 --cutmix 0)')
    import argparse
    args = argparse.ArgumentParser(parents=[cls.get_args_parser()]).parse_args([*TINY_DIGITS, '--batch-size', '7'])
    cls.check_args(args)  # without mixup/cutmix an odd batch is fine


def test_model_kwargs_typo(run_cli, tmp_path):
    status, line = run_cli(['--model-kwargs', 'embed_dim=32', '--data-path', tmp_path])
    assert status == 1 and line.startswith('error: --model-kwargs: scalable_vit_small takes no argument embed_dim '
                                           '(did you mean embed_dims?); it takes ')
    assert 'depths' in line and 'sr_ratios' in line
    # another timm model: found when it is built, still one line
    status, line = run_cli(['--model', 'resnet18', '--model-kwargs', 'bogus_arg=1', *DIGITS, '--output_dir', ''],
                           allow_work=True)
    assert status == 1 and line.startswith('error: --model-kwargs: resnet18 does not take one of bogus_arg')


def test_output_dir_under_a_file(run_cli, tmp_path):
    (tmp_path / 'afile').write_text('x')
    status, line = run_cli(['--data-path', tmp_path, '--output_dir', tmp_path / 'afile' / 'run'])
    assert (status, line) == (1, f'error: --output_dir {tmp_path}/afile/run: {tmp_path}/afile is a file, not a '
                                 f'folder; choose another --output_dir')


def test_resume_of_a_missing_file(run_cli, tmp_path):
    status, line = run_cli(['--data-path', tmp_path, '--resume', tmp_path / 'nope.pth', '--output_dir', tmp_path / 'o'])
    assert (status, line) == (1, f'error: --resume {tmp_path}/nope.pth: checkpoint not found')
    status, line = run_cli(['--data-path', tmp_path, '--eval', '--resume', 'auto'])
    assert status == 1 and '--resume auto is for training' in line
    assert not (tmp_path / 'o').exists()


def test_missing_data_folder(run_cli, tmp_path):
    status, line = run_cli(['--data-path', tmp_path / 'imagenet', '--output_dir', tmp_path / 'o'])
    assert status == 1 and line.startswith(f'error: --data-path {tmp_path}/imagenet is not a folder; expected ')
    status, line = run_cli(['--output_dir', tmp_path / 'o'])
    assert status == 1 and line.startswith('error: --data-path is required for --data-set IMNET')
    assert not (tmp_path / 'o').exists()


def test_failure_after_start_leaves_no_output_folder(run_cli, tmp_path):
    make_image_folder(tmp_path, splits=('train',))  # no val/: found while scanning
    status, line = run_cli([*TINY, '--data-path', tmp_path, '--output_dir', tmp_path / 'o', '--num_workers', '0'],
                           allow_work=True)
    assert status == 1 and line.startswith(f'error: {tmp_path}/val not found')
    assert not (tmp_path / 'o').exists()


def test_disk_full_while_saving(cls, run_cli, tmp_path, monkeypatch):
    """The second epoch's checkpoint cannot be written (the real torch writer fails on a file size limit; the disk
    reports 1 MB free): one line, and the first epoch's checkpoint.pth is intact."""
    out = tmp_path / 'o'
    utils = cls.utils
    real_save = utils.save_checkpoint
    calls = []

    def save_with_full_disk(state, path):
        calls.append(path)
        if len(calls) == 1:
            return real_save(state, path)
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, hard))  # the checkpoint is ~450 KB
        try:
            return real_save(state, path)
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))

    Usage = namedtuple('Usage', 'total used free')
    monkeypatch.setattr(utils, 'save_checkpoint', save_with_full_disk)
    monkeypatch.setattr(shutil, 'disk_usage', lambda p: Usage(2 ** 30, 2 ** 30 - 2 ** 20, 2 ** 20 // 4))
    make_image_folder(tmp_path / 'data')
    status, line = run_cli([*TINY, '--data-path', tmp_path / 'data', '--input-size', '32', '--batch-size', '4',
                            '--num_workers', '0', '--epochs', '2', '--output_dir', out], allow_work=True)
    assert status == 1
    assert line == (f'error: disk full: writing {out}/checkpoint.pth needs about 0.3 MB, 0.2 MB free in {out}; '
                    f'the previous checkpoint.pth is intact; free some space (or point --output_dir elsewhere) and '
                    f'rerun with --resume auto'), line
    assert torch.load(out / 'checkpoint.pth', weights_only=True)['epoch'] == 0
    assert sorted(p.name for p in out.iterdir()) == ['checkpoint.pth', 'checkpoint_best.pth', 'log.txt']


@pytest.mark.slow
def test_unreadable_image_with_ten_workers(tmp_path):
    make_image_folder(tmp_path, per_class=8)
    (tmp_path / 'train' / 'dog' / 'broken.jpg').write_bytes(b'\xff\xd8 truncated')
    r = run_script([*TINY, '--data-path', tmp_path, '--input-size', '32', '--batch-size', '4', '--epochs', '1',
                    '--output_dir', tmp_path / 'out'])  # the default --num_workers 10
    assert r.returncode == 1
    line = one_error_line(r.stderr)
    assert line == (f'error: cannot read image {tmp_path}/train/dog/broken.jpg: not an image file PIL can open '
                    f'(corrupt, truncated or another format); remove or replace it')
    assert not (tmp_path / 'out').exists()


@pytest.mark.slow
def test_unreadable_image_under_torchrun(tmp_path, free_port):
    make_image_folder(tmp_path, per_class=8)
    (tmp_path / 'train' / 'dog' / 'broken.jpg').write_bytes(b'\xff\xd8 truncated')
    torchrun = ['-m', 'torch.distributed.run', '--nproc_per_node=2', f'--master_port={free_port}']
    r = run_script([*TINY, '--data-path', tmp_path, '--input-size', '32', '--batch-size', '4', '--epochs', '1',
                    '--num_workers', '2', '--output_dir', tmp_path / 'out'], torchrun)
    assert r.returncode != 0
    ours = [line for line in r.stderr.splitlines() if line.startswith('error: ')]
    assert ours[0].startswith(f'error: cannot read image {tmp_path}/train/dog/broken.jpg'), r.stderr[-3000:]
    assert all('lost contact with the other processes' in line for line in ours[1:]), ours
    assert 'Connection closed by peer' not in r.stderr
    # no traceback from our processes; torchrun's own failure summary (ChildFailedError) is the launcher's
    assert r.stderr.count('Traceback') <= r.stderr.count('ChildFailedError'), r.stderr[-3000:]
    assert not (tmp_path / 'out').exists()
