"""benchmarks/: throughput.py (CLI, JSON records, the GEMM limit and FLOP fractions, its reference path being the
fast path's function), device_check.sh in its CPU dry-run mode, and scalablevit.inference.optimize_for_inference."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from scalablevit import ScalableViT
from scalablevit.inference import optimize_for_inference
from scalablevit.info import count_macs, count_macs_by_op

# One stage of IWSA + SSA (c_ratio > 1, padded values), plain head: few kernels, so it compiles fast.
MICRO_ARGS = dict(embed_dims=(32,), num_heads=(2,), depths=(2,), mlp_ratios=(2,), wss=(7,), sr_ratios=(4,),
                  c_ratios=(1.25,), mlp_head=False)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope='module')
def throughput(load_script):
    return load_script('benchmarks/throughput.py')


def test_cli_writes_records(tmp_path, tiny_args):
    out = tmp_path / 'rows.json'
    cmd = [sys.executable, str(REPO / 'benchmarks' / 'throughput.py'), '--device', 'cpu', '--models',
           'scalable_vit_small', '--model-args', json.dumps(tiny_args), '--batch', '1', '--warmup', '0',
           '--repeats', '1', '--no-mem', '--breakdown', '--json', str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'threads' in proc.stdout and 'scalable_vit_small' in proc.stdout
    assert 'GEMM limit (best torch.mm, same threads): fp32' in proc.stdout and 'of limit' in proc.stdout
    records = json.loads(out.read_text())
    assert {r['impl'] for r in records} == {'fast', 'reference'}
    model = ScalableViT(**tiny_args)
    flops = 2 * count_macs(model, 224).total / 1e9
    for r in records:
        assert r['model'] == 'scalable_vit_small' and r['device'] == 'cpu' and r['dtype'] == 'fp32'
        assert r['batch'] == 1 and r['mode'] == 'infer' and r['compiled'] is False
        assert r['img_per_s'] > 0 and 'peak_mem_mb' in r  # measured in test_train_row_and_memory
        assert r['gflops_per_img'] == pytest.approx(flops, rel=1e-3)
        # JSON values are rounded (GFLOP/s to 0.01, fractions to 1e-4)
        assert r['gflop_per_s'] == pytest.approx(r['img_per_s'] * flops, rel=1e-2, abs=0.006)
        assert r['frac_of_limit'] == pytest.approx(r['img_per_s'] * flops / r['limit_gflop_per_s'], rel=1e-2, abs=2e-4)
    summary = json.loads(out.with_suffix('.summary.json').read_text())
    assert summary['limits_gflop_per_s']['fp32'] > 0
    (s,) = summary['summary']
    fast, ref = (next(r for r in records if r['impl'] == i) for i in ('fast', 'reference'))
    assert s['vs_ref'] == pytest.approx(fast['img_per_s'] / ref['img_per_s'], rel=1e-2)
    # --breakdown: every category has time (patch-embed convs, SDPA / bmm, norms), and its own linear rate
    assert 'Where the time goes' in proc.stdout
    ops = count_macs_by_op(model, 224)
    linear_flops = 2 * (sum(ops.values()) - ops['aten.bmm'] - ops['aten.convolution']) / 1e9
    for r in records:
        b = r['breakdown_s']
        assert set(b) == {'linear', 'attention', 'conv', 'other'} and all(v > 0 for v in b.values()), b
        assert r['linear_gflop_per_s'] == pytest.approx(linear_flops / b['linear'], rel=1e-2)


@pytest.mark.parametrize('name, category', [
    ('aten::addmm', 'linear'), ('aten::mm', 'linear'), ('mkl::_mkl_linear', 'linear'),
    ('mkldnn::_linear_pointwise', 'linear'), ('sm90_xmma_gemm_f32f32_tf32f32_f32_tn_n', 'linear'),
    ('aten::bmm', 'attention'), ('aten::_scaled_dot_product_flash_attention_for_cpu', 'attention'),
    ('void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64>>', 'attention'),
    ('aten::mkldnn_convolution', 'conv'), ('mkldnn::_convolution_pointwise', 'conv'),
    ('sm80_xmma_fprop_implicit_gemm_indexed_f32f32', 'conv'), ('aten::convolution_backward', 'conv'),
    ('aten::native_layer_norm', 'other'), ('aten::gelu', 'other'), ('aten::_softmax', 'other'),
    ('graph_0_cpp_fused_convert_element_type_gelu_3', 'other'), ('## Call CompiledFxGraph abc ##', 'other'),
])
def test_op_category(throughput, name, category):
    assert throughput.op_category(name) == category


@pytest.mark.parametrize('fused', [True, False])
def test_reference_equals_fast(throughput, tiny_args, fused):
    model = ScalableViT(num_classes=10, **tiny_args).eval()
    model.set_fused_attn(fused)
    ref = throughput.make_reference(model)
    assert ref.stages[0][0].attn.forward.__func__ is throughput.released_iwsa_forward
    assert ref.stages[0][1].attn.forward.__func__ is throughput.released_ssa_forward
    assert throughput.check_reference(model, ref, 224) < 1e-5


def test_train_row_and_memory(throughput, tiny_args):
    model = ScalableViT(num_classes=10, **tiny_args)
    row = throughput.Row('tiny', 'fast', 'train', 'fp32', False, model, torch.device('cpu'), batch=1, img_size=224)
    before = [p.detach().clone() for p in model.parameters()]
    row.timed(1)
    row.measure_memory()
    rec = row.record()
    assert rec['mode'] == 'train' and rec['dtype'] == 'fp32' and rec['img_per_s'] > 0 and rec['peak_mem_mb'] > 0
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters())), 'the optimizer step ran'


def test_gemm_limit_is_a_matmul_rate(throughput, monkeypatch):
    """2 n^3 FLOPs over the time of one torch.mm, the best of the sizes and repeats."""
    clock = iter([0.0, 0.5, 1.0, 1.25])  # two timed products: 0.5 s, then 0.25 s
    monkeypatch.setattr(throughput.time, 'perf_counter', lambda: next(clock))
    rate = throughput.gemm_limit('fp32', torch.device('cpu'), sizes=(64,), repeats=2)
    assert rate == pytest.approx(2 * 64 ** 3 / 0.25)


def test_summary_takes_the_best_of_our_forms(throughput, tiny_args):
    """``fast`` in the summary is the best of the eager and optimized rows, against the eager reference."""
    model = ScalableViT(num_classes=10, **tiny_args)
    dev = torch.device('cpu')

    def row(impl, compiled, seconds, batch=8):
        r = throughput.Row('m', impl, 'infer', 'fp32', compiled, model, dev, batch=batch, img_size=32,
                           flops_per_img=1e9)
        r.times, r.limit = [seconds], 100e9
        return r

    rows = [row('fast', False, 1.0), row('optimized', True, 0.5), row('reference', False, 2.0),
            row('reference', True, 0.25), row('fast', False, 0.1, batch=1), row('reference', False, 0.2, batch=1)]
    summary = {s['batch']: s for s in throughput.summarize(rows)}
    assert summary[8]['best'] == 'optimized' and summary[8]['vs_ref'] == pytest.approx(4.0)  # 16 vs 4 img/s
    assert summary[8]['frac_of_limit'] == pytest.approx(0.16)  # 16 img/s x 1 GFLOP over 100 GFLOP/s
    assert summary[1]['vs_ref'] == pytest.approx(2.0) and summary[1]['fast_ms'] == pytest.approx(100.)
    table = throughput.format_table(rows, 'header')
    assert '| 4.00x' in table and '| 16.0 ' in table and '| 16% ' in table


class _CountingModel(nn.Module):
    """Output depends on how often it was called: an optimized model that is not the eager one."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.lin(x) * self.calls


def test_optimize_for_inference_checks_and_refuses():
    x = torch.randn(2, 4)
    with pytest.raises(ValueError, match='differs from eager'):
        optimize_for_inference(_CountingModel(), x, compile=False)
    fast = optimize_for_inference(nn.Linear(4, 4), x, compile=False)
    assert not any(p.requires_grad for p in fast.model.parameters())
    assert not fast(x).requires_grad
    with pytest.raises(RuntimeError, match='inference only'):
        fast.train()
    with pytest.raises(ValueError, match='dtype must be'):
        optimize_for_inference(nn.Linear(4, 4), dtype=torch.int8)
    lazy = optimize_for_inference(nn.Linear(4, 4))  # compiles on the first call; the state dict stays the model's
    assert lazy._compiled is not None and list(lazy.state_dict()) == ['model.weight', 'model.bias']


def test_optimize_for_inference_picks_the_attention_path():
    """Compiled on CPU: the plain attention (Inductor fuses its softmax); eager: the fused kernel; or as asked."""
    model = ScalableViT(num_classes=10, **MICRO_ARGS)
    optimize_for_inference(model, compile=False)
    assert all(b.attn.fused_attn for b in model.stages[0])
    optimize_for_inference(model)  # lazy: nothing is compiled before the first call
    assert not any(b.attn.fused_attn for b in model.stages[0])
    optimize_for_inference(model, fused_attn=True)
    assert all(b.attn.fused_attn for b in model.stages[0])


@pytest.mark.slow
def test_optimize_for_inference_equals_eager_and_freezes(fresh_compile):
    """Inductor with weight freezing: the eager function to 1e-4 (fp32), and the weights really are constants of
    the compiled graph (``options={'freezing': True}`` in ``torch.compile`` leaves them graph inputs)."""
    torch.manual_seed(0)
    model = ScalableViT(num_classes=10, **MICRO_ARGS)
    x = torch.randn(2, 3, 56, 56)
    fast = optimize_for_inference(model, x)  # compiles, and checks against eager itself
    assert fast._compiled is not None
    with torch.no_grad():
        eager = model(x)
        out = fast(x)
        assert ((out - eager).abs().max() / eager.abs().max()).item() < 1e-4
        # Frozen: the head's weight was pre-packed into the graph at compile time, so changing the model's copy
        # afterwards reaches eager but not the optimized model (with the weights as graph inputs, it reaches both).
        model.head.weight.zero_()
        assert model(x).abs().max() == model.head.bias.abs().max()
        assert torch.equal(fast(x), out)


@pytest.mark.slow
def test_device_check_dry_run(tmp_path):
    """Every step of benchmarks/device_check.sh on CPU with tiny sizes: no typo costs a GPU minute."""
    mm = all(importlib.util.find_spec(m) is not None for m in ('mmdet', 'mmseg'))
    cmd = ['bash', str(REPO / 'benchmarks' / 'device_check.sh'), '--dry-run', '--out', str(tmp_path / 'out')]
    if not mm:  # the mm stack is part of CI's install; without it only the classification steps can run
        cmd += ['--only', 'env', 'correctness', 'throughput', 'cls_train_fp16', 'cls_train_bf16', 'cls_throughput',
                'throughput_compiled']
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False)
    result = json.loads((tmp_path / 'out' / 'device_check.json').read_text())
    status = {s['name']: (s['status'], s['error']) for s in result['steps']}
    assert proc.returncode == 0, (status, proc.stdout[-2000:], proc.stderr[-2000:])
    expected = {'env', 'correctness', 'throughput', 'cls_train_fp16', 'cls_train_bf16', 'cls_throughput',
                'throughput_compiled'} | ({'det_train', 'seg_train', 'det_fps', 'seg_fps'} if mm else set())
    assert set(status) == expected, status
    assert status.pop('cls_train_bf16')[0] == 'skipped'  # the same command as cls_train_fp16 on CPU (both fp32)
    assert all(s == 'ok' for s, _ in status.values()), status
    steps = {s['name']: s['data'] for s in result['steps']}
    assert all(r['ok'] for r in steps['correctness']['rows'])
    assert {r['path'] for r in steps['correctness']['rows']} == {'fused', 'plain', 'released'}
    assert steps['cls_train_fp16']['steps'] >= 5 and steps['cls_train_fp16']['train_loss'] > 0
    assert steps['cls_throughput']['scalable_vit_small']['img_per_s'] > 0
    impls = {(r['run'], r['impl'], r['mode']) for r in result['throughput_rows']}
    assert {('eager', 'fast', 'train'), ('eager', 'reference', 'infer'), ('eager', 'timm', 'infer'),
            ('compiled', 'optimized', 'infer')} <= impls
    if mm:
        assert steps['det_fps']['fp32_fps'] > 0 and steps['seg_fps']['fp32_fps'] > 0
        assert steps['det_train']['last_train_iter'] == '8/8' and steps['seg_train']['last_train_iter'] == '4/4'
        assert 'coco/bbox_mAP' in steps['det_train']['metric'] and 'mIoU' in steps['seg_train']['metric']
    md = (tmp_path / 'out' / 'device_check.md').read_text()
    assert '## Targets' in md and 'S fp32 inference vs reference' in md
