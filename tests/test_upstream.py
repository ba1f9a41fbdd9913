"""The upstream code we patch or rely on (``scalablevit.upstream.PATCHES``): each entry's test, here, fails when the
upstream function changes the shape the patch was written against."""
import inspect
import re
from pathlib import Path

import pytest
import torch

import scalablevit.mm  # noqa: F401  (applies the patches)
from scalablevit.mm.checkpoint import load_mm_checkpoint
from scalablevit.upstream import PATCHES

REPO = Path(__file__).resolve().parents[1]


def test_every_patch_names_a_test_that_exists():
    assert len(PATCHES) >= 4
    for patch in PATCHES:
        path, _, name = patch.test.partition('::')
        source = (REPO / path).read_text()
        assert re.search(rf'^def {re.escape(name)}\(', source, re.M), patch.test
        assert patch.written_against and patch.why and patch.ours


def _toy_runner(work_dir, max_epochs=2, validate=False, **hook):
    """mmengine's Runner on a two-parameter model: the hooks' file handling, in a second. ``validate``: a
    validation after every epoch whose ``acc`` rises each time (every epoch is a new best)."""
    from mmengine.evaluator import BaseMetric
    from mmengine.model import BaseModel
    from mmengine.runner import Runner

    class Toy(BaseModel):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Linear(2, 1)

        def forward(self, x, mode='loss'):
            return dict(loss=self.w(x).pow(2).mean()) if mode == 'loss' else [dict()]

    class Rising(BaseMetric):
        calls = 0

        def process(self, data_batch, data_samples):
            self.results.append(1)

        def compute_metrics(self, results):
            Rising.calls += 1
            return dict(acc=float(Rising.calls))

    loader = torch.utils.data.DataLoader([torch.ones(2)] * 2, batch_size=1,
                                         collate_fn=lambda b: dict(x=torch.stack(b)))
    val = dict(val_dataloader=loader, val_cfg=dict(), val_evaluator=[Rising()]) if validate else {}
    return Runner(model=Toy(), work_dir=str(work_dir), train_dataloader=loader, **val,
                  train_cfg=dict(by_epoch=True, max_epochs=max_epochs, val_interval=1),
                  optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.1)),
                  default_hooks=dict(checkpoint=dict(type='CheckpointHook', interval=1, **hook)),
                  default_scope='mmengine')


def test_checkpoint_hook_writes_its_pointer_with_open(tmp_path, monkeypatch):
    """The ``last_checkpoint`` pointer goes through ``atomic_open`` (the patched ``open`` of mmengine's
    checkpoint hook module); if mmengine wrote it some other way, this fails and the patch is to be revisited."""
    import mmengine.hooks.checkpoint_hook as hook_module

    import scalablevit.mm.compat as compat
    source = inspect.getsource(hook_module.CheckpointHook)
    assert "with open(save_file, 'w') as f:" in source
    assert hook_module.open is compat.atomic_open
    written = []
    real = compat.atomic_write
    monkeypatch.setattr(compat, 'atomic_write', lambda path, data, *a, **k: (written.append(path),
                                                                             real(path, data, *a, **k)))
    _toy_runner(tmp_path, max_epochs=1).train()
    pointer = tmp_path / 'last_checkpoint'
    assert str(pointer) in written and pointer.read_text() == str(tmp_path / 'epoch_1.pth')
    assert str(tmp_path / 'epoch_1.pth') in written  # the checkpoint itself, through AtomicLocalBackend.put


def test_checkpoint_hook_deletes_the_old_checkpoint_only_after_the_new_one_is_written(tmp_path):
    """``max_keep_ckpts=1``: mmengine's own hook deletes epoch_1.pth before saving epoch_2.pth, so a failed (or
    killed) save of epoch 2 left no checkpoint. Ours keeps epoch_1.pth until epoch_2.pth is written."""
    runner = _toy_runner(tmp_path, max_epochs=3, max_keep_ckpts=1)
    save = runner.save_checkpoint

    def failing_save(out_dir, filename, *args, **kwargs):
        if filename == 'epoch_2.pth':
            raise OSError(28, 'No space left on device')
        return save(out_dir, filename, *args, **kwargs)
    runner.save_checkpoint = failing_save
    with pytest.raises(OSError, match='No space'):
        runner.train()
    assert (tmp_path / 'epoch_1.pth').is_file()
    assert load_mm_checkpoint(tmp_path / 'epoch_1.pth')['meta']['epoch'] == 1


def test_checkpoint_hook_keeps_max_keep_ckpts(tmp_path):
    """The deferred removals do happen, once the new checkpoint is written."""
    _toy_runner(tmp_path, max_epochs=3, max_keep_ckpts=1).train()
    assert sorted(p.name for p in tmp_path.glob('*.pth')) == ['epoch_3.pth']


def test_checkpoint_hook_keeps_the_previous_best_until_the_new_best_is_written(tmp_path):
    """``save_best``: mmengine removes the previous best checkpoint, then saves the new one."""
    runner = _toy_runner(tmp_path / 'fail', max_epochs=3, validate=True, save_best='acc', rule='greater')
    save = runner.save_checkpoint

    def failing_save(out_dir, filename, *args, **kwargs):
        if filename.startswith('best_') and filename.endswith('epoch_2.pth'):
            raise OSError(28, 'No space left on device')
        return save(out_dir, filename, *args, **kwargs)
    runner.save_checkpoint = failing_save
    with pytest.raises(OSError, match='No space'):
        runner.train()
    assert (tmp_path / 'fail' / 'best_acc_epoch_1.pth').is_file()

    _toy_runner(tmp_path / 'ok', max_epochs=3, validate=True, save_best='acc', rule='greater',
                max_keep_ckpts=1).train()
    assert sorted(p.name for p in (tmp_path / 'ok').glob('*.pth')) == ['best_acc_epoch_3.pth', 'epoch_3.pth']
    assert load_mm_checkpoint(tmp_path / 'ok' / 'best_acc_epoch_3.pth')['meta']['epoch'] == 3


def test_iter_based_loop_skips_by_calling_next_then_trains():
    """``ResumableIterBasedTrainLoop`` hands mmengine's ``run`` an iterator whose first ``loop.iter`` items are
    the skipped ones (``None``, nothing read): that needs ``run`` to advance with ``next(self.dataloader_iterator)``
    once per trained iteration and then read one batch per iteration from it."""
    from mmengine.runner import IterBasedTrainLoop
    source = inspect.getsource(IterBasedTrainLoop.run)
    advance = source.index('for _ in range(self._iter):\n                next(self.dataloader_iterator)')
    assert advance < source.index('data_batch = next(self.dataloader_iterator)')
    assert 'self.run_iter(data_batch)' in source


def test_timm_randaugment_holds_posterize_as_aug_fn():
    """The swap in ``classification/datasets.py`` finds timm's posterize as ``aug_fn`` of RandAugment's ops."""
    from timm.data import create_transform
    from timm.data.auto_augment import posterize
    transform = create_transform(32, is_training=True, auto_augment='rand-m9-mstd0.5-inc1')
    ops = [op for t in transform.transforms for op in getattr(t, 'ops', [])]
    assert ops and any(getattr(op, 'aug_fn', None) is posterize for op in ops)
