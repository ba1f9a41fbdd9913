"""Deterministic weights by name and a fixed input: how the outputs in ``tests/data/*.ref.pt`` were made.

Two implementations that share parameter names and shapes get identical weights from :func:`fill_by_name` without
exchanging a file, which is how the released implementation's outputs can be compared with ours.

* Each floating-point tensor of the state dict gets a float64 standard normal draw ``r`` from a
  ``torch.Generator`` seeded with the CRC32 of the tensor's name (UTF-8).
* Tensors of two or more dims: ``r / sqrt(n)``, ``n`` the number of elements of one row (``t[0].numel()``, at
  least 1), so every output has about unit variance. One-dim tensors named ``...weight`` (norm scales):
  ``1 + 0.1 r``. Every other tensor (biases): ``0.02 r``.
* ``scale={'substring': f}`` multiplies the tensors whose name contains the substring by ``f`` (after the rule
  above); the result is cast to the tensor's dtype.
* The input is ``torch.randn(batch, 3, size, size)`` (float32) from a generator seeded with 1234.
"""
import math
import zlib
from pathlib import Path
from typing import Dict, Optional

import torch
import torch.nn as nn

DATA_DIR = Path(__file__).resolve().parent / 'data'
INPUT_SEED = 1234


def _value(name: str, shape: torch.Size) -> torch.Tensor:
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode('utf-8')))
    r = torch.randn(shape, generator=gen, dtype=torch.float64)
    if len(shape) >= 2:
        return r / math.sqrt(max(1, math.prod(shape[1:])))
    if name.endswith('weight'):
        return 1.0 + 0.1 * r
    return 0.02 * r


@torch.no_grad()
def fill_by_name(model: nn.Module, scale: Optional[Dict[str, float]] = None) -> nn.Module:
    """Overwrite every floating-point tensor of ``model``'s state dict in place (see the module docstring)."""
    for name, tensor in model.state_dict().items():
        if not tensor.is_floating_point():
            continue
        value = _value(name, tensor.shape)
        for key, factor in (scale or {}).items():
            if key in name:
                value = value * factor
        tensor.copy_(value.to(tensor.dtype))
    return model


def fixed_input(batch: int = 2, size: int = 224) -> torch.Tensor:
    """The reference input: (batch, 3, size, size) float32, seed 1234."""
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(INPUT_SEED))


def load_reference(name: str) -> dict:
    """``tests/data/{name}.ref.pt`` (``tiny``, ``scalable_vit_small``, ``scalable_vit_small.eps``)."""
    path = DATA_DIR / f'{name}.ref.pt'
    if not path.is_file():
        raise FileNotFoundError(f'reference output {path} is missing from the repository checkout')
    return torch.load(path, map_location='cpu', weights_only=True)
