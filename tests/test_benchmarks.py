"""benchmarks/: throughput.py (CLI, JSON records, the GEMM limit and FLOP fractions, its reference path being the
fast path's function), device_check.sh in its CPU dry-run mode (with and without the OpenMMLab stack and a
``python`` executable) and its GPU plan, data_pipeline.py, and scalablevit.inference.optimize_for_inference."""
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import scalablevit.inference as inference
from scalablevit import ScalableViT
from scalablevit.inference import (
    _PackedLinear,
    faster_on_onednn,
    linear_kernel_times,
    linear_rows,
    optimize_for_inference,
)
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
def test_optimize_for_inference_onednn_linears_equal_eager(fresh_compile):
    """``linear_kernel='onednn'``: every fp32 Linear is pre-packed for oneDNN in a compiled copy of the module tree
    (the parameters shared, the model and its state dict unchanged) and the outputs stay eager's to 1e-4; ``'auto'``
    times both kernels per shape and counts its choice; an unknown kernel name is refused."""
    torch.manual_seed(0)
    model = ScalableViT(num_classes=10, **MICRO_ARGS)
    n_linear = sum(type(m) is nn.Linear for m in model.modules())
    x = torch.randn(2, 3, 56, 56)
    keys = list(model.state_dict())
    fast = optimize_for_inference(model, x, linear_kernel='onednn')  # compiles, and checks against eager itself
    assert fast.linear_kernels == {'onednn': n_linear, 'mkl': 0}
    compiled_tree = fast._compiled._orig_mod
    assert compiled_tree is not model and sum(isinstance(m, _PackedLinear) for m in compiled_tree.modules()) == n_linear
    assert list(model.state_dict()) == keys and sum(type(m) is nn.Linear for m in model.modules()) == n_linear
    assert {id(p) for p in compiled_tree.parameters()} <= {id(p) for p in model.parameters()}  # shared, not copied
    with torch.no_grad():
        eager = model(x)
        assert ((fast(x) - eager).abs().max() / eager.abs().max()).item() < 1e-4
    with pytest.raises(ValueError, match='linear_kernel must be'):
        optimize_for_inference(model, linear_kernel='blas')
    assert optimize_for_inference(model, dtype=torch.bfloat16).linear_kernel == 'mkl'  # only fp32 graphs use MKL
    rows = linear_rows(model, x)
    assert len(rows) == n_linear and rows[model.head] == 2
    choice = {m: faster_on_onednn(r, m.in_features, m.out_features) for m, r in rows.items()}
    for m, r in rows.items():  # the cached timing of the two kernels decides
        t = linear_kernel_times(r, m.in_features, m.out_features)
        assert choice[m] == (t['onednn'] < 0.95 * t['mkl'])
    torch._dynamo.reset()
    auto = optimize_for_inference(model, x)  # 'auto': packs the layers chosen above, and checks against eager
    assert auto.linear_kernels == {'onednn': sum(choice.values()), 'mkl': n_linear - sum(choice.values())}
    head = nn.Linear(24, 10)
    packed = _PackedLinear(head, rows=8)  # packed with a hint of 8 rows, called with 2 x 5
    z = torch.randn(2, 5, 24)
    with torch.no_grad():
        torch.testing.assert_close(packed(z), head(z), rtol=1e-5, atol=1e-5)


def test_faster_on_onednn_needs_a_5_percent_lead(monkeypatch):
    """The 'auto' rule on fixed timings: oneDNN is taken only where it is at least 5% faster than MKL; the timings
    are cached per shape and thread count, so a shape is timed once per process."""
    threads = torch.get_num_threads()
    times = {(7, 8, 9, 'mkl', threads): 1.0, (7, 8, 9, 'onednn', threads): 0.94,
             (7, 8, 10, 'mkl', threads): 1.0, (7, 8, 10, 'onednn', threads): 0.96}
    monkeypatch.setattr(inference, '_KERNEL_TIMES', times)
    assert faster_on_onednn(7, 8, 9) and not faster_on_onednn(7, 8, 10)
    assert linear_kernel_times(7, 8, 9) == {'mkl': 1.0, 'onednn': 0.94} and len(times) == 4  # read, not re-timed


def test_linear_kernels_table(tmp_path):
    """benchmarks/linear_kernels.py on a one-stage model: one row per distinct Linear shape of the forward pass
    (rows = batch x tokens), each kernel's rate, the pick, the per-pass total; an unknown model is one line."""
    out = tmp_path / 'kernels.json'
    script = str(REPO / 'benchmarks' / 'linear_kernels.py')
    cmd = [sys.executable, script, '--model-args', json.dumps(dict(MICRO_ARGS, num_classes=10)), '--img-size', '56',
           '--batch', '2', '--threads', '1', '--json', str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())['rows']
    model = ScalableViT(num_classes=10, **MICRO_ARGS)
    shapes = {(r, m.in_features, m.out_features) for m, r in linear_rows(model, torch.randn(2, 3, 56, 56)).items()}
    assert {(r['rows'], r['in_features'], r['out_features']) for r in rows} == shapes
    assert (2, 32, 10) in shapes and (2 * 14 * 14, 32, 64) in shapes  # the head; the stage's MLP at 56 / 4 = 14
    assert sum(r['layers'] for r in rows) == sum(type(m) is nn.Linear for m in model.modules())
    for r in rows:
        assert set(r['seconds']) == {'eager', 'mkl', 'onednn'} and min(r['seconds'].values()) > 0
        assert r['auto'] == ('onednn' if r['seconds']['onednn'] < 0.95 * r['seconds']['mkl'] else 'mkl')
    assert proc.stdout.count('\n| ') == len(rows) + 2 and 'all Linear layers, ms per pass' in proc.stdout
    bad = subprocess.run([sys.executable, script, '--model', 'no_such_model'], capture_output=True, text=True,
                         timeout=300, check=False)
    assert bad.returncode != 0 and 'Traceback' not in bad.stderr and 'no_such_model' in bad.stderr


@pytest.fixture
def device_check(load_script):
    return load_script('benchmarks/device_check.py')


@pytest.mark.slow
def test_device_check_dry_run_mm_steps(tmp_path):
    """The OpenMMLab steps of benchmarks/device_check.sh on CPU with tiny sizes: no typo costs a GPU minute. The
    other steps run in test_device_check_dry_run_without_mm_or_python."""
    if not all(importlib.util.find_spec(m) is not None for m in ('mmdet', 'mmseg')):
        pytest.skip('the OpenMMLab steps need mmdet and mmseg (part of CI\'s install)')
    cmd = ['bash', str(REPO / 'benchmarks' / 'device_check.sh'), '--dry-run', '--out', str(tmp_path / 'out'),
           '--only', 'env', 'det_train', 'seg_train', 'det_fps', 'seg_fps']
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False)
    result = json.loads((tmp_path / 'out' / 'device_check.json').read_text())
    status = {s['name']: (s['status'], s['error']) for s in result['steps']}
    assert proc.returncode == 0, (status, proc.stdout[-2000:], proc.stderr[-2000:])
    assert set(status) == {'env', 'det_train', 'seg_train', 'det_fps', 'seg_fps'}, status
    assert all(s == 'ok' for s, _ in status.values()), status
    steps = {s['name']: s['data'] for s in result['steps']}
    assert steps['det_fps']['fp32_fps'] > 0 and steps['seg_fps']['fp32_fps'] > 0
    assert steps['det_train']['last_train_iter'] == '8/8' and steps['seg_train']['last_train_iter'] == '4/4'
    assert 'coco/bbox_mAP' in steps['det_train']['metric'] and 'mIoU' in steps['seg_train']['metric']


def _probe_wheel(folder: Path) -> Path:
    """A minimal pure-Python wheel (package ``devcheck_probe``), for device_check.sh's carried-wheel install."""
    folder.mkdir(parents=True)
    info = 'devcheck_probe-0.1.dist-info'
    files = {'devcheck_probe/__init__.py': "VERSION = '0.1'\n",
             f'{info}/METADATA': 'Metadata-Version: 2.1\nName: devcheck-probe\nVersion: 0.1\n',
             f'{info}/WHEEL': 'Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n'}
    files[f'{info}/RECORD'] = ''.join(f'{name},,\n' for name in [*files, f'{info}/RECORD'])
    path = folder / 'devcheck_probe-0.1-py3-none-any.whl'
    with zipfile.ZipFile(path, 'w') as z:
        for name, text in files.items():
            z.writestr(name, text)
    return path


def _bin_without_python(folder: Path) -> str:
    """A PATH of one folder: links to every tool of /usr/bin and /bin except ``python*``, and ``python3`` running
    this interpreter (a wrapper, so that a virtual environment stays active)."""
    folder.mkdir()
    for d in ('/usr/bin', '/bin'):
        for entry in os.scandir(d):
            if not entry.name.startswith('python') and not os.path.lexists(folder / entry.name):
                (folder / entry.name).symlink_to(entry.path)
    wrapper = folder / 'python3'
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    wrapper.chmod(0o755)
    return str(folder)


@pytest.mark.slow
def test_device_check_dry_run_without_mm_or_python(tmp_path):
    """The GPU image's situation, rehearsed on CPU: no ``python`` on PATH (only ``python3``), the OpenMMLab
    packages failing to import, a carried wheel to install. Every step but the mm ones runs; those are skipped
    with the import error, and the feature-pyramid steps measure the backbone without mmcv."""
    fake = tmp_path / 'fake'
    for name in ('mmcv', 'mmengine', 'mmdet', 'mmseg'):
        (fake / name).mkdir(parents=True)
        (fake / name / '__init__.py').write_text("raise ImportError('hidden for the test')\n")
    path = _bin_without_python(tmp_path / 'bin')
    assert shutil.which('python', path=path) is None and shutil.which('python3', path=path)
    _probe_wheel(tmp_path / 'wheels')
    env = {k: v for k, v in os.environ.items() if k != 'PYTHON'}
    env.update(PATH=path, PYTHONPATH=os.pathsep.join(filter(None, [str(fake), os.environ.get('PYTHONPATH')])),
               DEVICE_CHECK_WHEELS=str(tmp_path / 'wheels'), DEVICE_CHECK_SITE=str(tmp_path / 'site'))
    out = tmp_path / 'out'
    proc = subprocess.run(['bash', str(REPO / 'benchmarks' / 'device_check.sh'), '--dry-run', '--out', str(out)],
                          env=env, capture_output=True, text=True, timeout=1200, check=False)
    result = json.loads((out / 'device_check.json').read_text())
    status = {s['name']: (s['status'], s['error']) for s in result['steps']}
    assert proc.returncode == 0, (status, proc.stdout[-2000:], proc.stderr[-2000:])
    assert 'installing 1 wheel(s)' in proc.stdout and (tmp_path / 'site' / 'devcheck_probe' / '__init__.py').is_file()
    assert list(status) == ['env', 'train', 'correctness', 'throughput', 'det_pyramid', 'seg_pyramid',
                            'cls_train_fp16', 'cls_train_bf16', 'det_train', 'seg_train', 'det_fps', 'seg_fps',
                            'cls_throughput', 'throughput_compiled'], status
    for name in ('det_train', 'det_fps'):
        assert status.pop(name) == ('skipped', 'mmcv/mmdet not importable: ImportError: hidden for the test')
    for name in ('seg_train', 'seg_fps'):
        assert status.pop(name) == ('skipped', 'mmcv/mmseg not importable: ImportError: hidden for the test')
    assert status.pop('cls_train_bf16')[0] == 'skipped'  # the same command as cls_train_fp16 on CPU (both fp32)
    assert all(s == 'ok' for s, _ in status.values()), status
    steps = {s['name']: s['data'] for s in result['steps']}
    assert steps['env']['executable'] == sys.executable and steps['env']['mmcv'].startswith('not importable')
    for name in ('det_pyramid', 'seg_pyramid'):
        d = steps[name]
        assert len(d['maps']) == 4 and d['input'] == '2x3x64x96'
        assert {(r['dtype'], r['mode']) for r in d['rows']} == {('fp32', 'infer'), ('fp32', 'train')}
        assert all(r['img_per_s'] > 0 and r['peak_mem_mb'] > 0 for r in d['rows']), d['rows']
    assert all(r['ok'] for r in steps['correctness']['rows'])
    assert {r['path'] for r in steps['correctness']['rows']} == {'fused', 'plain', 'released'}
    assert steps['cls_train_fp16']['steps'] >= 5 and steps['cls_train_fp16']['train_loss'] > 0
    assert steps['cls_throughput']['scalable_vit_small']['img_per_s'] > 0
    rows = result['throughput_rows']
    assert rows[0]['run'] == 'train'  # the training rows come first
    impls = {(r['run'], r['impl'], r['mode']) for r in rows}
    assert {('train', 'fast', 'train'), ('train', 'reference', 'train'), ('train', 'timm', 'train'),
            ('infer', 'reference', 'infer'), ('infer', 'timm', 'infer'), ('compiled', 'optimized', 'infer')} <= impls
    assert all(r['peak_mem_mb'] > 0 for r in rows if r['run'] == 'train')
    md = (out / 'device_check.md').read_text()
    assert '## Targets' in md and '- S fp32 training step, batch 1, vs the eager reference: eager ' in md
    assert '- S fp32 inference, batch 1, vs the eager reference: eager ' in md
    assert '| det_pyramid | scalable_vit_small (tiny) | 2x3x64x96 | fp32 | train |' in md


class _FakeShell:
    """Stands in for ``DeviceCheck.sh`` in the GPU-plan tests: throughput.py's own parser must take each command;
    records it, writes an empty row list where it asks; a command that ``fail(args)`` picks raises StepFailed."""

    def __init__(self, throughput, step_failed, fail=None):
        self.parser, self.step_failed, self.fail, self.calls = throughput.get_args_parser(), step_failed, fail, []

    def __call__(self, cmd, cwd=None, timeout=600, env=None):
        assert cmd[0] == sys.executable and cmd[1].endswith('throughput.py'), cmd
        args = self.parser.parse_args(cmd[2:])
        self.calls.append(dict(args=args, timeout=timeout))
        if self.fail and self.fail(args):
            raise self.step_failed('timed out after 99 s: throughput.py ...')
        Path(args.json).write_text('[]')
        return ''


def _gpu_check(device_check, throughput, tmp_path, remaining=(), fail=None):
    """A DeviceCheck as on a GPU, with the shell faked and ``remaining()`` returning ``remaining`` in turn."""
    check = device_check.DeviceCheck(tmp_path / 'out', tmp_path / 'work', dry_run=False, device='cuda',
                                     budget_s=450., only=None)
    check.sh = _FakeShell(throughput, device_check.StepFailed, fail)
    clock = iter(remaining)
    check.remaining = lambda: next(clock)
    return check


def test_device_check_gpu_train_plan(device_check, throughput, tmp_path):
    """``train`` on a GPU: the eager rows (S fast, with gradient checkpointing, reference, Swin-T; bf16 and fp16;
    batch 64), then one compiled process per dtype, bf16 first, each bounded by what the budget leaves after the
    reserved steps' estimates."""
    reserve = sum(device_check.ESTIMATE_S[n] for n in device_check.RESERVED)
    check = _gpu_check(device_check, throughput, tmp_path, remaining=[reserve + 240, reserve + 140])
    out = check.train()
    eager, *compiled = [c['args'] for c in check.sh.calls]
    assert eager.models == [device_check.OURS, device_check.PEER]
    assert eager.impl == ['fast', 'checkpointed', 'reference', 'timm']
    assert (eager.mode, eager.dtype, eager.compile, eager.batch, eager.device) == (
        ['train'], ['bf16', 'fp16'], 'no', [64], 'cuda')
    assert not eager.no_mem and eager.img_size == 224
    assert [(a.dtype, a.compile, a.impl, a.mode) for a in compiled] == [
        (['bf16'], 'yes', ['fast', 'timm'], ['train']), (['fp16'], 'yes', ['fast', 'timm'], ['train'])]
    assert [c['timeout'] for c in check.sh.calls[1:]] == [240, 140]
    assert set(out['runs']) == {'eager', 'compiled_bf16', 'compiled_fp16'} and '_failed' not in out

    check = _gpu_check(device_check, throughput, tmp_path, remaining=[reserve + 240, reserve + 90])
    out = check.train()
    assert len(check.sh.calls) == 2 and out['runs']['compiled_fp16'].startswith('skipped: time budget (90 s left')

    check = _gpu_check(device_check, throughput, tmp_path, remaining=[reserve + 240, reserve + 140],
                       fail=lambda a: a.compile == 'yes' and a.dtype == ['bf16'])
    out = check.train()
    assert len(check.sh.calls) == 3 and out['runs']['compiled_bf16'].startswith('failed: timed out')
    assert out['_failed'] and out['_error'].startswith('compiled_bf16: timed out') and 'eager rows are kept' in \
        out['_error']


def test_device_check_gpu_inference_commands(device_check, throughput, tmp_path):
    check = _gpu_check(device_check, throughput, tmp_path)
    check.throughput()
    check.throughput_compiled()
    infer, compiled = [c['args'] for c in check.sh.calls]
    assert (infer.models, infer.mode, infer.dtype, infer.compile, infer.batch) == (
        ['all'], ['infer'], ['fp16', 'bf16'], 'no', [64])
    assert compiled.compile == 'yes' and 'optimized' in compiled.impl and compiled.no_mem
    assert (compiled.repeats, compiled.iters) == (5, 10)  # the later flags win


def test_device_check_targets(device_check, tmp_path):
    """The summary's verdicts: training >= 1.3x the eager reference at <= 0.7x its peak memory with our best form,
    inference >= 1.5x, S against Swin-T at equal batch in bf16, eager with eager and compiled with compiled."""
    check = device_check.DeviceCheck(tmp_path / 'out', tmp_path / 'work', dry_run=False, device='cuda',
                                     budget_s=450., only=None)
    s, t = device_check.OURS, device_check.PEER

    def row(model, impl, mode, dtype, compiled, img_per_s, mem=None):
        return dict(model=model, impl=impl, mode=mode, dtype=dtype, compiled=compiled, batch=64, img_size=224,
                    img_per_s=img_per_s, peak_mem_mb=mem)

    check.throughput_rows = [
        row(s, 'reference', 'train', 'bf16', False, 100, 1000), row(s, 'fast', 'train', 'bf16', False, 120, 800),
        row(s, 'fast', 'train', 'bf16', True, 140, 650), row(s, 'checkpointed', 'train', 'bf16', False, 110, 500),
        row(t, 'timm', 'train', 'bf16', False, 110, 900),
        row(t, 'timm', 'train', 'bf16', True, 150, 700), row(s, 'reference', 'train', 'fp16', False, 100, 1000),
        row(s, 'fast', 'train', 'fp16', False, 140, 900), row(s, 'reference', 'infer', 'bf16', False, 100),
        row(s, 'fast', 'infer', 'bf16', False, 160), row(t, 'timm', 'infer', 'bf16', False, 170)]
    target = '(target >= 1.3x at <= 0.7x the peak memory'
    assert check._targets() == [
        f'- S fp16 training step, batch 64, vs the eager reference: eager 1.40x at 0.90x the peak memory {target}: '
        'missed)',
        '- S bf16 training step, batch 64, vs the eager reference: checkpointed 1.10x at 0.50x the peak memory; '
        f'eager 1.20x at 0.80x the peak memory; compiled 1.40x at 0.65x the peak memory {target}: met (compiled))',
        '- S bf16 inference, batch 64, vs the eager reference: eager 1.60x (target >= 1.5x: met (eager))',
        f'- S vs {t}, bf16 training step eager, batch 64: 120.0 vs 110.0 img/s (ahead)',
        f'- S vs {t}, bf16 training step compiled, batch 64: 140.0 vs 150.0 img/s (behind)',
        f'- S vs {t}, bf16 inference eager, batch 64: 160.0 vs 170.0 img/s (behind)']


def test_device_check_skip_reason(device_check):
    assert device_check.needs('json', 'json')() == ''
    assert device_check.needs('mmfoo', 'json', 'no_such_module_xyz')() == (
        "mmfoo not importable: ModuleNotFoundError: No module named 'no_such_module_xyz'")


def test_device_check_no_tf32(device_check):
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    before = matmul.fp32_precision, conv.fp32_precision
    with device_check.no_tf32():
        assert (matmul.fp32_precision, conv.fp32_precision) == ('ieee', 'ieee')
    assert (matmul.fp32_precision, conv.fp32_precision) == before


def test_data_pipeline(tmp_path):
    """benchmarks/data_pipeline.py with a few images and one repeat: the recipe's transform, the table, the JSON,
    and the worker counts for a given rate and a throughput.py JSON's training row."""
    rows = tmp_path / 'rows.json'
    rows.write_text(json.dumps([
        dict(model='scalable_vit_small', impl='fast', mode='train', dtype='bf16', compiled=False, batch=64,
             device='cuda', img_per_s=1000.0),
        dict(model='scalable_vit_small', impl='fast', mode='infer', dtype='bf16', compiled=False, batch=64,
             device='cuda', img_per_s=5000.0)]))
    out = tmp_path / 'pipeline.json'
    cmd = [sys.executable, str(REPO / 'benchmarks' / 'data_pipeline.py'), '--images', '3', '--repeats', '1',
           '--model-rate', '500', '--throughput-json', str(rows), '--json', str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for text in ('images/s per core', 'decode %', 'worker cores per GPU', 'libjpeg-turbo', "DeiT's 10 workers"):
        assert text in proc.stdout, proc.stdout
    res = json.loads(out.read_text())
    assert res['torch_threads'] == 1 and res['repeats'] == 1 and res['images']['count'] == 3
    assert res['other_processes_cores'] is None or res['other_processes_cores'] >= 0
    assert set(res['images']['sizes']) <= {'500x375', '375x500'} and res['images']['quality'] == 90
    # DeiT's recipe as main.py's defaults build it (timm drops the colour jitter when RandAugment is on)
    assert res['transform'] == ['RandomResizedCropAndInterpolation', 'RandomHorizontalFlip', 'RandAugment',
                                'MaybeToTensor', 'Normalize', 'RandomErasing']
    assert res['img_per_s_per_core'] > 0 and sum(res['stage_share'].values()) == pytest.approx(1, abs=1e-3)
    assert all(res['stage_ms'][s] > 0 for s in ('decode', 'geometric', 'augment', 'tensor', 'erasing'))
    assert res['uint8_tensor_ms'] > 0 and res['prefetcher_img_per_s_per_core'] > 0 and 'GPU prefetcher' in proc.stdout
    assert [w['img_per_s'] for w in res['workers']] == [500.0, 1000.0]  # the given rate, then the training row
    for w in res['workers']:
        assert w['workers_per_gpu'] - 1 < w['img_per_s'] / res['img_per_s_per_core'] <= w['workers_per_gpu'] + 1e-3
    assert res['deit_10_workers_img_per_s'] == pytest.approx(10 * res['img_per_s_per_core'], rel=1e-3)
