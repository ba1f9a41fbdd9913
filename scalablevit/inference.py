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

The fp32 Linear layers on CPU: frozen Inductor pre-packs them for MKL's GEMM; ``linear_kernel='auto'`` (default)
times MKL's and oneDNN's pre-packed kernels on each layer's own shape at the first call and gives the layers where
oneDNN is at least 5% faster a oneDNN-packed weight (``_PackedLinear``) in a copy of the module tree that shares the
parameters (the model passed in is not changed). Which kernel wins depends on the CPU (``benchmarks/linear_kernels.py``
prints it per shape; ``benchmarks/README.md`` has the measurements); where MKL is as fast, nothing changes.
"""
import contextlib
import copy
import time
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import get_device_dtype

__all__ = ['OptimizedModel', 'optimize_for_inference']

LINEAR_KERNELS = ('auto', 'mkl', 'onednn')


class OptimizedModel(nn.Module):
    """Inference wrapper returned by :func:`optimize_for_inference`; ``.model`` is the eager model it wraps."""

    def __init__(self, model: nn.Module, compiled: Optional[nn.Module], dtype: Optional[torch.dtype],
                 linear_kernel: str = 'mkl', compile_kwargs: Optional[Dict[str, object]] = None):
        super().__init__()
        self.model = model
        self.__dict__['_compiled'] = compiled  # not a submodule: the state dict is the eager model's, under 'model.'
        self.dtype = dtype
        self.inductor_config: Dict[str, object] = {}  # patched around every call (compiling happens inside a call)
        self.linear_kernel = linear_kernel  # 'auto' / 'onednn': chosen and packed at the first call
        self.linear_kernels: Dict[str, int] = {}  # after that call: how many Linear layers run on each kernel
        self._compile_kwargs = compile_kwargs or {}  # torch.compile's arguments, for the packed copy

    def train(self, mode: bool = True) -> 'OptimizedModel':
        if mode:
            raise RuntimeError('an optimize_for_inference() model is for inference only; train the original model')
        return super().train(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.linear_kernel != 'mkl' and not self.linear_kernels and self._compiled is not None:
            self._pack_linears(x)
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

    def _pack_linears(self, x: torch.Tensor):
        """Before the first compile: the Linear layers whose shape (rows of ``x``'s forward, in, out features) runs
        faster on oneDNN's pre-packed kernel (all with ``'onednn'``) become :class:`_PackedLinear` in a copy of the
        module tree that shares the parameters; that copy is what gets compiled."""
        rows = linear_rows(self.model, x)
        use = {m for m, r in rows.items() if self.linear_kernel == 'onednn' or faster_on_onednn(r, m.in_features,
                                                                                                   m.out_features)}
        self.linear_kernels = {'onednn': len(use), 'mkl': len(rows) - len(use)}
        if not use:
            return
        memo = {id(t): t for t in [*self.model.parameters(), *self.model.buffers()]}
        packed = copy.deepcopy(self.model, memo)  # new modules, the same tensors
        for name, module in self.model.named_modules():
            if module in use:
                packed.set_submodule(name, _PackedLinear(packed.get_submodule(name), rows[module]))
        self.__dict__['_compiled'] = torch.compile(packed, **self._compile_kwargs)


class _PackedLinear(nn.Module):
    """An fp32 ``nn.Linear`` with its weight pre-packed for oneDNN's GEMM at ``rows`` input rows (a hint for the
    blocking; any row count runs); Inductor calls the kernel as it does for bf16 Linear layers."""

    def __init__(self, linear: nn.Linear, rows: int):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer('packed_weight', torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), rows))
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (..., in) -> (rows, in) -> (rows, out) -> (..., out)
        y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, self.in_features), self.packed_weight, self.bias,
                                               'none', [], '')
        return y.reshape(*x.shape[:-1], self.out_features)


def linear_rows(model: nn.Module, x: torch.Tensor) -> Dict[nn.Module, int]:
    """Every fp32 CPU ``nn.Linear`` of ``model`` that a forward of ``x`` calls -> the rows of its input."""
    rows: Dict[nn.Module, int] = {}

    def record(module, args, _):
        rows[module] = args[0].numel() // max(1, args[0].shape[-1])
    linears = [m for m in model.modules() if type(m) is nn.Linear and m.weight.dtype == torch.float32
               and m.weight.device.type == 'cpu']
    hooks = [m.register_forward_hook(record) for m in linears]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return rows


_KERNEL_TIMES: Dict[Tuple[int, int, int, str, int], float] = {}  # (rows, k, n, kernel, threads) -> s


def linear_kernel_times(rows: int, k: int, n: int, kernels: Tuple[str, ...] = ('mkl', 'onednn')) -> Dict[str, float]:
    """Seconds per (rows, k) x (k, n) product with bias on each of ``kernels``, timed here (best of 5 runs of a few
    milliseconds each; cached per shape and thread count): ``'eager'`` (``F.linear``), ``'mkl'`` (MKL on a weight
    pre-packed for it, what frozen Inductor calls), ``'onednn'`` (oneDNN on a weight pre-packed for it,
    :class:`_PackedLinear`)."""
    x, w, b = torch.randn(rows, k), torch.randn(n, k), torch.randn(n)
    threads = torch.get_num_threads()
    for kernel in kernels:
        if (rows, k, n, kernel, threads) not in _KERNEL_TIMES:
            _KERNEL_TIMES[rows, k, n, kernel, threads] = _best_time(_linear_call(kernel, x, w, b))
    return {kernel: _KERNEL_TIMES[rows, k, n, kernel, threads] for kernel in kernels}


def _linear_call(kernel: str, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor):
    """A no-argument call of ``x @ w.T + b`` on ``kernel`` (its weight packed once, here)."""
    if kernel == 'eager':
        return lambda: F.linear(x, w, b)
    if kernel == 'mkl':
        mkl_w = torch.ops.mkl._mkl_reorder_linear_weight(w, x.shape[0])
        return lambda: torch.ops.mkl._mkl_linear(x, mkl_w, w, b, x.shape[0])
    if kernel == 'onednn':
        dnn_w = torch.ops.mkldnn._reorder_linear_weight(w, x.shape[0])
        return lambda: torch.ops.mkldnn._linear_pointwise(x, dnn_w, b, 'none', [], '')
    raise ValueError(f'unknown Linear kernel {kernel!r} (eager, mkl, onednn)')


def faster_on_onednn(rows: int, k: int, n: int, margin: float = 0.95) -> bool:
    """Whether oneDNN's pre-packed fp32 GEMM beats MKL's (what frozen Inductor uses) by ``margin`` on a (rows, k) x
    (k, n) product with bias (:func:`linear_kernel_times`)."""
    t = linear_kernel_times(rows, k, n)
    return t['onednn'] < margin * t['mkl']


def _best_time(fn, repeats: int = 5, budget_s: float = 2e-3) -> float:
    """Best seconds per call of ``fn`` over ``repeats`` runs of enough calls to last about ``budget_s``."""
    with torch.no_grad():
        fn()
        t = time.perf_counter()
        fn()
        calls = max(1, int(budget_s / max(time.perf_counter() - t, 1e-7)))
        best: List[float] = []
        for _ in range(repeats):
            t = time.perf_counter()
            for _ in range(calls):
                fn()
            best.append((time.perf_counter() - t) / calls)
    return min(best)


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
        linear_kernel: str = 'auto',
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
        linear_kernel: the fp32 Linear layers' GEMM when compiled and frozen on CPU: ``'auto'`` (default) times
            MKL's and oneDNN's pre-packed kernels on each layer's shape at the first call and takes the faster,
            ``'mkl'`` leaves Inductor's choice (MKL), ``'onednn'`` packs every one for oneDNN. After the first call,
            ``.linear_kernels`` counts the layers on each.

    Returns:
        An :class:`OptimizedModel`: call it like the model.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f'optimize_for_inference expects an nn.Module, got {type(model).__name__}')
    if dtype not in (None, torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f'dtype must be None, torch.float32, torch.bfloat16 or torch.float16, got {dtype}')
    if linear_kernel not in LINEAR_KERNELS:
        raise ValueError(f'linear_kernel must be one of {", ".join(LINEAR_KERNELS)}, got {linear_kernel!r}')
    if dtype == torch.float32:
        dtype = None
    model.eval().requires_grad_(False)
    if hasattr(model, 'set_fused_attn'):
        if fused_attn is None:
            device = get_device_dtype(model)['device']  # of its first parameter
            fused_attn = not (compile and (device is None or device.type == 'cpu'))
        model.set_fused_attn(fused_attn)

    compiled = None
    compile_kwargs = dict(backend='inductor', mode=mode, dynamic=dynamic)
    if compile:
        compiled = torch.compile(model, **compile_kwargs)
    if not (compile and freeze and dtype is None and _packs_for_mkl(model)):
        linear_kernel = 'mkl'  # only frozen fp32 CPU graphs pre-pack Linear weights for MKL
    optimized = OptimizedModel(model, compiled, dtype, linear_kernel, compile_kwargs).eval()
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


def _packs_for_mkl(model: nn.Module) -> bool:
    """Whether frozen Inductor pre-packs this model's Linear weights for MKL: fp32 on CPU, with MKL and oneDNN."""
    info = get_device_dtype(model)
    return (torch._C.has_mkl and torch.backends.mkldnn.is_available() and info['dtype'] in (None, torch.float32)
            and (info['device'] is None or info['device'].type == 'cpu'))


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max absolute difference over the largest absolute reference value (float32)."""
    a, b = a.float(), b.float()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()
