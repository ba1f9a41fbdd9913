"""Throughput and peak memory of ScalableViT (fast and reference paths) and its timm peers.

Inference images/s and training-step images/s (forward, cross-entropy, backward, AdamW step) with peak memory,
on CPU or CUDA, fp32 or bf16/fp16 autocast, eager or ``torch.compile``. Each ScalableViT model is measured in two
forms in the same run:

* ``fast``: the library model as it is (fused attention, the default);
* ``reference``: a copy of the same model, sharing its weights' values, whose attention modules run the released
  implementation's forward passes as written there (explicit attention matrices, its reshapes and copies); it is
  checked equal to ``fast`` before anything is timed;
* ``optimized`` (inference only): ``scalablevit.optimize_for_inference(model)``, the fast model compiled by Inductor
  with weight freezing;
* ``checkpointed`` (training only): the fast model with gradient checkpointing (``set_grad_checkpointing``), which
  trades a second forward pass of every block for the memory of its activations;
* ``onnxruntime``, ``openvino`` (inference, CPU): the same weights exported by ``scalablevit.serving`` (ONNX for ONNX
  Runtime, OpenVINO IR converted from torch for OpenVINO), checked against eager when exported and again on the
  row's own input, run by the engine with the same threads. fp32 both; bf16 OpenVINO only (its inference
  precision; ONNX Runtime has no CPU bf16 kernels for this graph); ``--dtype int8``: OpenVINO only, NNCF
  post-training quantization calibrated on random inputs (speed only: the accuracy it keeps is measured on real
  images by ``tools/export.py --int8 --val``).

A training step is forward, cross-entropy, backward and an AdamW step. Our forms step with the fused AdamW
(``torch.optim.AdamW(fused=True)``, one kernel for all parameters) where torch has it for the device; the reference
row steps with the default AdamW, as the released training code did (a loop over the parameters on CPU).

The machine's limit is measured in the same run: the best rate of a large ``torch.mm`` in each dtype with the same
threads. Every row shows its achieved FLOP rate (img/s x FLOPs per image, ``scalablevit.info``'s count, x3 for a
training step) and that rate as a fraction of the limit.

Rows are run interleaved (repeat 1 of every row, then repeat 2, ...) so that machine drift hits every row alike;
the table shows the median over repeats. Examples::

    python benchmarks/throughput.py --device cpu
    python benchmarks/throughput.py --device cpu --models scalable_vit_small --batch 16 --dtype fp32 bf16
    python benchmarks/throughput.py --device cuda --models all --batch 64 --dtype fp16 --mode infer train
    python benchmarks/throughput.py --models scalable_vit_small --impl fast optimized reference --batch 8 1
    python benchmarks/throughput.py --models scalable_vit_small --impl fast --compile yes --json row.json
"""
import argparse
import atexit
import copy
import json
import logging
import os
import platform
import shutil
import statistics
import sys
import time
import types
from contextlib import nullcontext
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without installing

import timm

from scalablevit.inference import LINEAR_KERNELS, optimize_for_inference
from scalablevit.info import count_macs_by_op
from scalablevit.model import InteractiveWindowAttention, ScalableSelfAttention, ScalableViT  # registers models

_logger = logging.getLogger('throughput')

# ScalableViT sizes and the timm peers at similar FLOPs.
PEERS = {
    'scalable_vit_small': ['swin_tiny_patch4_window7_224', 'pvt_v2_b2', 'twins_svt_small'],
    'scalable_vit_base': ['swin_small_patch4_window7_224', 'pvt_v2_b3', 'twins_svt_base'],
    'scalable_vit_large': ['swin_base_patch4_window7_224', 'pvt_v2_b4', 'twins_svt_large'],
}
ALL_MODELS = [m for ours, peers in PEERS.items() for m in [ours] + peers]
DTYPES = {'fp32': None, 'bf16': torch.bfloat16, 'fp16': torch.float16, 'int8': None}
OURS = ('fast', 'optimized', 'checkpointed')  # the forms of the library's model (the reference is the released code)
ENGINES = ('onnxruntime', 'openvino')  # exported files run by an inference engine (CPU, inference)
ENGINE_DTYPES = {'onnxruntime': ('fp32',), 'openvino': ('fp32', 'bf16', 'int8')}


# --------------------------------------------------------------------------------------------------------------------
# The reference path: the released forward passes (Twins-style code of the ScalableViT release), transcribed as they
# were written and bound onto our modules, so that they use our parameters. Not a model definition: no layers here.
# --------------------------------------------------------------------------------------------------------------------

def released_ssa_forward(self: ScalableSelfAttention, x: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """SSA as released: explicit attention matrix, reshape + permute for every head split."""
    H, W = size
    B, N, C = x.shape
    if self.sr_ratio > 1:
        _q = self.q(x).reshape(B, N, self.num_heads, int(self.c_dim / self.num_heads)).permute(0, 2, 1, 3)
        _x = x.permute(0, 2, 1).reshape(B, C, H, W)
        _x = self.reduction(_x).reshape(B, self.c_dim, -1).permute(0, 2, 1)
        _x = self.norm_act(_x)
        _k = self.k(_x).reshape(B, -1, self.num_heads, int(self.c_dim / self.num_heads)).permute(0, 2, 1, 3)
        _v = self.v(_x).reshape(B, -1, self.num_heads, int(C / self.num_heads)).permute(0, 2, 1, 3)
    else:
        _q = self.q(x).reshape(B, N, self.num_heads, C // self.num_heads).permute(0, 2, 1, 3)
        kv = self.kv(x).reshape(B, -1, 2, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        _k, _v = kv[0], kv[1]
    attn = (_q @ _k.transpose(-2, -1)) * self.scale
    attn = attn.softmax(dim=-1)
    attn = self.attn_drop(attn)
    x = (attn @ _v).transpose(1, 2).reshape(B, N, C)
    x = self.proj(x)
    x = self.proj_drop(x)
    return x


def released_iwsa_forward(self: InteractiveWindowAttention, x: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """IWSA as released: window partition of x before qkv, explicit attention matrix, v back through transposes."""
    H, W = size
    B, N, C = x.shape
    ws = self.ws
    h_group, w_group = H // ws, W // ws
    total_groups = h_group * w_group
    x = x.reshape(B, h_group, ws, w_group, ws, C).transpose(2, 3)
    qkv = self.qkv(x).reshape(B, total_groups, -1, 3, self.num_heads, C // self.num_heads).permute(3, 0, 1, 4, 2, 5)
    q, k, v = qkv[0], qkv[1], qkv[2]
    attn = (q @ k.transpose(-2, -1)) * self.scale
    attn = attn.softmax(dim=-1)
    attn = self.attn_drop(attn)
    attn = (attn @ v).transpose(2, 3).reshape(B, h_group, w_group, ws, ws, C)
    x = attn.transpose(2, 3).reshape(B, N, C)
    v = v.transpose(2, 3).reshape(B, h_group, w_group, ws, ws, C).transpose(2, 3).reshape(B, H, W, C)
    v = v.permute(0, 3, 1, 2)
    x = x + self.lim_func(v).reshape(B, C, N).permute(0, 2, 1)
    x = self.proj(x)
    x = self.proj_drop(x)
    return x


def released_to_nchw(x: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """Between stages, as released: tokens to a contiguous NCHW map."""
    B = x.shape[0]
    H, W = size
    return x.reshape(B, H, W, -1).permute(0, 3, 1, 2).contiguous()


def make_reference(model: ScalableViT) -> ScalableViT:
    """A copy of ``model`` (same parameter values) that computes as the released code does.

    Only supports what the released code supports: H and W multiples of the window size and of the SSA ratios.
    """
    ref = copy.deepcopy(model)
    for m in ref.modules():
        if isinstance(m, ScalableSelfAttention):
            m.forward = types.MethodType(released_ssa_forward, m)
        elif isinstance(m, InteractiveWindowAttention):
            m.forward = types.MethodType(released_iwsa_forward, m)
    for m in ref.stage_ends:  # the map between stages, as released (a contiguous copy)
        m.forward = released_to_nchw
    return ref


def max_rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12)).item()


# --------------------------------------------------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------------------------------------------------

def sync(device: torch.device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


class Row:
    """One row of the table: a model in one form, mode, dtype, compile setting and batch, with its runner."""

    def __init__(self, name: str, impl: str, mode: str, dtype: str, compiled: bool, model: torch.nn.Module,
                 device: torch.device, batch: int, img_size: int, flops_per_img: Optional[float] = None,
                 linear_flops_per_img: Optional[float] = None, linear_kernel: str = 'auto'):
        self.name, self.impl, self.mode, self.dtype, self.compiled = name, impl, mode, dtype, compiled
        self.device, self.batch = device, batch
        self.flops_per_img = flops_per_img  # multiply-adds x 2 of one forward pass, or None when unknown
        self.linear_flops_per_img = linear_flops_per_img  # of those, the Linear layers' matrix products
        self.breakdown: Optional[Dict[str, float]] = None  # seconds per step by op category (--breakdown)
        self.limit: Optional[float] = None  # the GEMM limit of this row's dtype, FLOP/s, set by main()
        self.stat = 'median'
        self.times: List[float] = []
        self.peak_mem_mb: Optional[float] = None
        self.model = model.to(device)
        self.model.train(mode == 'train')
        self.max_rel_err: Optional[float] = None  # engine rows: their output on self.x against eager's
        self.x = torch.randn(batch, 3, img_size, img_size, device=device)
        if impl in ENGINES:
            assert mode == 'infer' and device.type == 'cpu', 'engine rows are CPU inference rows'
            self.compiled = True
            runner = engine_runner(impl, self.model, dtype, img_size)
            x_np = self.x.numpy()
            self.fn = lambda x: runner(x_np)
            self.runner = runner
            with torch.no_grad():
                want = self.model.eval()(self.x).float().numpy()
            self.max_rel_err = float(np.abs(runner(x_np)[0] - want).max() / np.abs(want).max())
            if dtype == 'fp32' and not self.max_rel_err <= 1e-4:
                raise AssertionError(f'{impl} fp32 output differs from eager: max relative error '
                                     f'{self.max_rel_err:.2e}')
        elif impl == 'optimized':
            assert mode == 'infer', 'optimize_for_inference is for inference rows'
            self.compiled = True
            # its own autocast (the form a user calls), inside the Row's: compiled under an outer autocast alone,
            # the bf16 graph ran at 16 img/s against 40 (ScalableViT-S, batch 8, 2 threads, AMX)
            self.fn = optimize_for_inference(self.model, dtype=DTYPES[dtype], check=False,
                                             linear_kernel=linear_kernel)
        else:
            # static shapes: each row compiles once for its one shape (a dynamic-shape recompile is much slower)
            self.fn = torch.compile(self.model, dynamic=False) if compiled else self.model
        self.y = torch.randint(0, max(1, getattr(model, 'num_classes', 1000)), (batch,), device=device)
        amp_dtype = DTYPES[dtype]
        self.autocast = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype else nullcontext
        self.fused_adamw = mode == 'train' and impl != 'reference'
        self.opt = (torch.optim.AdamW(self.model.parameters(), lr=1e-6, **({'fused': True} if self.fused_adamw else {}))
                    if mode == 'train' else None)

    def step(self):
        if self.mode == 'infer':
            with torch.inference_mode(), self.autocast():
                self.fn(self.x)
        else:
            with self.autocast():
                loss = F.cross_entropy(self.fn(self.x), self.y)
            loss.backward()
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)

    def timed(self, iters: int):
        sync(self.device)
        t0 = time.perf_counter()
        for _ in range(iters):
            self.step()
        sync(self.device)
        self.times.append((time.perf_counter() - t0) / iters)

    def measure_memory(self):
        """Peak memory of one step above what was allocated before it (CUDA: allocator stats; CPU: profiler)."""
        if self.device.type == 'cuda':
            sync(self.device)
            before = torch.cuda.memory_allocated(self.device)  # every row's weights and optimizer state
            torch.cuda.reset_peak_memory_stats(self.device)
            self.step()
            sync(self.device)
            self.peak_mem_mb = (torch.cuda.max_memory_allocated(self.device) - before) / 2 ** 20
        elif self.impl not in ENGINES:  # an engine's allocations are not torch's: the profiler does not see them
            self.peak_mem_mb = cpu_peak_bytes(self.step) / 2 ** 20

    def measure_breakdown(self, iters: int):
        """Seconds per step in each op category (:func:`op_category`), from the profiler's self times: device
        time of the kernels on CUDA, CPU time of the ops on CPU (Inductor's fused kernels count as ``other``);
        for engine rows, the engine's own per-node times (:func:`engine_breakdown`)."""
        if self.impl in ENGINES:
            self.breakdown = engine_breakdown(self.impl, self.runner, self.x.numpy(), iters)
            return
        cuda = self.device.type == 'cuda'
        acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
        sync(self.device)
        with torch.profiler.profile(activities=acts) as prof:
            for _ in range(iters):
                self.step()
            sync(self.device)
        totals = dict.fromkeys(OP_CATEGORIES, 0.)
        for ev in prof.key_averages():
            us = ev.self_device_time_total if cuda else ev.self_cpu_time_total
            totals[op_category(ev.key)] += us / 1e6 / iters
        self.breakdown = totals

    @property
    def step_s(self) -> float:
        """Seconds per step: the median of the repeats, or the best one (``stat='min'``, for a loaded machine)."""
        return min(self.times) if self.stat == 'min' else statistics.median(self.times)

    @property
    def img_per_s(self) -> float:
        return self.batch / self.step_s

    def _rate(self, flops_per_img: Optional[float], seconds: Optional[float]) -> Optional[float]:
        """FLOP/s of a step's batch doing ``flops_per_img`` (one forward pass; x3 for a training step: forward + two
        backward products) in ``seconds``; None when either is unknown."""
        if not flops_per_img or not seconds:
            return None
        return self.batch * flops_per_img * (3 if self.mode == 'train' else 1) / seconds

    @property
    def flop_rate(self) -> Optional[float]:
        """Achieved FLOP/s of the model: img/s x FLOPs per image."""
        return self._rate(self.flops_per_img, self.step_s)

    @property
    def linear_flop_rate(self) -> Optional[float]:
        """FLOP/s of the Linear layers' matrix products alone: their FLOPs over the time the breakdown gives them."""
        return self._rate(self.linear_flops_per_img, self.breakdown['linear'] if self.breakdown else None)

    @property
    def frac_of_limit(self) -> Optional[float]:
        rate = self.flop_rate
        return rate / self.limit if rate and self.limit else None

    def record(self) -> Dict:
        rate, frac, linear_rate = self.flop_rate, self.frac_of_limit, self.linear_flop_rate
        return dict(
            model=self.name, impl=self.impl, device=self.device.type, dtype=self.dtype, batch=self.batch,
            mode=self.mode, compiled=self.compiled, img_per_s=round(self.img_per_s, 3),
            optimizer=None if self.opt is None else ('AdamW fused' if self.fused_adamw else 'AdamW'),
            ms_per_step=round(1e3 * self.step_s, 3), stat=self.stat,
            peak_mem_mb=None if self.peak_mem_mb is None else round(self.peak_mem_mb, 1),
            gflops_per_img=None if not self.flops_per_img else round(self.flops_per_img / 1e9, 4),
            gflop_per_s=None if rate is None else round(rate / 1e9, 2),
            limit_gflop_per_s=None if not self.limit else round(self.limit / 1e9, 2),
            frac_of_limit=None if frac is None else round(frac, 4),
            median_s=statistics.median(self.times), min_s=min(self.times), times_s=self.times,
            breakdown_s=self.breakdown, max_rel_err_vs_eager=self.max_rel_err,
            linear_gflop_per_s=None if linear_rate is None else round(linear_rate / 1e9, 2),
            linear_kernels=getattr(self.fn, 'linear_kernels', None) or None,  # optimized: Linear layers per GEMM
        )


# Op categories of the --breakdown table, by the profiler's event names (aten ops, MKL / oneDNN ops Inductor calls,
# CUDA kernels); whatever matches none is 'other': layer norms, GELU, softmax, adds, copies, Inductor's fused kernels.
OP_CATEGORIES = ('linear', 'attention', 'conv', 'other')
_CATEGORY_PATTERNS = (
    ('attention', ('aten::bmm', 'aten::baddbmm', 'scaled_dot_product', 'flash', 'fmha', 'efficient_attention')),
    ('conv', ('convolution', 'conv2d', 'conv_depthwise', 'fprop', 'dgrad', 'wgrad')),
    ('linear', ('aten::addmm', 'aten::mm', 'aten::_addmm_activation', '_mkl_linear', '_linear_pointwise', 'gemm',
                'cublas', 'cutlass')),
)


def op_category(name: str) -> str:
    """The --breakdown category of a profiler event name (first match of ``_CATEGORY_PATTERNS``, else 'other')."""
    low = name.lower()
    for category, patterns in _CATEGORY_PATTERNS:
        if any(p in low for p in patterns):
            return category
    return 'other'


def format_breakdown(rows: List['Row']) -> str:
    """Where a step's time goes, per row: the op categories' shares and the Linear products' own FLOP rate."""
    cols = ['model', 'impl', 'dtype', 'batch', 'ms/step (profiled)', *[f'{c} %' for c in OP_CATEGORIES],
            'linear GFLOP/s', 'linear of limit']
    lines = []
    for r in rows:
        if r.breakdown is None:
            continue
        total = sum(r.breakdown.values())
        rate = r.linear_flop_rate
        lines.append([r.name, r.impl, r.dtype, str(r.batch), f'{1e3 * total:.1f}',
                      *[f'{100 * r.breakdown[c] / total:.0f}' for c in OP_CATEGORIES],
                      '-' if rate is None else f'{rate / 1e9:.1f}',
                      '-' if rate is None or not r.limit else f'{100 * rate / r.limit:.0f}%'])
    if not lines:
        return ''
    return _markdown(cols, lines)


def gemm_limit(dtype: str, device: torch.device, sizes: Optional[Tuple[int, ...]] = None,
               repeats: int = 3) -> float:
    """The machine's matrix-multiply limit in FLOP/s: the best rate of ``torch.mm`` on square matrices.

    Same thread count as the rows (``torch.get_num_threads()``); 2 n^3 FLOPs per product. ``dtype`` is the row's:
    fp32 multiplies float32 (TF32 as torch's current setting says on CUDA), bf16 / fp16 multiply in that type.
    """
    if sizes is None:
        sizes = (4096, 8192) if device.type == 'cuda' else (1024, 2048)
    tdtype = DTYPES[dtype] or torch.float32
    best = 0.
    for n in sizes:
        a = torch.randn(n, n, device=device).to(tdtype)
        b = torch.randn(n, n, device=device).to(tdtype)
        torch.mm(a, b)  # warm-up: threads, oneDNN / cuBLAS handles
        for _ in range(repeats):
            sync(device)
            t0 = time.perf_counter()
            torch.mm(a, b)
            sync(device)
            best = max(best, 2 * n ** 3 / (time.perf_counter() - t0))
    return best


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 matrix products run natively (CUDA compute >= 8.0; CPU AVX512-BF16 or AMX), not emulated."""
    if device.type == 'cuda':
        return torch.cuda.is_bf16_supported()
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def cpu_peak_bytes(step: Callable[[], None]) -> int:
    """Peak of the running sum of CPU allocations made during ``step`` (the profiler's allocation events)."""
    from torch._C._profiler import _EventType
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    allocs = []

    def walk(node):
        if node.tag == _EventType.Allocation and str(node.extra_fields.device) == 'cpu':
            allocs.append((node.start_time_ns, node.extra_fields.alloc_size))
        for child in node.children:
            walk(child)

    for root in prof.profiler.kineto_results.experimental_event_tree():
        walk(root)
    cur = peak = 0
    for _, size in sorted(allocs):
        cur += size
        peak = max(peak, cur)
    return peak


_EXPORTS: Dict[Tuple, str] = {}  # (model id, format, int8, img_size) -> exported file, one export per row model
_EXPORT_DIR: List[str] = []


def engine_runner(impl: str, model: torch.nn.Module, dtype: str, img_size: int):
    """An engine running ``model`` exported by ``scalablevit.serving`` (checked against eager when exported): ONNX
    for ONNX Runtime, OpenVINO IR (converted from torch) for OpenVINO; ``int8``: NNCF-quantized IR, calibrated on
    random inputs (a speed row: the accuracy it keeps is measured by ``tools/export.py --int8 --val``)."""
    import tempfile

    from scalablevit.serving import ExportedModel, export_model, fixed_inputs, serving_meta
    fmt = 'onnx' if impl == 'onnxruntime' else 'openvino'
    key = (id(model), fmt, dtype == 'int8', img_size)
    if key not in _EXPORTS:
        if not _EXPORT_DIR:
            _EXPORT_DIR.append(tempfile.mkdtemp(prefix='throughput-export-'))
            atexit.register(shutil.rmtree, _EXPORT_DIR[0], True)  # S's files are ~250 MB per export
        path = os.path.join(_EXPORT_DIR[0], f'{len(_EXPORTS)}.{"onnx" if fmt == "onnx" else "xml"}')
        n = getattr(model, 'num_classes', 0) or 1
        meta = serving_meta(model, [str(i) for i in range(n)], dict(input_size=(3, img_size, img_size)))
        calibration = fixed_inputs((3, img_size, img_size), batches=(1,) * 32, seed=2) if dtype == 'int8' else None
        _logger.info('exporting %s for %s%s', type(model).__name__, impl, ' (int8, NNCF)' if calibration else '')
        export_model(model, path, fmt, meta, (3, img_size, img_size), threads=torch.get_num_threads(),
                     int8_calibration=calibration)
        _EXPORTS[key] = path
    return ExportedModel(_EXPORTS[key], impl, threads=torch.get_num_threads(),
                         precision='bf16' if dtype == 'bf16' else 'fp32')


def engine_breakdown(impl: str, runner, x, iters: int) -> Dict[str, float]:
    """Seconds per step by op category from the engine's own profile: ONNX Runtime's node events (a MatMul / Gemm
    with one activation input multiplies by weights: linear; with two: attention), OpenVINO's per-node counters
    (FullyConnected: linear, MatMul: attention, (Group)Convolution: conv). Fused nodes count as ``other``."""
    from scalablevit.serving import ExportedModel
    totals = dict.fromkeys(OP_CATEGORIES, 0.)
    if impl == 'onnxruntime':
        import onnxruntime as ort
        opts = ort.SessionOptions()
        opts.enable_profiling = True
        opts.intra_op_num_threads = torch.get_num_threads()
        opts.inter_op_num_threads = 1
        opts.profile_file_prefix = os.path.join(_EXPORT_DIR[0], 'ort_profile')
        session = ort.InferenceSession(runner.path, opts, providers=['CPUExecutionProvider'])
        for _ in range(iters + 1):  # the first run warms up and is left out
            session.run(None, {'images': x})
        profile = session.end_profiling()
        with open(profile) as f:
            events = json.load(f)
        os.remove(profile)
        runs = sorted(e['ts'] for e in events if e.get('name') == 'model_run')
        after = runs[1] if len(runs) > 1 else 0
        for e in events:
            if e.get('cat') != 'Node' or not e['name'].endswith('_kernel_time') or e['ts'] < after:
                continue
            op, inputs = e['args'].get('op_name', ''), e['args'].get('input_type_shape', [])
            if op in ('MatMul', 'FusedMatMul', 'Gemm', 'MatMulNBits', 'QLinearMatMul', 'MatMulInteger'):
                cat = 'linear' if len(inputs) == 1 else 'attention'
            elif op in ('Conv', 'FusedConv', 'NhwcFusedConv', 'QLinearConv'):
                cat = 'conv'
            else:
                cat = 'other'
            totals[cat] += e['dur'] / 1e6 / iters
        return totals
    profiled = ExportedModel(runner.path, 'openvino', threads=torch.get_num_threads(), precision=runner.precision,
                             profile=True)
    profiled(x)
    for _ in range(iters):
        profiled(x)
        for p in profiled.profiling_info():
            node = p.node_type
            cat = ('linear' if node == 'FullyConnected' else 'attention' if node == 'MatMul' else
                   'conv' if node in ('Convolution', 'GroupConvolution') else 'other')
            totals[cat] += p.real_time.total_seconds() / iters
    return totals


def build_models(name: str, impls: List[str], img_size: int,
                 model_args: Optional[Dict] = None) -> List[Tuple[str, torch.nn.Module]]:
    """(impl, model) pairs for ``name``: ours as fast, optimized and reference (checked equal), a peer as timm."""
    torch.manual_seed(0)
    ours = name in timm.list_models('scalable_vit*')
    model = timm.create_model(name, pretrained=False, **((model_args or {}) if ours else {}))
    if not isinstance(model, ScalableViT):
        return [('timm', model)] if 'timm' in impls else []
    out = []
    if 'fast' in impls:
        out.append(('fast', model))
    if 'optimized' in impls:
        out.append(('optimized', copy.deepcopy(model)))  # optimize_for_inference turns off its gradients
    if 'checkpointed' in impls:
        ckpt = copy.deepcopy(model)
        ckpt.set_grad_checkpointing(True)
        out.append(('checkpointed', ckpt))
    for engine in ENGINES:
        if engine in impls:
            out.append((engine, copy.deepcopy(model)))  # the export puts its copy on the plain attention
    if 'reference' in impls:
        ref = make_reference(model)
        check_reference(model, ref, img_size)
        out.append(('reference', ref))
    return out


@torch.no_grad()
def check_reference(model: ScalableViT, ref: ScalableViT, img_size: int, batch: int = 2) -> float:
    """Assert that the fast model and the released computation give the same logits (fp32, eval)."""
    modes = model.training, ref.training
    model.eval(), ref.eval()
    x = torch.randn(batch, 3, img_size, img_size, generator=torch.Generator().manual_seed(1))
    err = max_rel_err(model(x), ref(x))
    model.train(modes[0]), ref.train(modes[1])
    if err > 1e-4:
        raise AssertionError(f'fast and reference paths differ: max relative error {err:.2e}')
    return err


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser('ScalableViT throughput benchmark', add_help=False)
    parser.add_argument('--models', nargs='+', default=None,
                        help='model names, or "all" (default: scalable_vit_small and its peers on CPU, all on CUDA)')
    parser.add_argument('--impl', nargs='+', default=['fast', 'reference', 'timm'],
                        choices=['fast', 'optimized', 'checkpointed', 'reference', 'timm', *ENGINES],
                        help='forms to measure (optimized: optimize_for_inference, inference rows only; '
                             'checkpointed: gradient checkpointing, training rows only; onnxruntime, openvino: '
                             'the model exported and run by that engine, CPU inference rows only)')
    parser.add_argument('--linear-kernel', default='auto', choices=LINEAR_KERNELS,
                        help="optimized rows: optimize_for_inference's fp32 CPU Linear GEMM (auto: the faster of "
                             "MKL and oneDNN per layer, timed at the first call; mkl: Inductor's own choice)")
    parser.add_argument('--device', default='auto', help='cpu, cuda, cuda:N or auto')
    parser.add_argument('--batch', type=int, nargs='+', default=None,
                        help='batch sizes (default: 8 on CPU, 64 on CUDA); batch 1 rows give the latency')
    parser.add_argument('--img-size', type=int, default=224)
    parser.add_argument('--dtype', nargs='+', default=None, choices=list(DTYPES),
                        help='fp32, or bf16/fp16 autocast (default: fp32 on CPU, fp16 on CUDA); int8: OpenVINO rows '
                             'only (NNCF-quantized)')
    parser.add_argument('--mode', nargs='+', default=['infer'], choices=['infer', 'train'])
    parser.add_argument('--compile', nargs='?', const='yes', default='no', choices=['no', 'yes', 'both'],
                        help='torch.compile rows: no (eager), yes (compiled), both; "--compile" alone is yes')
    parser.add_argument('--warmup', type=int, default=None, help='warm-up steps per row (default: 1 CPU, 10 CUDA)')
    parser.add_argument('--repeats', type=int, default=None, help='interleaved repeats (default: 3 CPU, 10 CUDA)')
    parser.add_argument('--iters', type=int, default=None, help='steps per repeat (default: 1 CPU, 10 CUDA)')
    parser.add_argument('--model-args', type=json.loads, default=None,
                        help='JSON dict of ScalableViT constructor overrides, e.g. \'{"depths": [1, 1, 3, 1]}\'')
    parser.add_argument('--threads', type=int, default=None, help='torch CPU threads (default: torch default)')
    parser.add_argument('--no-mem', action='store_true', help='skip the peak memory measurement')
    parser.add_argument('--no-limit', action='store_true', help='skip the GEMM limit and FLOP counts')
    parser.add_argument('--stat', default='median', choices=['median', 'min'],
                        help='per-row statistic of the repeats: median, or min (the least disturbed step, for a '
                             'machine shared with other jobs)')
    parser.add_argument('--breakdown', action='store_true',
                        help='after timing, profile each row and print where its time goes: Linear products, '
                             'attention products, convolutions, other (norms, activations, softmax, copies)')
    parser.add_argument('--json', default=None, help='also write the rows as a JSON list of records to this path')
    return parser


def resolve_defaults(args: argparse.Namespace) -> argparse.Namespace:
    if args.device == 'auto':
        args.device = 'cuda' if torch.cuda.is_available() else 'cpu'
    cuda = args.device.startswith('cuda')
    if args.models is None:
        args.models = ALL_MODELS if cuda else ['scalable_vit_small'] + PEERS['scalable_vit_small']
    elif args.models == ['all']:
        args.models = ALL_MODELS
    args.batch = args.batch or [64 if cuda else 8]
    args.dtype = args.dtype or (['fp16'] if cuda else ['fp32'])
    args.warmup = args.warmup if args.warmup is not None else (10 if cuda else 1)
    args.repeats = args.repeats or (10 if cuda else 3)
    args.iters = args.iters or (10 if cuda else 1)
    return args


def _reference_for(rows: List[Row]) -> Callable[[Row], Optional[Row]]:
    """The reference row a row is compared with: same model, mode, dtype and batch; eager if there is one."""
    refs: Dict[Tuple, Row] = {}
    for r in rows:
        if r.impl == 'reference':
            key = (r.name, r.mode, r.dtype, r.batch)
            if key not in refs or not r.compiled:  # the released computation as it ships: eager
                refs[key] = r
    return lambda r: refs.get((r.name, r.mode, r.dtype, r.batch))


def format_table(rows: List[Row], header: str) -> str:
    ref_of = _reference_for(rows)
    cols = ['model', 'impl', 'mode', 'dtype', 'compiled', 'batch', 'img/s', 'ms/step', 'vs ref', 'GFLOP/s',
            'of limit', 'peak MB', 'mem vs ref', 'spread', 'err vs eager']
    lines = []
    for r in rows:
        ref = ref_of(r)
        spread = (max(r.times) - min(r.times)) / statistics.median(r.times)
        rate, frac = r.flop_rate, r.frac_of_limit
        lines.append([r.name, r.impl, r.mode, r.dtype, _compiled_cell(r), str(r.batch), f'{r.img_per_s:.2f}',
                      f'{1e3 * r.step_s:.1f}',
                      f'{r.img_per_s / ref.img_per_s:.2f}x' if ref and r is not ref else '',
                      '' if rate is None else f'{rate / 1e9:.1f}', '' if frac is None else f'{100 * frac:.0f}%',
                      '-' if r.peak_mem_mb is None else f'{r.peak_mem_mb:.0f}',
                      f'{r.peak_mem_mb / ref.peak_mem_mb:.2f}x' if ref and r is not ref and r.peak_mem_mb and
                      ref.peak_mem_mb else '', f'{100 * spread:.0f}%',
                      '' if r.max_rel_err is None else f'{r.max_rel_err:.1e}'])
    return header + '\n\n' + _markdown(cols, lines)


def _compiled_cell(row: Row) -> str:
    """'no' / 'yes'; optimized rows: 'freeze', and how many Linear layers run on oneDNN's GEMM if any."""
    if row.impl != 'optimized':
        return 'yes' if row.compiled else 'no'
    kernels = getattr(row.fn, 'linear_kernels', None) or {}
    return f"freeze, oneDNN {kernels['onednn']}/{sum(kernels.values())}" if kernels.get('onednn') else 'freeze'


def _markdown(cols: List[str], lines: List[List[str]]) -> str:
    """A Markdown table with padded columns."""
    widths = [max(len(c), *(len(line[i]) for line in lines)) for i, c in enumerate(cols)]

    def fmt(cells: List[str]) -> str:
        return '| ' + ' | '.join(c.ljust(w) for c, w in zip(cells, widths)) + ' |'

    return '\n'.join([fmt(cols), '|' + '|'.join('-' * (w + 2) for w in widths) + '|'] + [fmt(line) for line in lines])


def summarize(rows: List[Row]) -> List[Dict]:
    """Per model, mode, dtype and batch with a reference row: ``fast`` = the best of our forms (eager, compiled,
    optimized), what a user would pick, against the reference (eager)."""
    ref_of = _reference_for(rows)
    groups: Dict[Tuple, List[Row]] = {}
    for r in rows:
        if r.impl in OURS and ref_of(r) is not None:
            groups.setdefault((r.name, r.mode, r.dtype, r.batch), []).append(r)
    out = []
    for (name, mode, dtype, batch), cands in groups.items():
        best, ref = max(cands, key=lambda r: r.img_per_s), ref_of(cands[0])
        out.append(dict(
            model=name, mode=mode, dtype=dtype, batch=batch, best=best.impl + (' compiled' if best.compiled and
                                                                              best.impl != 'optimized' else ''),
            fast_img_per_s=round(best.img_per_s, 3), reference_img_per_s=round(ref.img_per_s, 3),
            vs_ref=round(best.img_per_s / ref.img_per_s, 3), fast_ms=round(1e3 * best.step_s, 2),
            frac_of_limit=None if best.frac_of_limit is None else round(best.frac_of_limit, 4),
            mem_vs_ref=(round(best.peak_mem_mb / ref.peak_mem_mb, 3) if best.peak_mem_mb and ref.peak_mem_mb
                        else None)))
    return out


def serving_summary(rows: List[Row]) -> List[Dict]:
    """Per model and batch with engine rows: the best of our forms in fp32 and bf16 against the best engine row of
    the same dtype, and the int8 row against the best fp32 row of any kind."""
    out = []
    for name, batch in sorted({(r.name, r.batch) for r in rows if r.impl in ENGINES}):
        same = [r for r in rows if r.name == name and r.batch == batch and r.mode == 'infer']
        for dtype in ('fp32', 'bf16'):
            ours = [r for r in same if r.impl in OURS and r.dtype == dtype]
            engines = [r for r in same if r.impl in ENGINES and r.dtype == dtype]
            if ours and engines:
                a, b = max(ours, key=lambda r: r.img_per_s), max(engines, key=lambda r: r.img_per_s)
                out.append(dict(model=name, batch=batch, dtype=dtype, ours=a.impl, ours_img_per_s=round(a.img_per_s, 3),
                                engine=b.impl, engine_img_per_s=round(b.img_per_s, 3),
                                ours_vs_engine=round(a.img_per_s / b.img_per_s, 3)))
        fp32 = [r for r in same if r.dtype == 'fp32' and r.impl != 'reference']
        for r in [r for r in same if r.dtype == 'int8']:
            if fp32:
                best = max(fp32, key=lambda r: r.img_per_s)
                out.append(dict(model=name, batch=batch, dtype='int8', engine=r.impl, engine_img_per_s=round(
                    r.img_per_s, 3), fp32_best=best.impl, fp32_best_img_per_s=round(best.img_per_s, 3),
                    int8_vs_fp32_best=round(r.img_per_s / best.img_per_s, 3)))
    return out


def format_serving(serving: List[Dict]) -> str:
    lines = []
    for s in serving:
        if s['dtype'] == 'int8':
            lines.append(f'{s["model"]} batch {s["batch"]} int8: {s["engine"]} {s["engine_img_per_s"]:.2f} img/s = '
                         f'{s["int8_vs_fp32_best"]:.2f}x the best fp32 row ({s["fp32_best"]}, '
                         f'{s["fp32_best_img_per_s"]:.2f} img/s)')
        else:
            lines.append(f'{s["model"]} batch {s["batch"]} {s["dtype"]}: ours (best: {s["ours"]}) '
                         f'{s["ours_img_per_s"]:.2f} img/s vs best engine ({s["engine"]}) {s["engine_img_per_s"]:.2f} '
                         f'img/s = {s["ours_vs_engine"]:.2f}x')
    return '\n'.join(lines)


def format_summary(summary: List[Dict], limits: Dict[str, float]) -> str:
    lines = []
    if limits:
        lines.append('GEMM limit (best torch.mm, same threads): ' + ', '.join(
            f'{k} {v / 1e9:.1f} GFLOP/s' for k, v in limits.items()))
    for s in summary:
        frac = '' if s['frac_of_limit'] is None else f', {100 * s["frac_of_limit"]:.0f}% of the {s["dtype"]} limit'
        lines.append(f'{s["model"]} {s["mode"]} {s["dtype"]} batch {s["batch"]}: fast (best: {s["best"]}) '
                     f'{s["fast_img_per_s"]:.2f} img/s ({s["fast_ms"]:.1f} ms/step) vs reference '
                     f'{s["reference_img_per_s"]:.2f} img/s = {s["vs_ref"]:.2f}x{frac}'
                     + ('' if s.get('mem_vs_ref') is None else f', peak memory {s["mem_vs_ref"]:.2f}x'))
    return '\n'.join(lines)


def build_rows(args: argparse.Namespace, device: torch.device, compiled_opts: List[bool]) -> List[Row]:
    """One row per model x implementation x mode x dtype x compiled x batch that the implementation can run."""
    rows: List[Row] = []
    for name in args.models:
        macs = None
        for impl, model in build_models(name, args.impl, args.img_size, args.model_args):
            if macs is None and not args.no_limit:
                macs = count_macs_by_op(model, args.img_size)
            # FLOPs = 2 x multiply-adds; the Linear layers' are what neither attention (bmm) nor convolution takes
            flops, linear_flops = ((2. * sum(macs.values()),
                                    2. * sum(v for k, v in macs.items() if k not in ('aten.bmm', 'aten.convolution')))
                                   if macs else (None, None))
            combos = [(mode, dtype, compiled, batch) for mode in args.mode for dtype in args.dtype
                      for compiled in compiled_opts for batch in args.batch]
            if impl == 'optimized':  # one inference row per dtype and batch: optimize_for_inference compiles
                combos = [c for c in combos if c[0] == 'infer' and c[2] == compiled_opts[0]]
            if impl == 'checkpointed':  # checkpointing only matters with a backward pass
                combos = [c for c in combos if c[0] == 'train']
            if impl in ENGINES:  # CPU inference of an exported file, in the dtypes the engine runs
                combos = [c for c in combos if c[0] == 'infer' and c[2] == compiled_opts[0] and
                          c[1] in ENGINE_DTYPES[impl] and device.type == 'cpu']
            else:  # int8 is an engine's quantized model
                combos = [c for c in combos if c[1] != 'int8']
            for mode, dtype, compiled, batch in combos:
                # each row owns its weights: training steps must not change another row's model
                m = copy.deepcopy(model) if len(combos) > 1 else model
                rows.append(Row(name, impl, mode, dtype, compiled, m, device, batch, args.img_size, flops,
                                linear_flops, args.linear_kernel))
    return rows


def measure(rows: List[Row], args: argparse.Namespace, device: torch.device) -> Dict[str, float]:
    """Warm up, then time the rows interleaved (``args.repeats`` rounds); memory and profile if asked. Returns the
    GEMM limit of each dtype (FLOP/s, the best over the run)."""
    limits: Dict[str, float] = {}
    if not args.no_limit:
        for dtype in [d for d in args.dtype if d != 'int8']:
            _logger.info('GEMM limit %s', dtype)
            limits[dtype] = gemm_limit(dtype, device)

    for r in rows:
        _logger.info('warm-up %s %s %s %s compiled=%s batch %d', r.name, r.impl, r.mode, r.dtype, r.compiled,
                     r.batch)
        for _ in range(args.warmup):
            r.step()
    for i in range(args.repeats):
        _logger.info('repeat %d/%d', i + 1, args.repeats)
        for r in rows:
            r.timed(args.iters)
        for dtype in limits:  # the limit is measured between the rows too: the best over the run
            limits[dtype] = max(limits[dtype], gemm_limit(dtype, device, repeats=1))
    for r in rows:
        r.limit = limits.get(r.dtype)
        r.stat = args.stat
    if not args.no_mem:
        for r in rows:
            r.measure_memory()
    if args.breakdown:
        for r in rows:
            r.measure_breakdown(args.iters)

    return limits


def report(rows: List[Row], limits: Dict[str, float], args: argparse.Namespace, device: torch.device) -> List[Dict]:
    """Print the table and the summaries; write ``args.json``; returns the records."""
    dev_name = torch.cuda.get_device_name(device) if device.type == 'cuda' else (platform.processor() or 'cpu')
    if device.type == 'cpu':
        dev_name += f', {torch.backends.cpu.get_cpu_capability()}'
    header = (f'device {device.type} ({dev_name}), torch {torch.__version__}, timm {timm.__version__}, '
              f'threads {torch.get_num_threads()}, {args.img_size}px, warm-up {args.warmup}, '
              f'{args.stat} of {args.repeats} repeats x {args.iters} steps, bf16 native: '
              f'{"yes" if native_bf16(device) else "no (emulated)"}')
    if device.type == 'cpu' and hasattr(os, 'getloadavg'):
        header += ', load average {:.2f} {:.2f} {:.2f}'.format(*os.getloadavg())
    print(format_table(rows, header))
    summary = summarize(rows)
    text = format_summary(summary, limits)
    if text:
        print('\n' + text)
    serving = serving_summary(rows)
    if serving:
        print('\nServing (our best form vs the best engine, same inputs and threads):\n' + format_serving(serving))
    text = format_breakdown(rows)
    if text:
        print('\nWhere the time goes (profiled; shares of the step, and the Linear products\' own rate):\n' + text)

    records = [r.record() for r in rows]
    for rec in records:
        rec.update(torch=torch.__version__, threads=torch.get_num_threads(), img_size=args.img_size)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(records, indent=1))
        if summary or limits or serving:
            Path(args.json).with_suffix('.summary.json').write_text(json.dumps(dict(
                limits_gflop_per_s={k: round(v / 1e9, 2) for k, v in limits.items()}, summary=summary,
                serving=serving, header=header), indent=1))
    return records


def main(args: argparse.Namespace) -> List[Dict]:
    args = resolve_defaults(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    compiled_opts = {'no': [False], 'yes': [True], 'both': [False, True]}[args.compile]
    rows = build_rows(args, device, compiled_opts)
    if not rows:
        raise SystemExit('no rows selected (--impl optimized measures inference only: add --mode infer)')
    limits = measure(rows, args, device)
    return report(rows, limits, args, device)


if __name__ == '__main__':
    logging.basicConfig(level=logging.INFO, format='%(asctime)s %(message)s', stream=sys.stderr)
    parser = argparse.ArgumentParser('ScalableViT throughput benchmark', parents=[get_args_parser()])
    main(parser.parse_args())
