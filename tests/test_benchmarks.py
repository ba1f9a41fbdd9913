"""benchmarks/throughput.py: its CLI and JSON records, and its reference path being the fast path's function."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from scalablevit import ScalableViT

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope='module')
def throughput():
    spec = importlib.util.spec_from_file_location('throughput', REPO / 'benchmarks' / 'throughput.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_writes_records(tmp_path, tiny_args):
    out = tmp_path / 'rows.json'
    cmd = [sys.executable, str(REPO / 'benchmarks' / 'throughput.py'), '--device', 'cpu', '--models',
           'scalable_vit_small', '--model-args', json.dumps(tiny_args), '--batch', '1', '--warmup', '0',
           '--repeats', '1', '--no-mem', '--json', str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'threads' in proc.stdout and 'scalable_vit_small' in proc.stdout
    records = json.loads(out.read_text())
    assert {r['impl'] for r in records} == {'fast', 'reference'}
    for r in records:
        assert r['model'] == 'scalable_vit_small' and r['device'] == 'cpu' and r['dtype'] == 'fp32'
        assert r['batch'] == 1 and r['mode'] == 'infer' and r['compiled'] is False
        assert r['img_per_s'] > 0 and 'peak_mem_mb' in r  # measured in test_train_row_and_memory


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
