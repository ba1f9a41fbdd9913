"""Detection and segmentation on a data set of the user's own, as the READMEs' "Your own data set" say.

The test makes the data: three classes (triangle, square, hexagon) that neither COCO nor ADE20K has, category ids
that are not 1..3, and image sizes that are not the tiny configs' 128 / 64. It runs the README's commands
(``--data-root``, ``--classes``; ``dist_train.sh`` / ``dist_test.sh`` with two CPU processes, no PORT set) and
checks every start-up check's one-line message.
"""
import json
import math
import os
import os.path as osp
import re
import subprocess
import sys

import mmdet  # noqa: F401  (the OpenMMLab stack is part of the install: no skipping)
import mmseg  # noqa: F401
import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
DET = osp.join(ROOT, 'detection')
SEG = osp.join(ROOT, 'segmentation')
RETINA = 'configs/tiny/retinanet_scalablevit-tiny_fpn_tiny-coco.py'
MASK = 'configs/tiny/mask-rcnn_scalablevit-tiny_fpn_tiny-coco.py'
FPN = 'configs/tiny/scalablevit-tiny_fpn_1xb2-40_tiny-ade-64x64.py'
UPERNET = 'configs/tiny/scalablevit-tiny_upernet_1xb2-40_tiny-ade-64x64.py'
CLASSES = ('triangle', 'square', 'hexagon')
CAT_IDS = {'triangle': 7, 'square': 3, 'hexagon': 12}  # COCO files need not number categories 1..N
SIDES = {'triangle': 3, 'square': 4, 'hexagon': 6}
COLOURS = {'triangle': (220, 40, 60), 'square': (40, 140, 230), 'hexagon': (30, 170, 40)}


def _polygon(name, cx, cy, r, phase):
    n = SIDES[name]
    return [(cx + r * math.cos(phase + 2 * math.pi * k / n), cy + r * math.sin(phase + 2 * math.pi * k / n))
            for k in range(n)]


def _scene(rng, width, height):
    """An image with 1-3 shapes that do not overlap: (RGB image, [(class name, polygon)])."""
    img = Image.fromarray(rng.normal(110, 20, size=(height, width, 3)).clip(0, 255).astype(np.uint8))
    draw, shapes, taken = ImageDraw.Draw(img), [], []
    for i in range(int(rng.integers(1, 4))):
        r = float(rng.uniform(0.15, 0.22) * min(width, height))
        cx, cy = rng.uniform(r + 1, width - r - 1), rng.uniform(r + 1, height - r - 1)
        if any(math.hypot(cx - x, cy - y) < r + q + 2 for x, y, q in taken):
            continue
        taken.append((cx, cy, r))
        name = CLASSES[int(rng.integers(0, 3))]
        poly = _polygon(name, cx, cy, r, float(rng.uniform(0, math.pi)))
        draw.polygon(poly, fill=COLOURS[name])
        shapes.append((name, poly))
    return img, shapes


def make_coco(root, num_train=8, num_val=4, seed=0):
    """COCO layout: root/annotations/instances_{train,val}2017.json, root/{train,val}2017/*.jpg."""
    rng = np.random.default_rng(seed)
    os.makedirs(osp.join(root, 'annotations'), exist_ok=True)
    for split, n in (('train2017', num_train), ('val2017', num_val)):
        os.makedirs(osp.join(root, split), exist_ok=True)
        images, anns = [], []
        for i in range(n):
            w, h = (160, 120) if i % 2 else (100, 140)
            img, shapes = _scene(rng, w, h)
            img.save(osp.join(root, split, f'{i:04d}.jpg'), quality=95)
            images.append(dict(id=i + 1, file_name=f'{i:04d}.jpg', width=w, height=h))
            for name, poly in shapes:
                xs, ys = [p[0] for p in poly], [p[1] for p in poly]
                area = 0.5 * abs(sum(xs[k] * ys[k - 1] - xs[k - 1] * ys[k] for k in range(len(xs))))
                anns.append(dict(id=len(anns) + 1, image_id=i + 1, category_id=CAT_IDS[name], iscrowd=0,
                                 area=area, bbox=[min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)],
                                 segmentation=[[v for p in poly for v in p]]))
        categories = [dict(id=CAT_IDS[n], name=n) for n in CLASSES]
        with open(osp.join(root, 'annotations', f'instances_{split}.json'), 'w') as f:
            json.dump(dict(images=images, annotations=anns, categories=categories), f)
    return root


def make_seg(root, num_train=8, num_val=4, seed=0):
    """ADE20K's layout: root/images/{training,validation}/*.jpg, root/annotations/{...}/*.png; label 0 = ignore
    (here: the background), 1..3 = triangle, square, hexagon."""
    rng = np.random.default_rng(seed)
    for split, n in (('training', num_train), ('validation', num_val)):
        os.makedirs(osp.join(root, 'images', split), exist_ok=True)
        os.makedirs(osp.join(root, 'annotations', split), exist_ok=True)
        for i in range(n):
            w, h = (96, 80) if i % 2 else (72, 100)
            img, shapes = _scene(rng, w, h)
            label = Image.new('L', (w, h), 0)
            draw = ImageDraw.Draw(label)
            for name, poly in shapes:
                draw.polygon(poly, fill=CLASSES.index(name) + 1)
            img.save(osp.join(root, 'images', split, f'{i:04d}.jpg'), quality=95)
            label.save(osp.join(root, 'annotations', split, f'{i:04d}.png'))
    return root


@pytest.fixture(scope='module')
def coco_root(tmp_path_factory):
    return make_coco(str(tmp_path_factory.mktemp('own_coco')))


@pytest.fixture(scope='module')
def seg_root(tmp_path_factory):
    return make_seg(str(tmp_path_factory.mktemp('own_seg')))


def _run(args, cwd, ok=True, timeout=900):
    env = dict(os.environ, PYTHONUNBUFFERED='1', OMP_NUM_THREADS='1')
    env.pop('PORT', None)  # dist_run.sh picks a free port
    env.pop('TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD', None)
    proc = subprocess.run(args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=timeout)
    if ok:
        assert proc.returncode == 0, proc.stdout[-6000:]
        return proc.stdout
    return proc.returncode, proc.stdout


def _one_line_error(rc, out, *fragments):
    """Failed with status 1, one `error:` line holding every fragment, no traceback."""
    errors = [line for line in out.splitlines() if line.startswith('error: ')]
    assert rc == 1 and len(errors) == 1, out[-4000:]
    assert 'Traceback' not in out, out[-4000:]
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


def _metric(out, key):
    found = re.findall(rf'{key}: (-?[\d.]+)', out)
    assert found, f'no {key} in the output:\n{out[-4000:]}'
    return [float(v) for v in found]


# ----------------------------------------------------------------------------------------------------------------
# The README's worked examples.

@pytest.mark.slow
def test_detection_retinanet_two_processes(coco_root, tmp_path):
    own = ['--data-root', coco_root, '--classes', ','.join(CLASSES)]
    work = str(tmp_path)
    out = _run(['bash', 'dist_train.sh', RETINA, '2', *own, '--work-dir', work,
                '--cfg-options', 'train_cfg.max_epochs=1', 'train_cfg.val_interval=1',
                'model.test_cfg.score_thr=0.001'],
               DET)  # (two iterations: RetinaNet's scores are still near their 0.01 prior)
    assert 'Distributed training: True' in out and 'Epoch(train) [1][2/2]' in out
    val = _metric(out, 'coco/bbox_mAP')
    for name in CLASSES:  # the per-class table names the user's classes
        assert re.search(rf'\|\s*{name}\s*\|', out), name
    out = _run(['bash', 'dist_test.sh', RETINA, f'{work}/epoch_1.pth', '2', *own, '--work-dir', work,
                '--eval', 'bbox', '--score-thr', '0.001'], DET)
    assert _metric(out, 'coco/bbox_mAP') == val[-1:]  # validation during training == testing the checkpoint
    assert re.search(r'\|\s*hexagon\s*\|', out)


@pytest.mark.slow
def test_detection_mask_rcnn_one_process(coco_root, tmp_path):
    own = ['--data-root', coco_root, '--classes', ','.join(CLASSES)]
    out = _run([sys.executable, 'train.py', MASK, *own, '--work-dir', str(tmp_path),
                '--cfg-options', 'train_cfg.max_epochs=1', 'train_cfg.val_interval=1'], DET)
    val = _metric(out, 'coco/segm_mAP')
    out = _run([sys.executable, 'test.py', MASK, str(tmp_path / 'epoch_1.pth'), *own, '--work-dir', str(tmp_path)],
               DET)
    assert _metric(out, 'coco/segm_mAP') == val and len(_metric(out, 'coco/bbox_mAP')) == 1
    assert re.search(r'\|\s*triangle\s*\|', out)


@pytest.fixture(scope='module')
def fpn_run(seg_root, tmp_path_factory):
    """Semantic FPN trained by two processes (SyncBN over gloo) on the own data, validated at the end."""
    work = tmp_path_factory.mktemp('own_fpn')
    out = _run(['bash', 'dist_train.sh', FPN, '2', '--data-root', seg_root, '--classes', ','.join(CLASSES),
                '--work-dir', str(work), '--cfg-options', 'train_cfg.max_iters=6', 'train_cfg.val_interval=6',
                'default_hooks.checkpoint.interval=6', 'param_scheduler.0.end=6'], SEG)
    return work, out


@pytest.mark.slow
def test_segmentation_fpn_validation_equals_test(fpn_run, seg_root):
    work, out = fpn_run
    assert 'Distributed training: True' in out
    for name in CLASSES:
        assert re.search(rf'\|\s*{name}\s*\|', out), name
    assert not re.search(r'\|\s*wall\s*\|', out)  # not ADE20K's names
    val = _metric(out, 'mIoU')
    own = ['--data-root', seg_root, '--classes', ','.join(CLASSES), '--work-dir', str(work)]
    single = _run([sys.executable, 'test.py', FPN, str(work / 'iter_6.pth'), *own], SEG)
    # Both processes kept the same BN statistics (SyncBN on CPU), so the checkpoint scores what validation did.
    # (tests/test_segmentation.py also tests it with two processes.)
    assert _metric(single, 'mIoU') == val


@pytest.mark.slow
def test_segmentation_upernet_and_aug_test_scales(seg_root, tmp_path):
    (tmp_path / 'classes.txt').write_text('\n'.join(CLASSES) + '\n')  # a classes file, one name a line
    own = ['--data-root', seg_root, '--classes', str(tmp_path / 'classes.txt'), '--work-dir', str(tmp_path)]
    out = _run([sys.executable, 'train.py', UPERNET, *own, '--cfg-options', 'train_cfg.max_iters=4',
                'train_cfg.val_interval=4', 'default_hooks.checkpoint.interval=4'], SEG)
    assert len(_metric(out, 'mIoU')) == 1 and re.search(r'\|\s*square\s*\|', out)
    # --aug-test: ratios 0.5..1.75 of the test scale, here changed to 96x96
    out = _run([sys.executable, 'test.py', UPERNET, str(tmp_path / 'iter_4.pth'), *own, '--aug-test',
                '--cfg-options', 'test_dataloader.dataset.pipeline.1.scale=(96,96)'], SEG)
    assert '--aug-test: scales [(48, 48), (72, 72), (96, 96), (120, 120), (144, 144), (168, 168)]' in out
    assert len(_metric(out, 'mIoU')) == 1


# ----------------------------------------------------------------------------------------------------------------
# The S configs take the same options: every loader, evaluator and head follows them.

@pytest.mark.parametrize('task, config', [
    ('det', 'retinanet_scalablevit-s_fpn_1x_coco.py'), ('det', 'mask-rcnn_scalablevit-s_fpn_ms-3x_coco.py'),
    ('seg', 'scalablevit-s_fpn_4xb4-80k_ade20k-512x512.py'),
    ('seg', 'scalablevit-b_upernet_8xb2-160k_ade20k-512x512.py'),
])
def test_s_configs_follow_data_root_and_classes(task, config, tmp_path):
    import argparse

    from scalablevit.mm.config import load_config
    from scalablevit.mm.data import LOADERS, apply_data_args, dataset_of
    folder = DET if task == 'det' else SEG
    args = argparse.Namespace(no_pretrained=True, data_root=str(tmp_path / 'mine'), classes='triangle,square,hexagon')
    from scalablevit.mm.tasks import DETECTION, SEGMENTATION
    cfg = apply_data_args(load_config(osp.join(folder, 'configs', config), folder), args,
                          DETECTION if task == 'det' else SEGMENTATION)
    assert cfg.model.backbone.init_cfg is None
    for key in LOADERS:
        ds = dataset_of(cfg[key])
        assert ds.data_root == str(tmp_path / 'mine') + '/' and tuple(ds.metainfo.classes) == CLASSES
        if task == 'seg':
            assert ds.type == 'BaseSegDataset' and ds.reduce_zero_label and ds.seg_map_suffix == '.png'
    heads = [cfg.model.roi_head.bbox_head, cfg.model.roi_head.mask_head] if 'mask' in config else \
        [cfg.model.bbox_head] if task == 'det' else [cfg.model.decode_head] + (
            [cfg.model.auxiliary_head] if 'upernet' in config else [])
    assert [h.num_classes for h in heads] == [3] * len(heads)
    if 'mask' in config:
        assert cfg.model.rpn_head.get('num_classes', 1) == 1  # the RPN's one "object" class stays
    if task == 'det':
        for key in ('val_evaluator', 'test_evaluator'):
            assert cfg[key].ann_file == str(tmp_path / 'mine' / 'annotations' / 'instances_val2017.json')


# ----------------------------------------------------------------------------------------------------------------
# Start-up checks: one line, status 1, before anything is built.

def _det_train(coco_root, *args, config=RETINA, cwd=DET):
    return _run([sys.executable, 'train.py', config, '--data-root', coco_root, *args], cwd, ok=False)


@pytest.mark.slow  # a subprocess that imports mmdet/mmseg: 5-20 s
def test_classes_missing_from_the_annotation_file(coco_root):
    rc, out = _det_train(coco_root)  # the tiny config's classes: square, disc, triangle
    _one_line_error(rc, out, '1 of the 3 classes are not in', 'disc', 'the file has triangle, square, hexagon',
                    '--classes triangle,square,hexagon')


@pytest.mark.slow  # a subprocess that imports mmdet/mmseg: 5-20 s
def test_classes_in_another_order_than_the_file(coco_root):
    rc, out = _det_train(coco_root, '--classes', 'square,triangle,hexagon')
    _one_line_error(rc, out, 'must be in the order of the categories', '--classes triangle,square,hexagon')


@pytest.mark.slow  # a subprocess that imports mmdet/mmseg: 5-20 s
def test_category_ids_missing_from_categories(tmp_path):
    root = make_coco(str(tmp_path / 'coco'), num_train=4, num_val=2)
    path = osp.join(root, 'annotations', 'instances_train2017.json')
    with open(path) as f:
        coco = json.load(f)
    coco['annotations'][0]['category_id'] = 99
    coco['annotations'][1]['category_id'] = 42
    with open(path, 'w') as f:
        json.dump(coco, f)
    rc, out = _det_train(root, '--classes', ','.join(CLASSES))
    _one_line_error(rc, out, '2 annotations in', 'category ids that its "categories" lacks: 42, 99')


@pytest.mark.slow  # a subprocess that imports mmdet/mmseg: 5-20 s
def test_label_values_above_the_classes(seg_root):
    rc, out = _run([sys.executable, 'train.py', FPN, '--data-root', seg_root, '--classes', 'triangle,square'], SEG,
                   ok=False)
    _one_line_error(rc, out, 'label values above the 2 classes', ': 3 (e.g.', 'reduce_zero_label')


@pytest.mark.slow  # a subprocess that imports mmdet/mmseg: 5-20 s
def test_num_classes_disagreeing_with_the_classes(coco_root):
    rc, out = _det_train(coco_root, '--cfg-options', 'model.bbox_head.num_classes=5')  # (--classes would set it)
    _one_line_error(rc, out, 'model.bbox_head.num_classes is 5 but train_dataloader has 3 classes')


@pytest.mark.slow  # a subprocess that imports mmdet/mmseg: 5-20 s
def test_missing_pretrained_weights_one_line_from_one_process(coco_root, tmp_path):
    args = ['configs/retinanet_scalablevit-s_fpn_1x_coco.py', '--data-root', coco_root,
            '--classes', ','.join(CLASSES), '--work-dir', str(tmp_path)]
    rc, out = _run(['bash', 'dist_train.sh', args[0], '2', *args[1:]], DET, ok=False)
    _one_line_error(rc, out, 'pretrained backbone weights not found: pretrained/scalable_vit_small.pth',
                    '--no-pretrained')


@pytest.mark.slow  # a subprocess that imports mmdet/mmseg: 5-20 s
def test_missing_data_root(tmp_path):
    rc, out = _run([sys.executable, 'train.py', FPN, '--data-root', str(tmp_path / 'none')], SEG, ok=False)
    _one_line_error(rc, out, 'data_root', 'does not exist')


@pytest.fixture(scope='module')
def retina_ckpt(coco_root, tmp_path_factory):
    """An untrained tiny RetinaNet checkpoint for the three classes (as mmengine saves it)."""
    import argparse

    from scalablevit.mm.config import build_model, load_config
    from scalablevit.mm.data import apply_data_args
    from scalablevit.mm.tasks import DETECTION
    args = argparse.Namespace(data_root=coco_root, classes=','.join(CLASSES))
    cfg = apply_data_args(load_config(osp.join(DET, RETINA), DET), args, DETECTION)
    torch.manual_seed(0)
    path = str(tmp_path_factory.mktemp('ckpt') / 'retina.pth')
    torch.save(dict(meta=dict(epoch=0), state_dict=build_model(cfg, DETECTION).state_dict()), path)
    return path


@pytest.mark.slow  # a subprocess that imports mmdet/mmseg: 5-20 s
def test_checkpoint_of_another_model_is_refused(coco_root, retina_ckpt, seg_root):
    own = ['--data-root', coco_root, '--classes', ','.join(CLASSES)]
    rc, out = _run([sys.executable, 'test.py', MASK, retina_ckpt, *own], DET, ok=False)
    _one_line_error(rc, out, f'checkpoint {retina_ckpt} does not fit MaskRCNN', 'missing (', 'unexpected (')
    rc, out = _run([sys.executable, 'test.py', FPN, retina_ckpt, '--data-root', seg_root,
                    '--classes', ','.join(CLASSES)], SEG, ok=False)
    _one_line_error(rc, out, 'does not fit EncoderDecoder')


@pytest.mark.slow
def test_no_boxes_above_the_score_threshold(coco_root, retina_ckpt, tmp_path):
    own = ['--data-root', coco_root, '--classes', ','.join(CLASSES), '--work-dir', str(tmp_path)]
    rc, out = _run([sys.executable, 'test.py', RETINA, retina_ckpt, *own, '--score-thr', '1.01'], DET, ok=False)
    _one_line_error(rc, out, 'no boxes scoring 1.01 or more (model.test_cfg.score_thr)', '--score-thr')


@pytest.mark.parametrize('flag, message', [
    (['--eval', 'segm'], '--eval segm: this config evaluates bbox'),
    (['--eval', 'foo'], '--eval foo: this config evaluates bbox'),
    (['--out', 'x.json'], '--out x.json: must be a .pkl'),
])
@pytest.mark.slow  # a subprocess that imports mmdet/mmseg: 5-20 s
def test_test_options_refused_before_work(coco_root, retina_ckpt, flag, message):
    rc, out = _run([sys.executable, 'test.py', RETINA, retina_ckpt, '--data-root', coco_root,
                    '--classes', ','.join(CLASSES), *flag], DET, ok=False)
    _one_line_error(rc, out, message)
    assert 'Epoch(test)' not in out


@pytest.mark.slow  # a subprocess that imports mmdet/mmseg: 5-20 s
def test_get_flops_missing_config_is_one_line():
    for folder in (DET, SEG):
        rc, out = _run([sys.executable, 'get_flops.py', 'configs/nope.py'], folder, ok=False)
        _one_line_error(rc, out, 'config file not found: configs/nope.py')
