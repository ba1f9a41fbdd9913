"""The report of ``benchmarks/device_check.py``: ``device_check.md`` from its steps and throughput rows, as pure
functions (no state, no I/O), so a report can be rebuilt from a ``device_check.json``.

The speed targets (:func:`targets`): ScalableViT-S's training step at least 1.3x the eager reference at no more
than 0.7x its peak memory, inference at least 1.5x (either by any form of ours: eager, compiled, optimized,
checkpointed), and S ahead of the peer (Swin-T; PVTv2-b0 in the dry run) at equal batch.
"""
import json
from typing import Dict, List, Optional, Sequence

OURS = 'scalable_vit_small'
PEER = 'swin_tiny_patch4_window7_224'  # the peer of the targets; the dry run's is the smallest PVTv2
DRY_PEER = 'pvt_v2_b0'
OUR_FORMS = ('fast', 'optimized', 'checkpointed')  # throughput.py's forms of the library model (not the reference)
DATA_STEPS = ('train', 'cls_train_fp16', 'cls_train_bf16', 'cls_throughput', 'det_train', 'seg_train', 'det_fps',
              'seg_fps')  # shown as their JSON


def form(row: Dict) -> str:
    """How a row of ours ran: eager, compiled, optimized, checkpointed, checkpointed compiled."""
    if row['impl'] == 'optimized':
        return 'optimized'
    if row['impl'] == 'checkpointed':
        return 'checkpointed compiled' if row['compiled'] else 'checkpointed'
    return 'compiled' if row['compiled'] else 'eager'


def select(rows: Sequence[Dict], model: str, impls: Sequence[str], mode: str, dtype: str,
           compiled: Optional[bool] = None, like: Optional[Dict] = None) -> List[Dict]:
    """The rows of ``model`` in ``impls``, ``mode``, ``dtype`` (and ``compiled``); with ``like``, only those at its
    batch and image size."""
    return [r for r in rows if r['model'] == model and r['impl'] in impls and r['mode'] == mode
            and r['dtype'] == dtype and (compiled is None or r['compiled'] == compiled)
            and (like is None or (r['batch'], r.get('img_size')) == (like['batch'], like.get('img_size')))]


def vs_reference(rows: Sequence[Dict], mode: str, dtype: str) -> List[str]:
    """One line: each form of ours (eager, compiled, optimized) against the eager reference, and the verdict."""
    ref = next(iter(select(rows, OURS, ['reference'], mode, dtype, compiled=False)), None)
    ours = select(rows, OURS, OUR_FORMS, mode, dtype, like=ref) if ref else []
    if not ours:
        return []
    forms, met = [], []
    for r in sorted(ours, key=lambda r: (r['impl'], r['compiled'])):
        x = r['img_per_s'] / ref['img_per_s']
        m = r['peak_mem_mb'] / ref['peak_mem_mb'] if r.get('peak_mem_mb') and ref.get('peak_mem_mb') else None
        forms.append(f'{form(r)} {x:.2f}x' + ('' if m is None else f' at {m:.2f}x the peak memory'))
        if x >= (1.3 if mode == 'train' else 1.5) and (mode == 'infer' or (m is not None and m <= 0.7)):
            met.append(form(r))
    target = '>= 1.3x at <= 0.7x the peak memory' if mode == 'train' else '>= 1.5x'
    what = 'training step' if mode == 'train' else 'inference'
    verdict = f'met ({", ".join(met)})' if met else 'missed'
    return [f'- S {dtype} {what}, batch {ref["batch"]}, vs the eager reference: {"; ".join(forms)} '
            f'(target {target}: {verdict})']


def vs_peer(rows: Sequence[Dict], peer: str, mode: str, dtype: str) -> List[str]:
    """S against the peer at equal batch, eager against eager and compiled against compiled."""
    out = []
    for compiled in (False, True):
        for p in select(rows, peer, ['timm'], mode, dtype, compiled=compiled):
            s = next(iter(select(rows, OURS, ['fast'], mode, dtype, compiled=compiled, like=p)), None)
            if s:
                ahead = 'ahead' if s['img_per_s'] > p['img_per_s'] else 'behind'
                out.append(f'- S vs {peer}, {dtype} {"training step" if mode == "train" else "inference"} '
                           f'{"compiled" if compiled else "eager"}, batch {p["batch"]}: {s["img_per_s"]:.1f} vs '
                           f'{p["img_per_s"]:.1f} img/s ({ahead})')
    return out


def targets(rows: Sequence[Dict], dry_run: bool) -> List[str]:
    """The speed targets, from the throughput rows."""
    if not rows:
        return ['No throughput rows (steps skipped or failed).']
    out = [line for dtype in ('fp16', 'bf16', 'fp32') for mode in ('train', 'infer')
           for line in vs_reference(rows, mode, dtype)]
    peer = DRY_PEER if dry_run else PEER
    out += [line for mode in ('train', 'infer') for line in vs_peer(rows, peer, mode, 'fp32' if dry_run else 'bf16')]
    return out or ['No ScalableViT-S fast/reference pairs among the rows.']


def _step_data(steps: Sequence[Dict], name: str) -> Optional[Dict]:
    return next((s['data'] for s in steps if s['name'] == name and s['data']), None)


def _header(steps: Sequence[Dict], dry_run: bool, elapsed_s: float, budget_s: float) -> List[str]:
    env = next((s['data'] for s in steps if s['name'] == 'env'), {}) or {}
    lines = [f'# Device check{" (dry run on CPU)" if dry_run else ""}', '',
             f'Device: {env.get("gpu", env.get("device", "?"))}; torch {env.get("torch", "?")}, '
             f'CUDA {env.get("cuda", "-")}, timm {env.get("timm", "?")}, mmdet {env.get("mmdet", "-")}, '
             f'mmseg {env.get("mmseg", "-")}. Elapsed {elapsed_s:.0f} s of a {budget_s:.0f} s budget.', '',
             '| step | status | seconds | note |', '| --- | --- | --- | --- |']
    return lines + [f'| {s["name"]} | {s["status"]} | {s["seconds"]} | {(s["error"] or "").replace("|", "/")} |'
                    for s in steps]


def _correctness(steps: Sequence[Dict]) -> List[str]:
    corr = _step_data(steps, 'correctness')
    if not corr:
        return []
    return ['', '## Correctness (max |out - ref| / max |ref| of the logits)', '',
            '| model | path | dtype | input | against | rel. error | tolerance | ok |',
            '| --- | --- | --- | --- | --- | --- | --- | --- |'] + [
        f'| {r["model"]} | {r["path"]} | {r["dtype"]} | {r["input"]} | {r["against"]} | {r["rel_err"]:.2e} | '
        f'{r["tol"]:.0e} | {"yes" if r["ok"] else "**no**"} |' for r in corr['rows']]


def _pyramids(steps: Sequence[Dict]) -> List[str]:
    pyramids = [(s['name'], s['data']) for s in steps if s['name'].endswith('_pyramid') and s['data']]
    if not pyramids:
        return []
    return ['', '## Feature pyramid of the backbone (timm features_only, random weights)', '',
            '| step | model | input | dtype | mode | img/s | ms/step | peak MB |',
            '| --- | --- | --- | --- | --- | --- | --- | --- |'] + [
        f'| {name} | {d["model"]} | {d["input"]} | {r["dtype"]} | {r["mode"]} | {r["img_per_s"]} | '
        f'{r["ms_per_step"]} | {r["peak_mem_mb"]} |' for name, d in pyramids for r in d['rows']]


def markdown(steps: Sequence[Dict], throughput_rows: Sequence[Dict], throughput_tables: Sequence[str],
             dry_run: bool, elapsed_s: float, budget_s: float) -> str:
    """``device_check.md``: the steps, the targets, correctness, pyramids, the other steps' numbers, the tables."""
    lines = _header(steps, dry_run, elapsed_s, budget_s)
    lines += ['', '## Targets', ''] + targets(throughput_rows, dry_run)
    lines += _correctness(steps) + _pyramids(steps)
    for name in DATA_STEPS:
        data = _step_data(steps, name)
        if data:
            lines += ['', f'## {name}', '', '```', json.dumps(data, indent=1, default=str), '```']
    if throughput_tables:
        lines += ['', '## Throughput (benchmarks/throughput.py)']
    for table in throughput_tables:
        lines += ['', table]
    return '\n'.join(lines) + '\n'
