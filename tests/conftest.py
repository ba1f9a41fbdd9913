"""Shared test fixtures: the released code's reference outputs and a tiny ScalableViT configuration."""
import importlib.util
import os
import socket
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
REFERENCE_DIR = Path(os.environ.get('SCALABLEVIT_REFERENCE', REPO.parent / 'shared' / 'reference'))

# Small enough for CPU tests, and exercises every code path of the released sizes: SSA with c_ratio > 1, < 1 and
# == 1, sr_ratio 8/4/2/1, IWSA, the positional conv, several heads. Same numbers as the reference `tiny` model.
TINY_ARGS = dict(embed_dims=(32, 64, 96, 128), num_heads=(1, 2, 3, 4), depths=(2, 2, 2, 2),
                 c_ratios=(2, 1.25, 0.5, 1), sr_ratios=(8, 4, 2, 1))

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def free_port() -> int:
    """A free TCP port on the loopback interface, for a torchrun rendezvous."""
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _load_fill():
    path = REFERENCE_DIR / 'fill.py'
    if not path.is_file():
        raise FileNotFoundError(
            f'reference outputs not found at {REFERENCE_DIR}; set SCALABLEVIT_REFERENCE to the folder with fill.py')
    spec = importlib.util.spec_from_file_location('scalablevit_reference_fill', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope='session')
def fill():
    """The reference ``fill.py`` module: ``fill_by_name(model, scale)`` and ``fixed_input(batch, size)``."""
    return _load_fill()


@pytest.fixture(scope='session')
def reference():
    """Loader of a reference file by name (``tiny``, ``scalable_vit_small``, ``scalable_vit_small.eps``)."""
    def load(name):
        return torch.load(REFERENCE_DIR / f'{name}.ref.pt', map_location='cpu', weights_only=True)
    return load


@pytest.fixture
def tiny_args():
    return dict(TINY_ARGS)

