"""detection/predict.py and segmentation/predict.py (mmdet's DetInferencer, mmseg's MMSegInferencer) and test.py
--show-dir, on tiny models trained for a few iterations by the real train.py, with real image files: colour,
grayscale, RGBA, one in a sub-folder with a clashing name, and an unreadable one.

Predictions are checked against the model's own test output (detection: test.py --out; segmentation: mmseg's
``inference_model``), drawings against the input image.
"""
import json
import os
import os.path as osp
import pickle
import subprocess
import sys

import cv2
import mmdet  # noqa: F401  (the OpenMMLab stack is part of the install: no skipping)
import mmseg  # noqa: F401
import numpy as np
import pytest

from tiny_data import make_tiny_ade, make_tiny_coco

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
DET = osp.join(ROOT, 'detection')
SEG = osp.join(ROOT, 'segmentation')
TINY_MASK = osp.join(DET, 'configs', 'tiny', 'mask-rcnn_scalablevit-tiny_fpn_tiny-coco.py')
TINY_RETINA = osp.join(DET, 'configs', 'tiny', 'retinanet_scalablevit-tiny_fpn_tiny-coco.py')
TINY_FPN = osp.join(SEG, 'configs', 'tiny', 'scalablevit-tiny_fpn_1xb2-40_tiny-ade-64x64.py')

pytestmark = pytest.mark.slow


def _run(args, cwd, ok=True):
    env = dict(os.environ, PYTHONUNBUFFERED='1', OMP_NUM_THREADS='1')
    env['PYTHONPATH'] = os.pathsep.join([ROOT] + [p for p in [env.get('PYTHONPATH')] if p])
    env.pop('TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD', None)  # checkpoints must load with weights_only (the allow-list)
    proc = subprocess.run(args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=600)
    if ok:
        assert proc.returncode == 0, proc.stdout[-6000:]
    return proc.returncode, proc.stdout


def _image_set(folder, source_images):
    """The odd inputs: grayscale, RGBA, a clashing name in a sub-folder, an unreadable file."""
    os.makedirs(osp.join(folder, 'sub'), exist_ok=True)
    a = cv2.imread(source_images[0])
    b = cv2.imread(source_images[1])
    cv2.imwrite(osp.join(folder, 'gray.png'), cv2.cvtColor(a, cv2.COLOR_BGR2GRAY))
    cv2.imwrite(osp.join(folder, 'rgba.png'), np.dstack([b, np.full(b.shape[:2], 200, np.uint8)]))
    cv2.imwrite(osp.join(folder, 'same.png'), a)
    cv2.imwrite(osp.join(folder, 'sub', 'same.png'), cv2.flip(b, 1))
    with open(osp.join(folder, 'broken.png'), 'wb') as f:
        f.write(b'\x89PNG\r\n\x1a\n this is not an image')
    return {'gray.png': a, 'rgba.png': b, 'same.png': a, 'sub/same.png': b}


def _check_vis(vis_path, input_path):
    vis = cv2.imread(vis_path, cv2.IMREAD_UNCHANGED)
    img = cv2.imread(input_path, cv2.IMREAD_COLOR)
    assert vis is not None and vis.shape == img.shape, (vis_path, None if vis is None else vis.shape, img.shape)
    return vis.astype(np.int32), img.astype(np.int32)


# ----------------------------------------------------------------------------------------------------------------
# Detection

@pytest.fixture(scope='module')
def det(tmp_path_factory):
    """Mask R-CNN (boxes and masks) trained one epoch on the tiny shapes set; its test.py --out and --show-dir."""
    root = tmp_path_factory.mktemp('det_predict')
    data = root / 'data' / 'tiny_coco'
    make_tiny_coco(str(data), num_train=4, num_val=3, size=128, seed=0)
    val = [p for p in data.iterdir() if p.is_dir() and p.name.startswith('val')][0]  # val/ or val2017/
    ann = data / 'annotations' / f'instances_{val.name}.json'
    work = root / 'work'
    _run([sys.executable, osp.join(DET, 'train.py'), TINY_MASK, '--work-dir', str(work), '--cfg-options',
          f'train_dataloader.dataset.data_root={data}/', 'train_cfg.max_epochs=1', 'val_cfg=None',
          'val_dataloader=None', 'val_evaluator=None'], root)
    ckpt = work / 'epoch_1.pth'
    _, test_out = _run([sys.executable, osp.join(DET, 'test.py'), TINY_MASK, str(ckpt), '--work-dir', str(work),
                        '--out', str(work / 'results.pkl'), '--show-dir', 'show', '--cfg-options',
                        f'test_dataloader.dataset.data_root={data}/', f'test_evaluator.ann_file={ann}'], root)
    with open(work / 'results.pkl', 'rb') as f:
        results = pickle.load(f)
    return dict(root=root, ckpt=ckpt, results=results, test_out=test_out, val=val)


def test_det_test_show_dir_draws_prediction_beside_ground_truth(det):
    show = det['root'] / 'show'  # relative to the current folder, not <work dir>/<time>/ as mmdet's hook would
    val = det['val']
    names = sorted(os.listdir(val))
    assert sorted(os.listdir(show)) == names
    for name in names:
        drawn = cv2.imread(str(show / name))
        img = cv2.imread(str(val / name))
        assert drawn.shape == (img.shape[0], 2 * img.shape[1], 3)  # ground truth | prediction
        gt_side = drawn[:, :img.shape[1]].astype(int)
        assert np.abs(gt_side - img).mean() > 1  # the ground-truth boxes and masks are drawn


def test_det_predict_matches_test_output_and_draws(det):
    root, out = det['root'], det['root'] / 'pred_out'
    val = det['val']
    extra = root / 'extra'
    sources = sorted(str(val / n) for n in os.listdir(val))
    _image_set(str(extra), sources)
    rc, log = _run([sys.executable, osp.join(DET, 'predict.py'), str(val), str(extra), TINY_MASK,
                    '--weights', str(det['ckpt']), '--out-dir', str(out), '--score-thr', '0.05', '--device', 'cpu'],
                   root)
    assert 'skipping' in log and 'broken.png' in log and 'Traceback' not in log
    assert 'predicted 7 images' in log
    rel = osp.relpath(val, root)  # outputs are named relative to the inputs' common folder

    # Against test.py's raw predictions: same boxes, scores, labels and masks for the validation images.
    import pycocotools.mask as mask_util
    by_name = {osp.basename(r['img_path']): r['pred_instances'] for r in det['results']}
    assert len(by_name) == len(sources)
    for src in sources:
        name = osp.basename(src)
        with open(out / 'preds' / rel / (osp.splitext(name)[0] + '.json')) as f:
            pred = json.load(f)
        ref = by_name[name]
        assert pred['image'] == src and (pred['height'], pred['width']) == (128, 128)
        assert len(pred['scores']) == len(ref['scores']) > 0
        np.testing.assert_allclose(pred['scores'], ref['scores'].numpy(), atol=1e-5)
        np.testing.assert_allclose(pred['bboxes'], ref['bboxes'].numpy(), atol=1e-3)
        assert pred['labels'] == ref['labels'].tolist()
        assert pred['label_names'] == [('square', 'disc', 'triangle')[i] for i in pred['labels']]
        masks = mask_util.decode(pred['masks'])  # (H, W, N)
        assert masks.shape == (128, 128, len(pred['scores']))
        ours, theirs = masks.transpose(2, 0, 1).astype(bool), ref['masks'].numpy().astype(bool)
        # the same masks up to pixels whose probability sits at the 0.5 threshold (float rounding of batch 1 vs 2)
        assert (ours != theirs).sum() <= 0.01 * max(1, (ours | theirs).sum()), (ours != theirs).sum()

        # The drawing: the input's size; changed inside the boxes scoring >= --score-thr.
        vis, img = _check_vis(str(out / 'vis' / rel / name), src)
        drawn = [b for b, s in zip(pred['bboxes'], pred['scores']) if s >= 0.05]
        assert drawn, 'no detection above the drawing threshold'
        inside = np.zeros(img.shape[:2], bool)
        for x1, y1, x2, y2 in drawn:
            inside[int(y1):int(np.ceil(y2)) + 1, int(x1):int(np.ceil(x2)) + 1] = True
        assert np.abs(vis - img)[inside].mean() > 2

    # The odd files: each predicted under its own name, at the input's size.
    for name in ('gray.png', 'rgba.png', 'same.png', 'sub/same.png'):
        _check_vis(str(out / 'vis' / 'extra' / name), str(extra / name))
        assert (out / 'preds' / 'extra' / name.replace('.png', '.json')).is_file()
    assert not (out / 'vis' / 'extra' / 'broken.png').exists()
    with open(out / 'preds' / 'extra' / 'same.json') as f, open(out / 'preds' / 'extra' / 'sub' / 'same.json') as g:
        assert json.load(f)['bboxes'] != json.load(g)['bboxes']  # two images, two files

    # Nothing above the threshold: nothing drawn, the picture is the input (PNG, lossless).
    png = str(extra / 'same.png')
    rc, log = _run([sys.executable, osp.join(DET, 'predict.py'), png, TINY_MASK, '--weights',
                    str(det['ckpt']), '--out-dir', str(root / 'pred_none'), '--score-thr', '1.01'], root)
    vis, img = _check_vis(str(root / 'pred_none' / 'vis' / 'same.png'), png)
    assert np.array_equal(vis, img)


def test_det_predict_bad_input_is_one_line(det, tmp_path):
    from scalablevit.errors import UserError
    from scalablevit.mm.predict import predict_main
    img = str(det['root'] / 'extra' / 'gray.png')
    if not osp.exists(img):
        img = sorted(str(p) for p in det['val'].iterdir())[0]
    ckpt = str(det['ckpt'])
    cases = [
        ([img, 'nowhere.py', '--weights', ckpt], 'config file not found: nowhere.py'),
        ([img, TINY_MASK, '--weights', 'none.pth'], 'checkpoint not found: none.pth'),
        ([str(tmp_path / 'none.jpg'), TINY_MASK, '--weights', ckpt], 'input not found'),
        ([str(tmp_path / '*.webp'), TINY_MASK, '--weights', ckpt], 'no images match'),
        ([img, TINY_RETINA, '--weights', ckpt], 'does not fit'),  # a Mask R-CNN checkpoint for RetinaNet
    ]
    broken = tmp_path / 'broken.jpg'
    broken.write_bytes(b'not a jpeg')
    cases.append(([str(broken), TINY_MASK, '--weights', ckpt], 'none of the 1 input files could be read'))
    bad_ckpt = tmp_path / 'bad.pth'
    bad_ckpt.write_bytes(b'garbage')
    cases.append(([img, TINY_MASK, '--weights', str(bad_ckpt)], 'cannot read checkpoint'))
    for argv, message in cases:
        with pytest.raises(UserError) as err:
            predict_main(argv + ['--out-dir', str(tmp_path / 'out')], 'detection')
        text = str(err.value)
        assert message in text and '\n' not in text, (argv, text)


# ----------------------------------------------------------------------------------------------------------------
# Segmentation

@pytest.fixture(scope='module')
def seg(tmp_path_factory):
    """Semantic FPN trained 6 iterations on the tiny ADE-style set; test.py --show-dir."""
    root = tmp_path_factory.mktemp('seg_predict')
    data = make_tiny_ade(str(root / 'tiny_ade'), size=64, num_train=4, num_val=3)
    work = root / 'work'
    opts = [f'{k}_dataloader.dataset.data_root={data}' for k in ('train', 'val', 'test')]
    _run([sys.executable, osp.join(SEG, 'train.py'), TINY_FPN, '--work-dir', str(work), '--cfg-options', *opts,
          'train_cfg.max_iters=6', 'train_cfg.val_interval=100', 'default_hooks.checkpoint.interval=6',
          'param_scheduler.0.end=6'], root)
    ckpt = work / 'iter_6.pth'
    _run([sys.executable, osp.join(SEG, 'test.py'), TINY_FPN, str(ckpt), '--work-dir', str(work),
          '--show-dir', 'show', '--cfg-options', *opts], root)
    return dict(root=root, data=data, ckpt=ckpt)


def test_seg_test_show_dir_draws_prediction_beside_ground_truth(seg):
    drawn = sorted((seg['root'] / 'show' / 'vis_data' / 'vis_image').glob('*.png'))
    val = sorted(os.listdir(osp.join(seg['data'], 'images', 'validation')))
    assert len(drawn) == len(val) == 3  # every test image (mmseg's default draws one in 50)
    for path in drawn:
        assert cv2.imread(str(path)).shape == (64, 128, 3)  # ground truth | prediction


def test_seg_predict_matches_inference_model_and_draws(seg):
    from mmseg.apis import inference_model, init_model

    import scalablevit.mm  # noqa: F401  (the backbone; mmengine checkpoints under weights_only=True)

    root, out = seg['root'], seg['root'] / 'pred_out'
    val = osp.join(seg['data'], 'images', 'validation')
    sources = sorted(osp.join(val, n) for n in os.listdir(val))
    extra = root / 'extra'
    _image_set(str(extra), sources)
    big = cv2.resize(cv2.imread(sources[0]), (96, 80))  # another size: the label map follows the input
    cv2.imwrite(str(extra / 'big.png'), big)
    rc, log = _run([sys.executable, osp.join(SEG, 'predict.py'), val, str(extra), TINY_FPN, '--weights',
                    str(seg['ckpt']), '--out-dir', str(out), '--device', 'cpu'], root)
    assert 'skipping' in log and 'broken.png' in log and 'Traceback' not in log

    model = init_model(TINY_FPN, str(seg['ckpt']), device='cpu')
    classes = list(model.dataset_meta['classes'])
    import pycocotools.mask as mask_util
    rel = osp.relpath(val, root)  # outputs are named relative to the inputs' common folder
    for src, sub in [(s, rel) for s in sources] + [(str(extra / 'big.png'), 'extra')]:
        stem = osp.splitext(osp.basename(src))[0]
        ref = inference_model(model, src).pred_sem_seg.data[0].numpy()
        label_map = cv2.imread(str(out / 'preds' / sub / (stem + '.png')), cv2.IMREAD_UNCHANGED)
        assert label_map.shape == cv2.imread(src).shape[:2] == ref.shape
        assert np.array_equal(label_map, ref)
        with open(out / 'preds' / sub / (stem + '.json')) as f:
            pred = json.load(f)
        assert pred['image'] == src and pred['classes'] == classes
        assert (pred['height'], pred['width']) == ref.shape
        assert sum(s['area'] for s in pred['segments']) == ref.size
        for s in pred['segments']:
            assert s['label_name'] == classes[s['label']]
            assert np.array_equal(mask_util.decode(s['mask']).astype(bool), ref == s['label'])
        vis, img = _check_vis(str(out / 'vis' / sub / osp.basename(src)), src)
        assert np.abs(vis - img).mean() > 5  # the class overlay
    for name in ('gray.png', 'rgba.png', 'same.png', 'sub/same.png'):
        _check_vis(str(out / 'vis' / 'extra' / name), str(extra / name))
    assert not (out / 'preds' / 'extra' / 'broken.json').exists()
