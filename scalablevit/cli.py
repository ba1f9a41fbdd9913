"""Command-line pieces shared by the scripts of the three tasks and ``tools/``: ``--model-kwargs``, ``--amp-dtype``,
image inputs, the OpenMMLab stack check, and the entry point of the detection / segmentation scripts."""
import glob
import os
import shutil
import sys
import warnings
from typing import Any, Callable, List, Optional, Sequence

import timm.utils
import torch

from .errors import EXIT_ERROR, UserError, run_main
from .signals import StopOnSignal, release_stop_signals

__all__ = ['AMP_DTYPES', 'IMG_EXTENSIONS', 'ParseKwargs', 'amp_dtype', 'check_compile', 'check_device',
           'check_mm_stack', 'collect_images', 'release_process_group', 'run_command', 'run_mm_command']

#: ``--amp-dtype`` choices.
AMP_DTYPES = {'float16': torch.float16, 'bfloat16': torch.bfloat16}


def amp_dtype(name: Optional[str], device: torch.device) -> torch.dtype:
    """``--amp-dtype NAME``, or the default of ``device``: float16 on CUDA (with a grad scaler when training),
    bfloat16 on CPU (float16 autocast is slow there)."""
    return AMP_DTYPES[name or ('float16' if device.type == 'cuda' else 'bfloat16')]

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
    warnings.filterwarnings('ignore', message='pkg_resources is deprecated as an API', category=UserWarning)  # see mm/
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


def check_device(flag: str, name: str) -> torch.device:
    """``name`` as a device this machine has, else a :class:`UserError` naming the flag and what is here."""
    here = 'cpu' + (f', cuda (0..{torch.cuda.device_count() - 1})' if torch.cuda.is_available() else '')
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UserError(f'{flag} {name}: not a device name; this machine has {here}') from None
    if device.type == 'cuda':
        if not torch.cuda.is_available():
            raise UserError(f'{flag} {name}: no CUDA device here (torch {torch.__version__}, '
                            f'{"a CPU-only build" if torch.version.cuda is None else "no GPU visible"}); '
                            f'use {flag} cpu')
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f'{flag} {name}: this machine has {here}')
    elif device.type != 'cpu' and not getattr(torch, device.type).is_available():
        raise UserError(f'{flag} {name}: no {device.type} device here; this machine has {here}')
    return device


def release_process_group() -> None:
    """Before a command's process exits: collect the reference cycles that still hold the process group (mmengine's
    Runner, its loops and hooks, the DDP wrapper), then destroy it, so that gloo's worker threads are joined while
    Python is alive. Left to the interpreter's teardown, a thread finishing a collective aborts the process
    ("terminate called without an active exception", status -6) after its work is done (``docs/gloo_exit_abort.md``).
    """
    import gc

    import torch.distributed as dist
    gc.collect()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    gc.collect()


def _peer_lost(error: BaseException) -> bool:
    """Whether ``error`` is a collective that failed because another process of the run is gone (it stopped on an
    error, or was killed): torch's ``DistError``; gloo's transport raises a plain ``RuntimeError`` from its TCP pair
    (torch 2.14), which only its source path tells apart."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return False
    return isinstance(error, dist.DistError) or (isinstance(error, RuntimeError) and 'gloo/transport' in str(error))


def run_command(main: Callable[[], Any], training: bool = False) -> int:
    """The whole of a script's ``__main__``: run ``main`` through :func:`scalablevit.errors.run_main`, release the
    process group, and return the exit status.

    A training command (``training=True``) runs inside one :class:`scalablevit.signals.StopOnSignal` from here to
    the process's exit: SIGTERM / SIGUSR1, held since the script's first line, are stop requests at any point (the
    training loop saves and stops; before training has begun there is nothing to save and the command stops with
    status 75 all the same); the handler stays until the process exits, so a signal after the run finished changes
    nothing. Any other command releases them: a signal stops it the usual way.

    A process whose collective failed because another one is gone says so in one line and exits with
    :data:`~scalablevit.errors.EXIT_ERROR`; the other process's own line is the one that tells what happened.
    """
    if training:
        StopOnSignal().install()
    else:
        release_stop_signals()
    try:
        status = run_main(main)
    except (RuntimeError, OSError) as e:
        if not _peer_lost(e):
            raise
        import torch.distributed as dist
        print(f'error: process {dist.get_rank()} lost contact with the other processes ({type(e).__name__}): '
              f'another process stopped first; its error is above', file=sys.stderr, flush=True)
        status = EXIT_ERROR
    release_process_group()
    return status


def run_mm_command(command: Callable[[List[str]], Any], argv: Sequence[str], training: bool = False) -> int:
    """The whole of ``detection|segmentation/{train,test,predict,get_flops}.py``: check the OpenMMLab stack, then
    run ``command(argv)`` (the script's own function, which imports its command of ``scalablevit.mm``) through
    :func:`run_command` (``training``: a stop signal saves and exits with 75), and return the exit status."""
    def main():
        check_mm_stack()
        command(list(argv))  # its result (a runner, metrics) is dropped here, before the release

    return run_command(main, training=training)
