"""One call to a faster inference model: ``optimize_for_inference(model)``.

    model = timm.create_model('scalable_vit_small', pretrained=True)
    fast = optimize_for_inference(model, example_input=torch.randn(8, 3, 224, 224))
    logits = fast(images)  # same numbers as model.eval()(images), to float32 rounding

Eval mode, gradients off, then ``torch.compile`` with Inductor and weight freezing: the weights become constants of
the graph, so Inductor folds them, pre-packs the Linear and convolution weights for MKL / oneDNN on CPU, and fuses
bias, GELU, residual adds, LayerNorm and the attention softmax into the kernels around the matrix products. The graph
is built on the first call for the shape it sees (a new shape compiles again).

Freezing is the global ``torch._inductor.config.freezing``, patched around every call: ``torch.compile(model,
options={'freezing': True})`` leaves the parameters graph inputs, because Dynamo reads the global setting. Compiled
on CPU, the plain attention is the faster form (Inductor fuses scale, mask and softmax between the two products,
while the fused SDPA kernel stays opaque and is slow on IWSA's 49-token windows); eager, and on CUDA, the fused one
is. ``fused_attn=None`` picks so. Load the weights first: a later change of ``model``'s parameters reaches the
optimized model partly or not at all.
"""
import contextlib
from typing import Dict, Optional

import torch
import torch.nn as nn
from timm.layers import get_device_dtype

__all__ = ['OptimizedModel', 'optimize_for_inference']


class OptimizedModel(nn.Module):
    """Inference wrapper returned by :func:`optimize_for_inference`; ``.model`` is the eager model it wraps."""

    def __init__(self, model: nn.Module, compiled: Optional[nn.Module], dtype: Optional[torch.dtype]):
        super().__init__()
        self.model = model
        self.__dict__['_compiled'] = compiled  # not a submodule: the state dict is the eager model's, under 'model.'
        self.dtype = dtype
        self.inductor_config: Dict[str, object] = {}  # patched around every call (compiling happens inside a call)

    def train(self, mode: bool = True) -> 'OptimizedModel':
        if mode:
            raise RuntimeError('an optimize_for_inference() model is for inference only; train the original model')
        return super().train(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fn = self._compiled if self._compiled is not None else self.model
        if self.inductor_config:
            import torch._inductor.config as inductor_config
            patch = inductor_config.patch(self.inductor_config)
        else:
            patch = contextlib.nullcontext()
        with torch.no_grad(), torch.autocast(x.device.type, dtype=self.dtype or torch.float32,
                                             enabled=self.dtype is not None), patch:
            try:
                return fn(x)
            except Exception as e:
                if type(e).__name__ != 'BackendCompilerFailed':  # torch._dynamo's, e.g. no C++ compiler for Inductor
                    raise
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise RuntimeError(f'optimize_for_inference: compiling the model failed ({first[:300]}); pass '
                                   'compile=False to keep the eager fused path') from e


def optimize_for_inference(
        model: nn.Module,
        example_input: Optional[torch.Tensor] = None,
        dtype: Optional[torch.dtype] = None,
        compile: bool = True,
        freeze: bool = True,
        mode: Optional[str] = None,
        dynamic: Optional[bool] = False,
        check: bool = True,
        rtol: Optional[float] = None,
        fused_attn: Optional[bool] = None,
) -> OptimizedModel:
    """A faster inference version of ``model`` (a ScalableViT, or any timm-style model) with the same outputs.

    Args:
        model: the model; put into eval mode with gradients off (in place) and, where it has the switch
            (``set_fused_attn``), onto the attention path ``fused_attn`` picks.
        example_input: a batch of the shape that will be served. When given, the model is compiled on it now
            (not on the first real call) and, with ``check``, its output is compared with the eager model's.
        dtype: ``None`` for the model's own dtype, or ``torch.bfloat16`` / ``torch.float16`` to run under
            autocast (bf16 pays off on CPUs with AVX512-BF16 or AMX, and on GPUs).
        compile: ``False`` keeps the eager model (fused attention, no autograd), for machines without a C++
            compiler or when compile time does not pay off.
        freeze: Inductor weight freezing (constant folding, oneDNN weight pre-packing on CPU, fused epilogues).
        mode: ``torch.compile`` mode, e.g. ``'max-autotune'`` on GPUs.
        dynamic: ``torch.compile``'s ``dynamic``; ``False`` (default) specialises on the shape and recompiles
            for a new one, which gives the fastest kernels for a fixed serving shape.
        check: with ``example_input``, raise ``ValueError`` if the optimized output is not the eager output to
            within ``rtol`` (max abs difference over max abs value; default 1e-4 in float32, 2e-2 with ``dtype``).
        rtol: tolerance of the check.
        fused_attn: ``True`` for ``F.scaled_dot_product_attention``, ``False`` for the plain attention; ``None``
            (default) picks the plain one when compiling for CPU and the fused one otherwise (see the module
            docstring for the measurements).

    Returns:
        An :class:`OptimizedModel`: call it like the model.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f'optimize_for_inference expects an nn.Module, got {type(model).__name__}')
    if dtype not in (None, torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f'dtype must be None, torch.float32, torch.bfloat16 or torch.float16, got {dtype}')
    if dtype == torch.float32:
        dtype = None
    model.eval().requires_grad_(False)
    if hasattr(model, 'set_fused_attn'):
        if fused_attn is None:
            device = get_device_dtype(model)['device']  # of its first parameter
            fused_attn = not (compile and (device is None or device.type == 'cpu'))
        model.set_fused_attn(fused_attn)

    compiled = None
    if compile:
        compiled = torch.compile(model, backend='inductor', mode=mode, dynamic=dynamic)
    optimized = OptimizedModel(model, compiled, dtype).eval()
    if compile and freeze:
        optimized.inductor_config['freezing'] = True

    if example_input is not None:
        out = optimized(example_input)  # compiles now
        if check:
            tol = rtol if rtol is not None else (1e-4 if dtype is None else 2e-2)
            with torch.no_grad():
                ref = model(example_input)
            err = _rel_err(out, ref)
            if not err <= tol:
                raise ValueError(f'optimize_for_inference: optimized output differs from eager by {err:.2e} '
                                 f'(relative, tolerance {tol:.0e}); use compile=False or report the model/shape')
    return optimized


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max absolute difference over the largest absolute reference value (float32)."""
    a, b = a.float(), b.float()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()
