"""Every place where this project patches upstream code or relies on the shape of an upstream function beyond its
public API: what, where, why, the versions it was written against, and the test that fails when upstream changes.

Used as their authors meant, and so not listed: mmengine's registries (``CheckpointHook`` registered again as
:class:`scalablevit.mm.resume.CheckpointHookWriteFirst`, the resumable loops, ``PreemptionHook``, ``SyncBNCPU``),
``CheckpointLoader.register_scheme`` (:mod:`scalablevit.mm.checkpoint`, the loader of local checkpoints),
``fileio.register_backend('local', ...)`` (:class:`scalablevit.mm.compat.AtomicLocalBackend`),
``Runner.build_dataloader``, the inferencers built with ``weights=None``; timm's ``register_model`` and pretrained
configs. ``tests/test_upstream.py`` checks that every entry below names a test that exists.
"""
from dataclasses import dataclass
from typing import Tuple

__all__ = ['PATCHES', 'UpstreamPatch']


@dataclass(frozen=True)
class UpstreamPatch:
    upstream: str  # the upstream object patched, or whose behaviour we rely on
    ours: str  # where we do it
    why: str
    written_against: str
    test: str  # tests/<file>.py::<test function>


PATCHES: Tuple[UpstreamPatch, ...] = (
    UpstreamPatch(
        upstream='mmengine.hooks.checkpoint_hook.open (the builtin open, as that module sees it)',
        ours='scalablevit.mm.compat._apply: replaced by scalablevit.mm.compat.atomic_open',
        why='CheckpointHook writes the last_checkpoint pointer with open(save_file, "w"), not through its file '
            'backend; a kill during that write left an empty pointer, and --resume found no checkpoint',
        written_against='mmengine 0.10.7',
        test='tests/test_upstream.py::test_checkpoint_hook_writes_its_pointer_with_open'),
    UpstreamPatch(
        upstream='mmengine.hooks.CheckpointHook._save_checkpoint_with_step / _save_best_checkpoint: they remove '
                 'the oldest (max_keep_ckpts) and the previous best checkpoint through self.file_backend, before '
                 'the new one is saved',
        ours='scalablevit.mm.resume.CheckpointHookWriteFirst: self.file_backend wrapped so that removals wait '
             'until the save is written',
        why='with max_keep_ckpts=1, or a new best, a kill or a full disk during the save left no checkpoint',
        written_against='mmengine 0.10.7',
        test='tests/test_upstream.py::test_checkpoint_hook_deletes_the_old_checkpoint_only_after_the_new_one_is_'
             'written'),
    UpstreamPatch(
        upstream='mmengine.runner.IterBasedTrainLoop.run: calls next(self.dataloader_iterator) once per '
                 'iteration already trained (to skip them), then once per iteration',
        ours='scalablevit.mm.resume.ResumableIterBasedTrainLoop.run / _RunBatches: those first calls read nothing '
             '(the sampler skips the batches instead)',
        why="mmengine's own resume reads and drops every batch already trained on",
        written_against='mmengine 0.10.7',
        test='tests/test_upstream.py::test_iter_based_loop_skips_by_calling_next_then_trains'),
    UpstreamPatch(
        upstream='timm.data.auto_augment: RandAugment / AutoAugment ops hold their function as op.aug_fn, '
                 'posterize being timm.data.auto_augment.posterize',
        ours='classification/datasets.py:_use_released_posterize: aug_fn swapped for datasets.posterize in the '
             'transform built for training (an attribute of those op objects; timm itself is not changed)',
        why='the released recipe (rand-m9-mstd0.5-inc1) draws 0 posterize bits about once in 650 images; Pillow '
            '13 raises for 0 bits, where the recipe got a black image',
        written_against='timm 1.0.31, Pillow 13.0',
        test='tests/test_upstream.py::test_timm_randaugment_holds_posterize_as_aug_fn'),
    UpstreamPatch(
        upstream="torch.distributed's gloo backend: a collective whose peer process is gone raises a plain "
                 'RuntimeError (not DistError) whose text names gloo/transport (its TCP pair)',
        ours='scalablevit.cli._peer_lost: the one place that reads an error message',
        why='the processes that outlive the one that failed print one "lost contact" line, not a traceback',
        written_against='torch 2.14.1',
        test='tests/test_classification_errors.py::test_unreadable_image_under_torchrun'),
)
