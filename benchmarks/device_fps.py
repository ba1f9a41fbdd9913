"""Inference speed of an mmdet / mmseg model with random weights, the way mmdet's benchmark tool times it:
``model.test_step`` on one preprocessed image, median of ``--iters`` after a warm-up, fp32 (and fp16 autocast on
CUDA), peak memory on CUDA. ``benchmarks/device_check.py`` runs it in a process of its own (one OpenMMLab default
scope per process) and reads the one ``FPS_RESULT {json}`` line it prints.

    python benchmarks/device_fps.py det --config detection/configs/X.py --device cuda --shape 800 1333 --iters 30
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Dict, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without installing


def test_input(kind: str, cfg, img):
    """``img`` (an HxWx3 uint8 array) through the config's test pipeline, as the inferencers feed a model:
    loaded from the array, no annotations."""
    from mmcv.transforms import Compose
    if kind == 'det':
        from mmdet.utils import get_test_pipeline_cfg
        steps = [dict(t) for t in get_test_pipeline_cfg(cfg)]
    else:
        steps = [dict(t) for t in cfg.test_pipeline]
    steps = [t for t in steps if t['type'] not in ('LoadAnnotations', 'mmdet.LoadAnnotations')]
    steps[0]['type'] = 'mmdet.LoadImageFromNDArray' if kind == 'det' else 'LoadImageFromNDArray'
    packed = Compose(steps)(dict(img=img, img_id=0))
    return dict(inputs=[packed['inputs']], data_samples=[packed['data_samples']])


def build(kind: str, config: str, device: str):
    """The config's model with random weights (speed only), in eval mode, and its config."""
    from mmengine.config import Config
    cfg = Config.fromfile(config)
    cfg.model.backbone.init_cfg = None
    if kind == 'det':
        from mmdet.apis import init_detector
        model = init_detector(cfg, None, device=device)
    else:
        from mmseg.apis import init_model
        model = init_model(cfg, None, device=device)
    return model.eval(), model.cfg


def time_test_step(model, data, device: str, iters: int, dtype: str) -> Dict[str, float]:
    """Images/s (median step) of ``model.test_step(data)`` in ``dtype`` and, on CUDA, the peak memory."""
    import torch
    ctx = torch.autocast('cuda', dtype=torch.float16) if dtype == 'fp16' else torch.autocast('cpu', enabled=False)
    warmup = max(2, iters // 5)
    times = []
    with torch.no_grad(), ctx:
        for _ in range(iters + warmup):
            if device == 'cuda':
                torch.cuda.synchronize()
            t = time.perf_counter()
            out = model.test_step(data)
            if device == 'cuda':
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
    times = sorted(times[warmup:])
    result = {f'{dtype}_fps': round(1 / times[len(times) // 2], 2), 'img_shape': out[0].metainfo.get('img_shape')}
    if device == 'cuda':
        result[f'{dtype}_peak_mem_mb'] = round(torch.cuda.max_memory_allocated() / 2 ** 20, 1)
    return result


def fps(kind: str, config: str, device: str, shape: Sequence[int], iters: int) -> Dict:
    import numpy as np
    model, cfg = build(kind, config, device)
    img = np.random.default_rng(0).integers(0, 256, (shape[0], shape[1], 3), dtype=np.uint8)
    data = test_input(kind, cfg, img)
    result = dict(config=os.path.basename(config), image=f'{shape[0]}x{shape[1]}', device=device, iters=iters)
    for dtype in (['fp32', 'fp16'] if device == 'cuda' else ['fp32']):
        row = time_test_step(model, data, device, iters, dtype)
        result['input_shape'] = list(row.pop('img_shape') or ())
        result.update(row)
    return result


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('kind', choices=['det', 'seg'])
    parser.add_argument('--config', required=True)
    parser.add_argument('--device', default='cuda')
    parser.add_argument('--shape', type=int, nargs=2, required=True, metavar=('H', 'W'))
    parser.add_argument('--iters', type=int, default=20)
    args = parser.parse_args(argv)
    print('FPS_RESULT ' + json.dumps(fps(args.kind, args.config, args.device, args.shape, args.iters)), flush=True)
    return 0


if __name__ == '__main__':
    sys.exit(main())
