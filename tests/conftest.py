"""Shared test fixtures: reference outputs of the released code, the tiny architecture, a free port, and signals
sent the way SLURM sends them."""
import importlib.util
import os
import signal
import socket
import sys
from pathlib import Path
from typing import List

import pytest
import torch

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
CLS_DIR = REPO / 'classification'
_CLS_MODULES = ('main', 'utils', 'datasets', 'engine', 'samplers', 'predict')  # top-level modules of classification/
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

import reference as _reference  # noqa: E402  (tests/reference.py, importable as a module)

# Small enough for CPU tests, and exercises every code path of the released sizes: SSA with c_ratio > 1, < 1 and
# == 1, sr_ratio 8/4/2/1, IWSA, the positional conv, several heads. Same numbers as the reference `tiny` model.
TINY_ARGS = dict(embed_dims=(32, 64, 96, 128), num_heads=(1, 2, 3, 4), depths=(2, 2, 2, 2),
                 c_ratios=(2, 1.25, 0.5, 1), sr_ratios=(8, 4, 2, 1))

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope='session')
def fill():
    """``tests/reference.py``: ``fill_by_name(model, scale=None)`` and ``fixed_input(batch=2, size=224)``."""
    return _reference


@pytest.fixture(scope='session')
def reference():
    """Loader of a reference output by name (``tiny``, ``scalable_vit_small``, ``scalable_vit_small.eps``)."""
    return _reference.load_reference


@pytest.fixture
def tiny_args():
    return dict(TINY_ARGS)


@pytest.fixture
def free_port() -> int:
    """A free TCP port on the loopback interface, for a torchrun / mmengine rendezvous."""
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.fixture
def fresh_compile():
    """A clean torch.compile state around a test. Compiling ScalableViT again in a process that has compiled it
    before (another instance or input size) can take Inductor many minutes on a CPU; after a reset it takes
    seconds."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture(scope='session')
def load_script():
    """Loader of a repository script that is not in a package (``'tools/plot_logs.py'``) as a module."""
    def load(relpath: str):
        path = REPO / relpath
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    return load


@pytest.fixture
def cls_dir():
    """``classification/`` on ``sys.path``; yields an importer of its modules (``cls_dir('predict')``), all of them
    forgotten again afterwards (its modules are top-level: ``utils``, ``datasets``...)."""
    saved = {name: sys.modules.pop(name) for name in _CLS_MODULES if name in sys.modules}
    sys.path.insert(0, str(CLS_DIR))
    try:
        yield importlib.import_module
    finally:
        sys.path.remove(str(CLS_DIR))
        for name in _CLS_MODULES:
            sys.modules.pop(name, None)
        sys.modules.update(saved)


@pytest.fixture
def cls(cls_dir):
    """``classification/main.py`` imported in-process, on one thread (tiny models: more threads only contend)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield cls_dir('main')
    finally:
        torch.set_num_threads(threads)
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


# ---------------------------------------------------------------------------------------------------------------------
# Signals


def job_pids(root: int) -> List[int]:
    """``root`` and every process below it (its children, their DataLoader workers, ...), from /proc."""
    children = {}
    for entry in os.listdir('/proc'):
        if entry.isdigit():
            try:
                stat = Path(f'/proc/{entry}/stat').read_text()
            except OSError:
                continue
            children.setdefault(int(stat.rsplit(')', 1)[1].split()[1]), []).append(int(entry))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += children.get(pid, [])
    return found


def signal_job(root: int, sig: int) -> List[int]:
    """``sig`` to every process of the job under ``root``, as SLURM signals a job step (torchrun's workers run in
    sessions of their own, so a process group is not enough); returns the pids signalled."""
    pids = job_pids(root)
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
    return pids


@pytest.fixture(autouse=True)
def _stop_signals_restored():
    """Every test leaves SIGTERM / SIGUSR1 as it found them (handlers and the thread's signal mask)."""
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    yield
    for sig, handler in handlers.items():
        signal.signal(sig, handler)
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)
