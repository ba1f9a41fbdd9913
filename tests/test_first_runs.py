"""The first runs ("First run" in detection/README.md and segmentation/README.md), shortened for CI, and the
pretraining chain of the root README (classification --data-set SHAPES -> tools/convert_checkpoint.py -> the det/seg
backbone init).

Each first-run test trains the first-run config itself, through ``train.py`` as the README does, on fewer images of
the same scenes (the README's generators, smaller counts) for a shortened schedule, and reads the validation on the
held-out images at the end. It runs the same config untrained too (the learning rate at 0 for a few iterations:
the weights stay at their initialisation) and checks that the untrained model stays below ``LEVELS`` and the
trained one passes it.
"""
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
DET, SEG = ROOT / 'detection', ROOT / 'segmentation'
RETINANET = 'configs/tiny/retinanet_scalablevit-tiny_fpn_1xb8-20e_shapes.py'
MASK_RCNN = 'configs/tiny/mask-rcnn_scalablevit-tiny_fpn_1xb8-10e_shapes.py'
FPN = 'configs/tiny/scalablevit-tiny_fpn_1xb8-1k_shapes-128x128.py'
UPERNET = 'configs/tiny/scalablevit-tiny_upernet_1xb8-1k_shapes-128x128.py'

NUM_TRAIN, NUM_VAL = 96, 24  # images of the shortened runs (the first runs: 400 and 100)
DET_EPOCHS, SEG_ITERS = 8, 150  # 96 iterations of 8 images; 150 iterations of 8 images

# the level a shortened run passes and the same model untrained does not reach (both checked in each test)
LEVELS = {'bbox_mAP': 0.1, 'segm_mAP': 0.1, 'mIoU': 25.0}  # untrained: about 0.0 mAP and 3 mIoU


def _train(task_dir: Path, config: str, data_root, work_dir, *options: str) -> str:
    """``python train.py CONFIG --data-root ... --cfg-options ...`` in ``task_dir``; returns stdout + stderr."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS='1')  # small models: one thread, as the other tests
    env.pop('TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD', None)
    cmd = [sys.executable, 'train.py', config, '--work-dir', str(work_dir), '--data-root', str(data_root),
           '--cfg-options', *options]
    proc = subprocess.run(cmd, cwd=task_dir, env=env, capture_output=True, text=True, timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f'{" ".join(cmd)} failed:\n{out[-6000:]}'
    return out


def det_schedule(epochs: int):
    """``--cfg-options`` that shorten a detection first run to ``epochs`` (its cosine decay too)."""
    return [f'train_cfg.max_epochs={epochs}', f'train_cfg.val_interval={epochs}', f'param_scheduler.1.end={epochs}',
            f'param_scheduler.1.T_max={epochs}', f'default_hooks.checkpoint.interval={epochs}']


def seg_schedule(iters: int):
    """``--cfg-options`` that shorten a segmentation first run to ``iters`` (its linear decay too)."""
    return [f'train_cfg.max_iters={iters}', f'train_cfg.val_interval={iters}', f'param_scheduler.1.end={iters}',
            f'default_hooks.checkpoint.interval={iters}', 'default_hooks.logger.interval=10']


def last_metric(out: str, name: str) -> float:
    """The last logged validation value of ``name`` (``bbox_mAP``, ``segm_mAP`` as ``coco/...``; ``mIoU``)."""
    pattern = rf'coco/{name}: (-?[\d.]+)' if name.endswith('_mAP') else rf'{name}: ([\d.]+)'
    found = re.findall(pattern, out)
    assert found, f'no {name} in the output:\n{out[-4000:]}'
    return float(found[-1])


@pytest.fixture(scope='module')
def coco_shapes(tmp_path_factory, load_script):
    make_tiny_coco = load_script('detection/tools/make_tiny_coco.py').make_tiny_coco
    return make_tiny_coco(str(tmp_path_factory.mktemp('shapes_coco')), NUM_TRAIN, NUM_VAL, size=128, seed=0)


@pytest.fixture(scope='module')
def ade_shapes(tmp_path_factory, load_script):
    make_tiny_ade = load_script('segmentation/tools/make_tiny_ade.py').make_tiny_ade
    return make_tiny_ade(str(tmp_path_factory.mktemp('shapes_ade')), size=128, num_train=NUM_TRAIN,
                         num_val=NUM_VAL, seed=0, shape_scenes=True)


# ---------------------------------------------------------------------------------------------------------------------
# The data

def test_scene_labels_are_the_drawn_pixels():
    """Every shape's pixels in the label map have the shape's colour in the image; all classes occur."""
    from PIL import Image, ImageDraw

    from scalablevit import shapes
    rng = np.random.default_rng(3)
    seen = set()
    for _ in range(20):
        image, objects = shapes.scene(rng, 128)
        labels = shapes.label_map(128, objects)
        assert image.shape == (128, 128, 3) and image.dtype == np.uint8 and 1 <= len(objects) <= 3
        assert set(np.unique(labels)) == {0} | {o.category + 1 for o in objects}
        for obj in objects:
            seen.add(obj.category)
            mask = Image.new('L', (128, 128), 0)
            ImageDraw.Draw(mask).polygon(obj.vertices(), fill=1)
            inside = np.asarray(mask).astype(bool)
            assert (labels[inside] == obj.category + 1).all() and (image[inside] == obj.colour).all()
    assert seen == {0, 1, 2}


def test_coco_and_ade_shapes_are_the_same_scenes(coco_shapes, ade_shapes):
    """The det annotations and the seg labels of one seed are the same scenes: per image, the classes of the boxes
    are the classes of the label map, and each class's labelled pixels are its polygons' area (to 20%: the drawn
    outline adds a rim)."""
    import json

    from PIL import Image
    with open(os.path.join(coco_shapes, 'annotations', 'instances_val2017.json')) as f:
        coco = json.load(f)
    assert [c['name'] for c in coco['categories']] == ['square', 'disc', 'triangle']
    for image in coco['images']:
        anns = [a for a in coco['annotations'] if a['image_id'] == image['id']]
        label = np.asarray(Image.open(os.path.join(
            ade_shapes, 'annotations', 'validation', f'ADE_val_{image["id"]:08d}.png')))
        assert set(np.unique(label)) == {1} | {a['category_id'] + 1 for a in anns}  # 1 background, 2..4 shapes
        for category in {a['category_id'] for a in anns}:
            area = sum(a['area'] for a in anns if a['category_id'] == category)
            assert abs((label == category + 1).sum() - area) < 0.2 * area


def test_shapes_data_set(cls_dir):
    """``--data-set SHAPES``: fixed, balanced, normalised as mmdet/mmseg do, train and val images distinct."""
    datasets = cls_dir('datasets')
    train, val = datasets.ShapesDataset(True, 64), datasets.ShapesDataset(False, 64)
    assert (len(train), len(val)) == (4000, 1000) and train.classes == ['square', 'disc', 'triangle']
    counts = np.bincount(val.targets, minlength=3)
    assert counts.min() > 0.28 * len(val)
    again = datasets.ShapesDataset(False, 64)
    assert np.array_equal(np.asarray(val.images[5]), np.asarray(again.images[5])) and val.targets == again.targets
    assert not any(np.array_equal(np.asarray(val.images[0]), np.asarray(img)) for img in train.images)
    x, y = val[0]
    assert x.shape == (3, 64, 64) and y == val.targets[0]
    image = torch.from_numpy(np.asarray(val.images[0])).permute(2, 0, 1).float()
    mean = torch.tensor([123.675, 116.28, 103.53]).view(3, 1, 1)  # mmdet's / mmseg's data_preprocessor, RGB
    std = torch.tensor([58.395, 57.12, 57.375]).view(3, 1, 1)
    torch.testing.assert_close(x, (image - mean) / std, atol=1e-3, rtol=0)


def readme_first_runs(task_dir: Path):
    """The shell blocks of ``task_dir``'s README section "First run", each as a list of commands (lines joined)."""
    text = (task_dir / 'README.md').read_text()
    section = re.search(r'^## First run.*?(?=^## )', text, re.S | re.M).group(0)
    blocks = re.findall(r'```shell\n(.*?)```', section, re.S)
    return [[' '.join(c.split()) for c in b.replace('\\\n', ' ').splitlines() if c.strip()] for b in blocks]


@pytest.mark.parametrize('task_dir, configs, data', [
    (DET, (RETINANET, MASK_RCNN), 'python tools/make_tiny_coco.py --out data/shapes --num-train 400 --num-val 100'),
    (SEG, (FPN, UPERNET), 'python tools/make_tiny_ade.py --shapes --out data/shapes --size 128 --train 400 --val 100'),
], ids=['detection', 'segmentation'])
def test_readme_first_runs_are_these(task_dir, configs, data):
    """Each README's "First run" is one block per config: the data command, train.py, then test.py on the checkpoint
    of the config's last epoch or iteration, in the work dir train.py picks; the data lands where the config reads."""
    from mmengine.config import Config
    blocks = readme_first_runs(task_dir)
    assert len(blocks) == len(configs)
    for commands, config in zip(blocks, configs):
        cfg = Config.fromfile(str(task_dir / config))
        last = (f'epoch_{cfg.train_cfg.max_epochs}.pth' if 'max_epochs' in cfg.train_cfg
                else f'iter_{cfg.train_cfg.max_iters}.pth')
        name = Path(config).stem
        assert commands == [f'cd {task_dir.name}', data, f'python train.py {config}',
                            f'python test.py {config} work_dirs/{name}/{last}']
        assert cfg.train_dataloader.dataset.data_root.startswith('data/shapes')


# ---------------------------------------------------------------------------------------------------------------------
# The four first runs, shortened
# ---------------------------------------------------------------------------------------------------------------------
# The four first runs, shortened

@pytest.mark.slow
@pytest.mark.parametrize('task_dir, config, data, schedule, metrics', [
    (DET, RETINANET, 'coco_shapes', det_schedule(DET_EPOCHS), ('bbox_mAP',)),
    (DET, MASK_RCNN, 'coco_shapes', det_schedule(DET_EPOCHS), ('bbox_mAP', 'segm_mAP')),
    (SEG, FPN, 'ade_shapes', seg_schedule(SEG_ITERS), ('mIoU',)),
    (SEG, UPERNET, 'ade_shapes', seg_schedule(SEG_ITERS), ('mIoU',)),
], ids=['retinanet', 'mask-rcnn', 'semantic-fpn', 'upernet'])
def test_first_run_learns(request, tmp_path, task_dir, config, data, schedule, metrics):
    data_root = request.getfixturevalue(data)
    short = det_schedule(1) if task_dir == DET else seg_schedule(25)
    untrained = _train(task_dir, config, data_root, tmp_path / 'untrained', *short, 'optim_wrapper.optimizer.lr=0.0')
    trained = _train(task_dir, config, data_root, tmp_path / 'work', *schedule)
    for name in metrics:
        before, after = last_metric(untrained, name), last_metric(trained, name)
        assert before < LEVELS[name] < after, f'{name}: {before} untrained, {after} after the shortened first run'


# ---------------------------------------------------------------------------------------------------------------------
# The chain: pretrain -> convert -> init -> train

def shapes_model_kwargs():
    """``--model-kwargs`` of the first runs' backbone, read from the segmentation first runs' config."""
    from mmengine.config import Config
    arch = Config.fromfile(str(SEG / 'configs' / '_base_' / 'shapes_ade.py')).shapes_arch
    return [f'{k}={",".join(map(str, v))}' for k, v in arch.items()] + ['mlp_head=False']


@pytest.mark.slow
def test_pretraining_chain(cls, cls_dir, tmp_path, ade_shapes, load_script, monkeypatch):
    import argparse

    from mmengine.config import Config

    from scalablevit.mm import ScalableViTBackbone

    datasets = cls_dir('datasets')
    monkeypatch.setattr(datasets.ShapesDataset, 'sizes', dict(train=(256, 0), val=(64, 1)))  # a few steps only
    out = tmp_path / 'shapes'
    argv = ['--data-set', 'SHAPES', '--model', 'scalable_vit_small', '--model-kwargs', *shapes_model_kwargs(),
            '--input-size', '64', '--batch-size', '64', '--epochs', '1', '--lr', '2e-3', '--unscale-lr',
            '--warmup-epochs', '0', '--mixup', '0', '--cutmix', '0', '--smoothing', '0', '--drop-path', '0',
            '--num_workers', '0', '--output_dir', str(out)]
    cls.main(argparse.ArgumentParser(parents=[cls.get_args_parser()]).parse_args(argv))
    classifier = torch.load(out / 'checkpoint.pth', map_location='cpu', weights_only=True)['model']

    backbone_file = out / 'backbone.pth'
    convert = load_script('tools/convert_checkpoint.py')
    assert convert.cli([str(out / 'checkpoint.pth'), str(backbone_file)]) == 0
    converted = torch.load(backbone_file, map_location='cpu', weights_only=True)['state_dict']
    assert set(classifier) - set(converted) == {k for k in classifier if k.startswith(('head.', 'norm.'))}

    # the first run's backbone, as its config builds it, loads every converted tensor as it is
    bb = Config.fromfile(str(SEG / FPN)).model.backbone.to_dict()
    bb = {k: v for k, v in bb.items() if k not in ('type', '_delete_', 'init_cfg')}
    backbone = ScalableViTBackbone(**bb, pretrained=str(backbone_file))
    backbone.init_weights()
    own = backbone.state_dict()
    assert sorted(set(own) - set(converted)) == sorted(k for k in own if k.startswith('out_norms.'))
    for k, v in converted.items():
        assert torch.equal(own[k], v) and torch.equal(v, classifier[k]), k

    # ... and the first run trains from it
    log = _train(SEG, FPN, ade_shapes, tmp_path / 'work', *seg_schedule(25),
                 f'model.backbone.pretrained={backbone_file}')
    assert f'ScalableViTBackbone: loaded {backbone_file}' in log
    losses = [float(v) for v in re.findall(r'\bloss: ([\d.]+)', log)]
    assert losses and all(math.isfinite(v) for v in losses), log[-3000:]
    back = tmp_path / 'trained_backbone.pth'  # the trained segmenter's backbone, read back by the same tool
    assert convert.cli([str(tmp_path / 'work' / 'iter_25.pth'), str(back)]) == 0
    trained = torch.load(back, map_location='cpu', weights_only=True)['state_dict']
    assert set(trained) == set(converted) | {'norm.weight', 'norm.bias'}
    assert not torch.equal(trained['patch_embeds.0.proj.weight'], converted['patch_embeds.0.proj.weight'])
