"""One-shot GPU check: training and inference speed, correctness, the backbone's feature pyramids, and the
classification and dense-prediction runs, on the first GPU we get.

    bash benchmarks/device_check.sh                     # on a CUDA machine; results in $OUT or benchmarks/results/
    bash benchmarks/device_check.sh --dry-run           # every step on CPU with tiny sizes (what CI runs)
    python3 benchmarks/device_check.py --out DIR --only correctness throughput

Each step runs in order under one time budget (``--budget-s``, 450 s by default on CUDA, so the whole check ends
in under 8 minutes on one H200): a step whose estimate no longer fits is skipped and says so, and so is a step that
needs a package the machine lacks (mmcv with mmdet or mmseg, torchvision), with the import error. The results go
to ``DIR/device_check.json`` (every step's status, seconds, numbers and the throughput rows) and
``DIR/device_check.md`` (a summary with the speed targets); the output of every command is appended to
``DIR/device_check.log``. Scratch files (checkpoints, work dirs, data) go to ``--work`` (a temporary folder).
Every command runs with this interpreter (``sys.executable``). This file runs the steps under the budget; the
report is ``device_report.py`` (pure functions of the results) and the det/seg speed is ``device_fps.py`` (a
process of its own per model).

Steps, in order: ``env``; ``train`` (``throughput.py`` training steps at batch 64, 224 px: ScalableViT-S fast vs
the released computation (``reference``) vs Swin-T, eager, fp16 and bf16, with peak memory; then S and Swin-T
under ``torch.compile``, bf16 then fp16, each while the budget still holds it and the next steps' estimates);
``correctness`` (fused vs plain attention vs the released code's outputs in ``tests/data``, fp32, bf16, fp16, odd
input sizes); ``throughput`` (inference of S/B/L fast vs reference and the nine timm peers, batch 64, fp16 and
bf16); ``det_pyramid`` / ``seg_pyramid`` (S's four-stage feature pyramid through timm's ``features_only`` at the
detection and segmentation input sizes, fp16 and bf16, inference and a training step: what can be measured
without mmcv); ``cls_train_fp16`` and ``cls_train_bf16`` (one epoch of DIGITS at 224, about 50 steps of
ScalableViT-S under ``torchrun``, NCCL); ``det_train`` / ``seg_train`` (the tiny mmdet / mmseg configs);
``det_fps`` / ``seg_fps`` (RetinaNet-S at 1333x800, UperNet-S at 2048x512); ``cls_throughput`` (``main.py
--throughput`` of S/B/L) and ``throughput_compiled`` (S and Swin-T inference under ``torch.compile``, and
``optimize_for_inference``).
"""
import argparse
import contextlib
import functools
import importlib
import importlib.util
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))  # run from a clone without installing

def _load(name: str, path: Path):
    """A benchmarks/ script as a module."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


report = _load('device_report', HERE / 'device_report.py')  # device_check.md, pure functions
OURS, PEER, DRY_PEER = report.OURS, report.PEER, report.DRY_PEER

# The tiny ScalableViT of the tests (every block type and SSA channel ratio), for the CPU dry run.
TINY_ARGS = dict(embed_dims=[32, 64, 96, 128], num_heads=[1, 2, 3, 4], depths=[2, 2, 2, 2],
                 c_ratios=[2, 1.25, 0.5, 1], sr_ratios=[8, 4, 2, 1])
# The three-stage DIGITS model of classification/README.md's first run.
CLS_TINY_KWARGS = ['embed_dims=32,64,128', 'num_heads=1,2,4', 'depths=2,2,2', 'mlp_ratios=2,2,2', 'sr_ratios=4,2,1',
                   'c_ratios=1,1,1', 'wss=4,4,2', 'mlp_head=False']
# One stage of IWSA + SSA and a plain head, for the one compile of the dry run (few kernels: compiles fast).
MICRO_ARGS = dict(embed_dims=[32], num_heads=[2], depths=[2], mlp_ratios=[2], wss=[7], sr_ratios=[4],
                  c_ratios=[1.25], mlp_head=False)
TOLERANCE = {'fp32': 1e-4, 'fp16': 1e-2, 'bf16': 5e-2}  # max |out - ref| / max |ref| of the logits

# Feature-pyramid inputs (H, W) and batch: RetinaNet's 1333x800 padded to a multiple of 32 as mmdet's data
# preprocessor feeds it, UperNet's 2048x512 test size; batch 2, the per-GPU batch of both training configs.
PYRAMID = {'det': ((800, 1344), 2), 'seg': ((512, 2048), 2)}

# Seconds each step is planned to take on one H100/H200 (estimates). ``train`` counts its eager part and one
# compiled dtype (``train_compiled``: S and Swin-T); each compiled dtype runs only while the budget holds it and
# the estimates of the RESERVED steps after it.
ESTIMATE_S = dict(env=2, train=170, train_compiled=130, correctness=30, throughput=90, det_pyramid=20,
                  seg_pyramid=20, cls_train_fp16=45, cls_train_bf16=45, det_train=50, seg_train=35, det_fps=30,
                  seg_fps=30, cls_throughput=45, throughput_compiled=200)
RESERVED = ('correctness', 'throughput', 'det_pyramid', 'seg_pyramid')
OVERRUN_S = 20  # how far a command may run past the budget before it is stopped

DET_CONFIG = 'configs/retinanet_scalablevit-s_fpn_1x_coco.py'
SEG_CONFIG = 'configs/scalablevit-s_upernet_8xb2-160k_ade20k-512x512.py'
DET_TINY = 'configs/tiny/retinanet_scalablevit-tiny_fpn_tiny-coco.py'
SEG_TINY = 'configs/tiny/scalablevit-tiny_upernet_1xb2-40_tiny-ade-64x64.py'


class StepFailed(Exception):
    """A step's command or check failed; the message is one line."""


@functools.lru_cache(maxsize=None)
def import_error(*modules: str) -> str:
    """'' if every module imports, else the first failure as one line ('ModuleNotFoundError: No module ...')."""
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception as e:  # an installed package can fail in many ways (missing ops, ABI, version checks)
            msg = (str(e).strip().splitlines() or [''])[0][:200]
            return f'{type(e).__name__}: {msg}' if msg else type(e).__name__
    return ''


def needs(label: str, *modules: str) -> Callable[[], str]:
    """A step's skip test: '' if ``modules`` import, else '<label> not importable: <error>'."""
    def reason() -> str:
        err = import_error(*modules)
        return f'{label} not importable: {err}' if err else ''
    return reason


@contextlib.contextmanager
def no_tf32():
    """float32 matrix products and convolutions without TF32 inside, the previous settings restored after; through
    ``fp32_precision`` where torch has it (2.9 and later, whose ``allow_tf32`` flags are deprecated), else
    ``allow_tf32``."""
    import torch
    mods = [torch.backends.cuda.matmul, torch.backends.cudnn]
    name, value = 'allow_tf32', False
    if hasattr(torch.backends.cuda.matmul, 'fp32_precision') and hasattr(torch.backends.cudnn, 'conv'):
        mods, name, value = [torch.backends.cuda.matmul, torch.backends.cudnn.conv], 'fp32_precision', 'ieee'
    saved = [getattr(m, name) for m in mods]
    for m in mods:
        setattr(m, name, value)
    try:
        yield
    finally:
        for m, v in zip(mods, saved):
            setattr(m, name, v)


@functools.lru_cache(maxsize=None)
def throughput_module():
    """``benchmarks/throughput.py`` as a module (its reference path, timing and memory helpers)."""
    return _load('throughput', REPO / 'benchmarks' / 'throughput.py')


class DeviceCheck:
    def __init__(self, out: Path, work: Path, dry_run: bool, device: str, budget_s: float,
                 only: Optional[Sequence[str]]):
        self.out, self.work, self.dry_run, self.device = out, work, dry_run, device
        self.budget_s, self.only = budget_s, set(only or [])
        self.t0 = time.time()
        self.steps: List[Dict] = []
        self.throughput_rows: List[Dict] = []
        self.throughput_tables: List[str] = []
        out.mkdir(parents=True, exist_ok=True)
        work.mkdir(parents=True, exist_ok=True)
        self.log_path = out / 'device_check.log'
        self.log_path.write_text('')

    # ---------------------------------------------------------------------------------------------------------------
    # plumbing
    # ---------------------------------------------------------------------------------------------------------------

    def log(self, text: str):
        with self.log_path.open('a') as f:
            f.write(text if text.endswith('\n') else text + '\n')

    def remaining(self) -> float:
        return self.budget_s - (time.time() - self.t0)

    def reserve(self, steps: Sequence[str] = RESERVED) -> float:
        """Seconds the not yet run ones of ``steps`` (among those selected) are estimated to need."""
        done = {s['name'] for s in self.steps}
        return sum(ESTIMATE_S[n] for n in steps if n not in done and (not self.only or n in self.only))

    def sh(self, cmd: List[str], cwd: Path = REPO, timeout: float = 600, env: Optional[Dict] = None) -> str:
        """Run a command, log its output, return stdout + stderr; a non-zero exit is a StepFailed."""
        self.log(f'\n$ (cd {cwd} && {" ".join(cmd)})')
        full_env = dict(os.environ, PYTHONUNBUFFERED='1', **(env or {}))
        full_env['PYTHONPATH'] = os.pathsep.join(filter(None, [str(REPO), full_env.get('PYTHONPATH')]))
        try:
            # the dry run has no budget (a loaded CI machine is slow); on the GPU a step ends with the budget
            limit = max(timeout, 900.) if self.dry_run else max(10., min(timeout, self.remaining() + OVERRUN_S))
            proc = subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=limit)
        except subprocess.TimeoutExpired as e:
            self.log(_text(e.stdout) + _text(e.stderr))
            raise StepFailed(f'timed out after {e.timeout:.0f} s: {" ".join(cmd[:4])} ...') from None
        text = proc.stdout + proc.stderr
        self.log(text)
        if proc.returncode != 0:
            last = [line for line in text.strip().splitlines() if line.strip()][-1:] or ['(no output)']
            raise StepFailed(f'exit {proc.returncode}: {last[0][:300]}')
        return text

    def step(self, name: str, fn: Callable[[], Dict], dry_run_skip: str = '',
             skip: Optional[Callable[[], str]] = None):
        """Run step ``name`` unless ``--only`` leaves it out, the dry run skips it (``dry_run_skip``: why),
        ``skip()`` gives a reason, or its estimate (``ESTIMATE_S``) no longer fits the budget."""
        if self.only and name not in self.only:
            return
        rec = dict(name=name, status='ok', seconds=0., data={}, error=None)
        estimate_s = ESTIMATE_S[name]
        reason = skip() if skip else ''
        if self.dry_run and dry_run_skip:
            rec.update(status='skipped', error=f'dry run: {dry_run_skip}')
        elif reason:
            rec.update(status='skipped', error=reason)
        elif not self.dry_run and self.remaining() < estimate_s:
            rec.update(status='skipped', error=f'time budget: {self.remaining():.0f} s left, the step needs ~'
                                               f'{estimate_s:.0f} s (run it alone with --only {name})')
        else:
            t = time.time()
            self.log(f'\n===== {name} =====')
            try:
                rec['data'] = fn() or {}
                if rec['data'].pop('_failed', None):
                    rec['status'], rec['error'] = 'failed', rec['data'].pop('_error', 'a check failed')
            except StepFailed as e:
                rec.update(status='failed', error=str(e))
            except Exception as e:  # a bug in a step must not cost the other steps
                self.log(traceback.format_exc())
                rec.update(status='failed', error=f'{type(e).__name__}: {str(e).strip()[:300]}')
            rec['seconds'] = round(time.time() - t, 1)
        self.steps.append(rec)
        note = f': {rec["error"]}' if rec['error'] else ''
        print(f'[device_check] {name}: {rec["status"]} ({rec["seconds"]} s){note}', flush=True)
        self.write()

    def python(self) -> List[str]:
        return [sys.executable]

    # ---------------------------------------------------------------------------------------------------------------
    # steps
    # ---------------------------------------------------------------------------------------------------------------

    def env(self) -> Dict:
        import timm
        import torch
        info = dict(python=platform.python_version(), executable=sys.executable, torch=torch.__version__,
                    timm=timm.__version__, timm_path=str(Path(timm.__file__).parent), cuda=torch.version.cuda,
                    device=self.device, dry_run=self.dry_run, host_cpus=os.cpu_count(),
                    cpu_capability=torch.backends.cpu.get_cpu_capability())
        if self.device == 'cuda':
            info['gpu'] = torch.cuda.get_device_name(0)
            info['gpu_count'] = torch.cuda.device_count()
            info['capability'] = '.'.join(map(str, torch.cuda.get_device_capability(0)))
            info['gpu_memory_gb'] = round(torch.cuda.get_device_properties(0).total_memory / 2 ** 30, 1)
            if shutil.which('nvidia-smi'):
                info['nvidia_smi'] = subprocess.run(
                    ['nvidia-smi', '--query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit',
                     '--format=csv,noheader'], capture_output=True, text=True).stdout.strip()
        for mod in ('torchvision', 'mmengine', 'mmcv', 'mmdet', 'mmseg'):
            err = import_error(mod)  # optional: the steps that need one are skipped without it
            info[mod] = f'not importable ({err})' if err else sys.modules[mod].__version__
        return info

    def train(self) -> Dict:
        """Training-step rows: S fast and checkpointed vs reference vs the peer, eager, fp16 and bf16; then S and the
        peer under torch.compile, one throughput.py process per dtype (bf16 first), each while the budget still
        holds it and the estimates of the RESERVED steps. The dry run: the eager rows in fp32 (compiling training
        graphs takes minutes on 2 CPU cores; tests/test_benchmarks.py checks the compiled commands against
        throughput.py)."""
        if self.dry_run:
            return dict(runs={'eager': self._throughput_run('train', [OURS, DRY_PEER], ['fast', 'reference', 'timm'],
                                                            'train', ['fp32'])})
        dtypes = ['bf16', 'fp16']
        out = dict(runs={'eager': self._throughput_run('train', [OURS, PEER], ['fast', 'checkpointed', 'reference',
                                                                            'timm'], 'train', dtypes)})
        errors = []
        for dtype in dtypes:
            name = f'compiled_{dtype}'
            left = self.remaining() - self.reserve()
            if left < ESTIMATE_S['train_compiled']:
                out['runs'][name] = (f'skipped: time budget ({left:.0f} s left after the estimates of '
                                     f'{", ".join(RESERVED)}; it needs ~{ESTIMATE_S["train_compiled"]} s)')
                continue
            try:
                out['runs'][name] = self._throughput_run(f'train_{name}', [OURS, PEER], ['fast', 'timm'], 'train',
                                                         [dtype], compile='yes', timeout=left)
            except StepFailed as e:
                out['runs'][name] = f'failed: {e}'
                errors.append(f'{name}: {e}')
        if errors:
            out.update(_failed=True, _error='; '.join(errors) + ' (the eager rows are kept)')
        return out

    def correctness(self) -> Dict:
        """Fused vs plain vs the released computation against the released code's logits (tests/data)."""
        with no_tf32():  # fp32 means fp32 here
            return self._correctness()

    def _correctness(self) -> Dict:
        import copy

        import timm
        import torch

        from scalablevit import ScalableViT
        throughput = throughput_module()
        reference = _load('scalablevit_test_reference', REPO / 'tests' / 'reference.py')
        dev = torch.device(self.device)
        dtypes = ['fp32', 'bf16'] if self.dry_run else ['fp32', 'bf16', 'fp16']
        amp = {'bf16': torch.bfloat16, 'fp16': torch.float16}
        rows = []

        def run(model, x, dtype):
            with torch.no_grad(), torch.autocast(dev.type, dtype=amp.get(dtype, torch.float32),
                                                 enabled=dtype != 'fp32'):
                return model(x.to(dev)).float().cpu()

        names = ['tiny'] if self.dry_run else ['tiny', OURS]
        for name in names:
            data = reference.load_reference(name)
            if name == 'tiny':
                model = ScalableViT(**data['config'])
            else:
                model = timm.create_model(name)
            reference.fill_by_name(model)
            model.eval()
            plain = copy.deepcopy(model)
            plain.set_fused_attn(False)
            released = throughput.make_reference(model)
            x = reference.fixed_input(2, 224)
            for path, m in (('fused', model), ('plain', plain), ('released', released)):
                m.to(dev)
                for dtype in dtypes:
                    err = _rel_err(run(m, x, dtype), data['logits'])
                    rows.append(dict(model=name, path=path, dtype=dtype, input='2x3x224x224', against='released logits',
                                     rel_err=err, tol=TOLERANCE[dtype], ok=err <= TOLERANCE[dtype]))
            # odd sizes (padding and masking; the released code has no such path): fused vs plain, same dtype
            sizes = [(61, 83)] if self.dry_run else [(97, 131), (200, 150), (225, 333)]
            for h, w in sizes:
                x = torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(h * w))
                for dtype in dtypes:
                    err = _rel_err(run(model, x, dtype), run(plain, x, 'fp32'))
                    rows.append(dict(model=name, path='fused', dtype=dtype, input=f'2x3x{h}x{w}', against='plain fp32',
                                     rel_err=err, tol=TOLERANCE[dtype], ok=err <= TOLERANCE[dtype]))
            del model, plain, released
        bad = [r for r in rows if not r['ok']]
        out = dict(rows=rows, tolerances=TOLERANCE)
        if bad:
            out.update(_failed=True, _error=f'{len(bad)} of {len(rows)} comparisons over tolerance, e.g. '
                                            f'{bad[0]["model"]} {bad[0]["path"]} {bad[0]["dtype"]} {bad[0]["input"]}: '
                                            f'{bad[0]["rel_err"]:.2e} > {bad[0]["tol"]:.0e}')
        return out

    def throughput(self) -> Dict:
        """Inference rows: S/B/L fast vs reference and the nine peers, fp16 and bf16 (dry run: tiny S and the
        smallest PVTv2, fp32)."""
        if self.dry_run:
            return self._throughput_run('infer', [OURS, DRY_PEER], ['fast', 'reference', 'timm'], 'infer', ['fp32'])
        return self._throughput_run('infer', ['all'], ['fast', 'reference', 'timm'], 'infer', ['fp16', 'bf16'])

    def throughput_compiled(self) -> Dict:
        """Inference under torch.compile: S fast, optimized and reference and Swin-T, fp16 (dry run: one small
        compile, optimize_for_inference of a one-stage model at 56 px)."""
        if self.dry_run:
            return self._throughput_run('compiled', [OURS], ['optimized'], 'infer', ['fp32'], compile='yes',
                                        extra=['--model-args', json.dumps(MICRO_ARGS), '--img-size', '56', '--no-mem'])
        return self._throughput_run('compiled', [OURS, PEER], ['fast', 'optimized', 'reference', 'timm'], 'infer',
                                    ['fp16'], compile='yes', extra=['--repeats', '5', '--iters', '10', '--no-mem'],
                                    timeout=420)

    def _throughput_run(self, tag: str, models: List[str], impls: List[str], mode: str, dtypes: List[str],
                        compile: str = 'no', extra: Sequence[str] = (), timeout: float = 300) -> Dict:
        """One ``throughput.py`` process (batch 64 on CUDA; batch 1 and the tiny model in the dry run); its rows
        join ``throughput_rows`` tagged ``run=tag`` and its table the Markdown summary."""
        path = self.work / f'throughput_{tag}.json'
        cmd = self.python() + [str(REPO / 'benchmarks' / 'throughput.py'), '--json', str(path), '--models', *models,
                               '--impl', *impls, '--mode', mode, '--dtype', *dtypes,
                               '--compile', compile]
        if self.dry_run:
            cmd += ['--device', 'cpu', '--batch', '1', '--warmup', '0', '--repeats', '1', '--iters', '1']
            if '--model-args' not in extra:
                cmd += ['--model-args', json.dumps(TINY_ARGS)]
        else:
            cmd += ['--device', 'cuda', '--batch', '64', '--warmup', '3', '--repeats', '3', '--iters', '5']
        text = self.sh(cmd + list(extra), timeout=900 if self.dry_run else timeout)
        rows = json.loads(path.read_text())
        for r in rows:
            r.pop('times_s', None)
            r['run'] = tag
        self.throughput_rows += rows
        lines = text.splitlines()
        header = [line for line in lines if line.startswith('device ')]
        table = [line for line in lines if line.startswith('|')]
        summary = [f'- {line}' for line in lines if line.startswith('GEMM limit') or ' vs reference ' in line]
        self.throughput_tables.append(f'### {tag}\n\n' + '\n'.join(header + [''] + table + [''] + summary))
        summary_path = path.with_suffix('.summary.json')
        found = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
        return dict(rows=len(rows), summary=found.get('summary', []), limits=found.get('limits_gflop_per_s', {}))

    def pyramid(self, kind: str) -> Dict:
        """S's feature pyramid (timm ``features_only``, the four stage maps, random weights) at the detection or
        segmentation input size: images/s and peak memory of inference and of a training step (forward, the sum
        of the maps' means as the loss, backward), per autocast dtype. Needs neither mmcv nor mmengine."""
        import timm
        import torch

        import scalablevit  # noqa: F401  (registers the models with timm)
        (h, w), batch = ((64, 96), 2) if self.dry_run else PYRAMID[kind]
        dev = torch.device(self.device)
        model = timm.create_model(OURS, features_only=True, out_indices=(0, 1, 2, 3),
                                  **(TINY_ARGS if self.dry_run else {})).to(dev)
        x = torch.randn(batch, 3, h, w, device=dev)
        with torch.no_grad():
            shapes = [list(f.shape[1:]) for f in model(x)]
        rows = [dict(dtype=dtype, mode=mode, **self._pyramid_row(model, x, dtype, mode))
                for dtype in (['fp32'] if self.dry_run else ['bf16', 'fp16']) for mode in ('infer', 'train')]
        del model, x
        return dict(model=OURS + (' (tiny)' if self.dry_run else ''), input=f'{batch}x3x{h}x{w}', batch=batch,
                    maps=shapes, rows=rows)

    def _pyramid_row(self, model, x, dtype: str, mode: str) -> Dict:
        """Median images/s over repeats of a few steps, and the peak memory of one step."""
        import gc
        import statistics

        import torch
        throughput = throughput_module()
        amp = {'bf16': torch.bfloat16, 'fp16': torch.float16}.get(dtype)
        model.train(mode == 'train')

        def step():
            if mode == 'infer':
                with torch.inference_mode(), torch.autocast(x.device.type, dtype=amp, enabled=amp is not None):
                    model(x)
                return
            with torch.autocast(x.device.type, dtype=amp, enabled=amp is not None):
                loss = sum(f.float().mean() for f in model(x))
            loss.backward()
            model.zero_grad(set_to_none=True)

        warmup, repeats, iters = (1, 1, 1) if self.dry_run else (3, 5, 5)
        for _ in range(warmup):
            step()
        times = []
        for _ in range(repeats):
            throughput.sync(x.device)
            t = time.perf_counter()
            for _ in range(iters):
                step()
            throughput.sync(x.device)
            times.append((time.perf_counter() - t) / iters)
        if x.device.type == 'cuda':  # the whole process's high-water mark: this model, its input and one step
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(x.device)
            step()
            throughput.sync(x.device)
            peak = torch.cuda.max_memory_allocated(x.device)
        else:  # the step's own allocations (the profiler's events)
            peak = throughput.cpu_peak_bytes(step)
        s = statistics.median(times)
        return dict(img_per_s=round(x.shape[0] / s, 2), ms_per_step=round(1e3 * s, 2),
                    peak_mem_mb=round(peak / 2 ** 20, 1))

    def cls_train(self, amp_dtype: str) -> Dict:
        out_dir = self.work / f'cls_{amp_dtype}'
        shutil.rmtree(out_dir, ignore_errors=True)
        cmd = self.python() + ['-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=1',
                               'main.py', '--data-set', 'DIGITS', '--model', 'scalable_vit_small', '--epochs', '1',
                               '--warmup-epochs', '0', '--mixup', '0', '--cutmix', '0', '--smoothing', '0',
                               '--output_dir', str(out_dir), '--seed', '0']
        if self.dry_run:
            cmd += ['--no-amp']  # without AVX512-BF16/AMX a CPU emulates fp16 and bf16 20-100x slower than fp32
        else:
            cmd += ['--amp', '--amp-dtype', amp_dtype]
        if self.dry_run:
            cmd += ['--device', 'cpu', '--model-kwargs', *CLS_TINY_KWARGS, '--input-size', '32', '--batch-size', '256',
                    '--num_workers', '0', '--drop-path', '0']
        else:
            cmd += ['--input-size', '224', '--batch-size', '28', '--num_workers', '4', '--drop-path', '0.1']
        t = time.time()
        text = self.sh(cmd, cwd=REPO / 'classification', timeout=600 if self.dry_run else 240)
        wall = time.time() - t
        log = out_dir / 'log.txt'
        if not log.is_file():
            raise StepFailed(f'no {log.name} written in {out_dir}')
        stats = json.loads(log.read_text().strip().splitlines()[-1])
        steps = [int(n) for n in re.findall(r'Epoch: \[0\]\s*\[\s*\d+/(\d+)\]', text)]
        out = dict(amp_dtype='float32' if '--no-amp' in cmd else amp_dtype, steps=max(steps) if steps else None,
                   wall_s=round(wall, 1),
                   train_loss=stats.get('train_loss'), test_acc1=stats.get('test_acc1'),
                   backend='nccl' if self.device == 'cuda' else 'gloo')
        if not (isinstance(out['train_loss'], float) and math.isfinite(out['train_loss'])):
            out.update(_failed=True, _error=f'train_loss is {out["train_loss"]!r}')
        return out

    def cls_throughput(self) -> Dict:
        out = {}
        for model in ['scalable_vit_small', 'scalable_vit_base', 'scalable_vit_large']:
            cmd = self.python() + ['main.py', '--throughput', '--model', model, '--output_dir', '']
            if self.dry_run:
                cmd += ['--device', 'cpu', '--model-kwargs', *CLS_TINY_KWARGS, '--input-size', '32', '--batch-size',
                        '2', '--no-amp']
                if model != 'scalable_vit_small':
                    continue  # the tiny kwargs are one model; B and L differ only by name
            else:
                cmd += ['--batch-size', '64']
            text = self.sh(cmd, cwd=REPO / 'classification', timeout=120)
            found = re.findall(r'throughput: ([\d.]+) images/s(.*)', text)
            if not found:
                raise StepFailed(f'no "throughput: ... images/s" line from main.py --throughput --model {model}')
            out[model] = dict(img_per_s=float(found[-1][0]), line=found[-1][1].strip()[:200])
        return out

    def mm_train(self, kind: str) -> Dict:
        folder = REPO / ('detection' if kind == 'det' else 'segmentation')
        work_dir = self.work / f'{kind}_train'
        shutil.rmtree(work_dir, ignore_errors=True)
        if kind == 'det':
            self.sh(self.python() + ['tools/make_tiny_coco.py'], cwd=folder, timeout=120)
            epochs = 1 if self.dry_run else 2  # 8 iterations per epoch (16 images, 2 per batch), then validation
            opts = [f'train_cfg.max_epochs={epochs}', f'train_cfg.val_interval={epochs}',
                    'default_hooks.logger.interval=2']
            config = DET_TINY
        else:
            self.sh(self.python() + ['tools/make_tiny_ade.py'], cwd=folder, timeout=120)
            iters = 4 if self.dry_run else 10
            opts = [f'train_cfg.max_iters={iters}', f'train_cfg.val_interval={iters}',
                    f'default_hooks.checkpoint.interval={iters}', 'default_hooks.logger.interval=2']
            config = SEG_TINY
        text = self.sh(self.python() + ['train.py', config, '--work-dir', str(work_dir), '--cfg-options', *opts],
                       cwd=folder, timeout=240)
        train = [line for line in text.splitlines() if '(train)' in line]
        iters_seen = [m.group(1) for line in train for m in [re.search(r'\[(\d+/\d+)\]\s', line)] if m]
        times = [float(t) for line in train for t in re.findall(r'\btime: ([\d.]+)', line)]
        metric = re.findall(r'(coco/bbox_mAP|mIoU): (-?[\d.]+)', text)
        if not iters_seen:
            raise StepFailed('no training iteration in the log')
        return dict(config=config, cfg_options=opts, last_train_iter=iters_seen[-1],
                    s_per_iter_last=times[-1] if times else None, metric=dict(metric[-1:]) or None)

    def mm_fps(self, kind: str) -> Dict:
        folder = REPO / ('detection' if kind == 'det' else 'segmentation')
        if self.dry_run:
            config, shape, iters = (DET_TINY if kind == 'det' else SEG_TINY), (64, 96), 2
        else:
            config, shape, iters = (DET_CONFIG, (800, 1333), 30) if kind == 'det' else (SEG_CONFIG, (512, 2048), 30)
        cmd = self.python() + [str(HERE / 'device_fps.py'), kind, '--config', str(folder / config),
                               '--device', self.device, '--shape', str(shape[0]), str(shape[1]), '--iters', str(iters)]
        text = self.sh(cmd, cwd=folder, timeout=240)
        found = [line for line in text.splitlines() if line.startswith('FPS_RESULT ')]
        if not found:
            raise StepFailed('no FPS_RESULT line')
        return json.loads(found[-1][len('FPS_RESULT '):])

    # ---------------------------------------------------------------------------------------------------------------
    # results
    # ---------------------------------------------------------------------------------------------------------------

    def write(self):
        result = dict(steps=self.steps, throughput_rows=self.throughput_rows, budget_s=self.budget_s,
                      elapsed_s=round(time.time() - self.t0, 1), dry_run=self.dry_run, device=self.device)
        (self.out / 'device_check.json').write_text(json.dumps(result, indent=1, default=str))
        (self.out / 'device_check.md').write_text(self.markdown())

    def markdown(self) -> str:
        return report.markdown(self.steps, self.throughput_rows, self.throughput_tables, self.dry_run,
                               time.time() - self.t0, self.budget_s)

    def _targets(self) -> List[str]:
        return report.targets(self.throughput_rows, self.dry_run)


def _text(x) -> str:
    return x.decode(errors='replace') if isinstance(x, bytes) else (x or '')


def _rel_err(a, b) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12)).item()


def main(argv: Optional[Sequence[str]] = None):
    parser = argparse.ArgumentParser(description='One-shot GPU check of ScalableViT (see the module docstring).')
    parser.add_argument('--out', default=None,
                        help='results folder (default: $OUT, else benchmarks/results/device_check-<time>)')
    parser.add_argument('--work', default=None, help='scratch folder (default: a temporary folder, removed)')
    parser.add_argument('--dry-run', action='store_true', help='every step on CPU with tiny sizes (CI)')
    parser.add_argument('--budget-s', type=float, default=450., help='time budget; steps that do not fit are skipped')
    parser.add_argument('--only', nargs='+', default=None, help='run only these steps')
    args = parser.parse_args(argv)

    import torch
    device = 'cpu' if args.dry_run else 'cuda'
    if device == 'cuda' and not torch.cuda.is_available():
        raise SystemExit('device_check: no CUDA device visible (torch.cuda.is_available() is False); '
                         'use --dry-run for the CPU rehearsal')
    out = Path(args.out or os.environ.get('OUT') or REPO / 'benchmarks' / 'results' /
               f'device_check-{time.strftime("%Y%m%d-%H%M%S")}')
    tmp = None if args.work else tempfile.mkdtemp(prefix='device_check_')
    work = Path(args.work or tmp)
    check = DeviceCheck(out, work, args.dry_run, device, args.budget_s, args.only)
    print(f'[device_check] {"dry run on CPU" if args.dry_run else "CUDA"}; results in {out}', flush=True)
    no_det, no_seg = needs('mmcv/mmdet', 'mmcv.ops', 'mmdet'), needs('mmcv/mmseg', 'mmcv.ops', 'mmseg')
    no_torchvision = needs('torchvision', 'torchvision')
    try:
        # most important first: what is left when the budget runs out is what a later run can do with --only
        check.step('env', check.env)
        check.step('train', check.train)
        check.step('correctness', check.correctness)
        check.step('throughput', check.throughput)
        check.step('det_pyramid', lambda: check.pyramid('det'))
        check.step('seg_pyramid', lambda: check.pyramid('seg'))
        check.step('cls_train_fp16', lambda: check.cls_train('float16'), skip=no_torchvision)
        check.step('cls_train_bf16', lambda: check.cls_train('bfloat16'), skip=no_torchvision,
                   dry_run_skip='on CPU both training steps run in fp32, so this would repeat cls_train_fp16')
        check.step('det_train', lambda: check.mm_train('det'), skip=no_det)
        check.step('seg_train', lambda: check.mm_train('seg'), skip=no_seg)
        check.step('det_fps', lambda: check.mm_fps('det'), skip=no_det)
        check.step('seg_fps', lambda: check.mm_fps('seg'), skip=no_seg)
        check.step('cls_throughput', check.cls_throughput, skip=no_torchvision)
        check.step('throughput_compiled', check.throughput_compiled)
    finally:
        check.write()
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    failed = [s['name'] for s in check.steps if s['status'] == 'failed']
    print(f'[device_check] done in {time.time() - check.t0:.0f} s; {len(check.steps)} steps, failed: '
          f'{", ".join(failed) or "none"}; see {out / "device_check.md"}', flush=True)
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
