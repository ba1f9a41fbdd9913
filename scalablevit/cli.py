"""Command-line pieces shared by the scripts of the three tasks and ``tools/``: ``--model-kwargs``, ``--amp-dtype``,
image inputs, the OpenMMLab stack check, and the entry point of the detection / segmentation scripts."""
import glob
import importlib
import os
import shutil
from typing import List, Sequence

import timm.utils
import torch

from .errors import UserError, run_main

__all__ = ['AMP_DTYPES', 'IMG_EXTENSIONS', 'ParseKwargs', 'check_compile', 'check_mm_stack', 'collect_images',
           'release_process_group', 'run_mm_command']

#: ``--amp-dtype`` choices.
AMP_DTYPES = {'float16': torch.float16, 'bfloat16': torch.bfloat16}

#: What counts as an image in a folder or a glob (torchvision's list).
IMG_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.ppm', '.bmp', '.pgm', '.tif', '.tiff', '.webp')


class ParseKwargs(timm.utils.ParseKwargs):
    """timm's ``--model-kwargs depths=2,2,2,2 mlp_head=False`` -> dict (values are Python literals, else strings),
    with an argparse error for an item without ``=`` (timm's raises a ``ValueError`` traceback) and repeated flags
    merged (timm's keeps the last)."""

    def __call__(self, parser, namespace, values, option_string=None):
        bad = [v for v in values if v and '=' not in v]
        if bad:
            parser.error(f'{option_string} expects key=value, got {bad[0]!r}')
        before = dict(getattr(namespace, self.dest) or {})
        super().__call__(parser, namespace, values, option_string)
        setattr(namespace, self.dest, {**before, **getattr(namespace, self.dest)})


def collect_images(inputs: Sequence[str]) -> List[str]:
    """Image files named by ``inputs``, in order, without repeats: a file as given (whatever its extension; an
    unreadable one is reported when it is read), a folder searched recursively, a glob (``**`` recurses). In
    folders and globs only files ending in :data:`IMG_EXTENSIONS` count. An input that names nothing is a
    :class:`UserError`."""
    found: List[str] = []
    for item in inputs:
        if os.path.isfile(item):
            found.append(item)
            continue
        if os.path.isdir(item):
            roots = [item]
        elif glob.has_magic(item):
            roots = sorted(glob.glob(item, recursive=True))
            if not roots:
                raise UserError(f'no images match {item}')
        else:
            raise UserError(f'input not found: {item} (give an image, a folder or a glob)')
        before = len(found)
        for root in roots:
            if os.path.isfile(root):
                if root.lower().endswith(IMG_EXTENSIONS):
                    found.append(root)
                continue
            for folder, dirs, files in os.walk(root, followlinks=True):
                dirs.sort()
                found += [os.path.join(folder, f) for f in sorted(files) if f.lower().endswith(IMG_EXTENSIONS)]
        if len(found) == before:
            raise UserError(f'no images ({", ".join(IMG_EXTENSIONS)}) in {"folder " if roots == [item] else ""}{item}')
    unique, seen = [], set()
    for f in found:
        if os.path.abspath(f) not in seen:
            seen.add(os.path.abspath(f))
            unique.append(f)
    return unique


def check_mm_stack() -> None:
    """A :class:`UserError` with the fix when the OpenMMLab stack is missing or mmcv has no compiled ops."""
    try:
        import mmcv
        import mmengine  # noqa: F401
    except ImportError as e:
        raise UserError(f'the OpenMMLab stack is not installed ({e}); run `bash install.sh` in the repository root')
    try:
        from mmcv.ops import nms  # noqa: F401
    except (ImportError, OSError) as e:
        raise UserError(f'mmcv {mmcv.__version__} has no compiled ops for this torch ({e}); it must be built from '
                        'source: run `bash install.sh` in the repository root (see requirements/mm.txt)')


def check_compile(device_type: str = 'cpu') -> None:
    """``--compile``'s refusal where ``torch.compile`` cannot work: Inductor compiles C++ on CPU and Triton kernels on
    CUDA; without a C++ compiler / Triton the first step would fail deep inside it."""
    if device_type == 'cuda':
        from torch.utils._triton import has_triton
        if not has_triton():
            raise UserError('--compile: torch.compile on CUDA needs Triton (pip install triton); or drop --compile')
        return
    candidates = [os.environ.get('CXX'), 'g++', 'clang++', 'c++']
    if not any(c and shutil.which(c) for c in candidates):
        raise UserError('--compile: torch.compile on CPU needs a C++ compiler (g++ or clang++; the CXX variable names '
                        'another); install one (e.g. apt install g++) or drop --compile')


# command -> (module of scalablevit.mm, function); each function takes (argv, task, task_dir)
_MM_COMMANDS = {
    'train': ('runner', 'train_main'),
    'test': ('runner', 'test_main'),
    'predict': ('predict', 'predict_main'),
    'flops': ('flops', 'flops_main'),
}


def release_process_group() -> None:
    """Before a command's process exits: free what still holds the process group, then destroy it.

    Objects in reference cycles (mmengine's Runner and its loops and hooks, hence the DDP wrapper) keep a gloo
    process group alive after ``destroy_process_group()`` until the interpreter's own teardown. Its worker threads
    are then still running, and one that finishes a collective takes the GIL of an interpreter being torn down:
    the thread is ended by a forced unwind through C++ code, which aborts the process ("terminate called without
    an active exception", status -6) after it did all its work. Collecting the cycles first lets the group's
    destructor join its threads while Python is alive. See ``docs/gloo_exit_abort.md`` for a 20-line reproduction.
    """
    import gc

    import torch.distributed as dist
    gc.collect()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    gc.collect()


def run_mm_command(command: str, task: str, argv: Sequence[str], task_dir: str) -> int:
    """The whole of ``detection|segmentation/{train,test,predict,get_flops}.py``: check the OpenMMLab stack, run the
    command of ``scalablevit.mm`` for ``task`` (``'detection'`` or ``'segmentation'``), release the process group,
    and return the exit status (:func:`scalablevit.errors.run_main`)."""
    module, name = _MM_COMMANDS[command]

    def main():
        check_mm_stack()
        fn = getattr(importlib.import_module(f'scalablevit.mm.{module}'), name)
        fn(list(argv), task, task_dir)  # its result (a runner, metrics) is dropped here, before the release

    status = run_main(main)
    release_process_group()
    return status
