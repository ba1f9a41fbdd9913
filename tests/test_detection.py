"""detection/: the ten configs (settings, parameter counts) and the scripts end to end on the tiny dataset (CPU).

The end-to-end tests run detection/train.py, test.py, dist_train.sh and dist_test.sh as a user does, in a
temporary folder holding data/tiny_coco/ (tools/make_tiny_coco.py), with the tiny configs under configs/tiny/.
"""
import glob
import os
import os.path as osp
import re
import subprocess
import sys

import mmdet  # noqa: F401,E402  (the OpenMMLab stack is part of the install: no skipping)
import pytest
from mmcv.ops import nms  # noqa: F401,E402

from scalablevit.mm.checkpoint import load_mm_checkpoint

from tiny_data import make_tiny_coco

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
DET = osp.join(ROOT, 'detection')
CONFIGS = osp.join(DET, 'configs')
TINY_RETINA = osp.join(CONFIGS, 'tiny', 'retinanet_scalablevit-tiny_fpn_tiny-coco.py')
TINY_MASK = osp.join(CONFIGS, 'tiny', 'mask-rcnn_scalablevit-tiny_fpn_tiny-coco.py')

# The published table: parameters (M) and FLOPs (G, 1280x800).
PUBLISHED = {
    'retinanet_scalablevit-s_fpn_1x_coco': 36.4, 'retinanet_scalablevit-s_fpn_ms-3x_coco': 36.4,
    'retinanet_scalablevit-b_fpn_1x_coco': 85.6, 'retinanet_scalablevit-b_fpn_ms-3x_coco': 85.6,
    'retinanet_scalablevit-l_fpn_1x_coco': 112.6,
    'mask-rcnn_scalablevit-s_fpn_1x_coco': 46.3, 'mask-rcnn_scalablevit-s_fpn_ms-3x_coco': 46.3,
    'mask-rcnn_scalablevit-b_fpn_1x_coco': 94.9, 'mask-rcnn_scalablevit-b_fpn_ms-3x_coco': 94.9,
    'mask-rcnn_scalablevit-l_fpn_1x_coco': 121.4,
}


def _cfg(name):
    from mmengine.config import Config
    return Config.fromfile(osp.join(CONFIGS, name + '.py'))


def test_config_folder_has_exactly_the_ten_published_configs():
    names = sorted(osp.splitext(osp.basename(p))[0] for p in glob.glob(osp.join(CONFIGS, '*.py')))
    assert names == sorted(PUBLISHED)


@pytest.mark.parametrize('name', sorted(PUBLISHED))
def test_config_settings(name):
    cfg = _cfg(name)
    retina = name.startswith('retinanet')
    size = name.split('scalablevit-')[1][0]
    three_x = 'ms-3x' in name
    assert cfg.custom_imports.imports == ['scalablevit.mm']
    assert cfg.custom_hooks == [dict(type='PreemptionHook')]
    assert cfg.train_cfg.type == 'ResumableEpochBasedTrainLoop'
    bb = cfg.model.backbone
    assert bb.type == 'ScalableViTBackbone' and bb.arch == size
    assert bb.drop_path_rate == (0.2 if size == 's' else 0.3)
    assert bb.init_cfg.type == 'Pretrained' and bb.init_cfg.checkpoint.endswith(
        {'s': 'small', 'b': 'base', 'l': 'large'}[size] + '.pth')
    if retina:  # FPN from stage 2, extra convs on the input
        assert bb.out_indices == (1, 2, 3) and cfg.model.neck.start_level == 0
        assert cfg.model.neck.add_extra_convs == 'on_input' and cfg.model.neck.num_outs == 5
    else:
        assert bb.out_indices == (0, 1, 2, 3)
    # AdamW, no decay on norms and pos_block, warm-up 500 iterations, steps 8/11 or 27/33.
    opt = cfg.optim_wrapper
    assert opt.optimizer.type == 'AdamW' and opt.optimizer.weight_decay == 0.05
    assert opt.optimizer.lr == (1e-4 if retina or three_x else 2e-4)
    assert opt.paramwise_cfg.custom_keys == {'norm': dict(decay_mult=0.), 'pos_block': dict(decay_mult=0.)}
    warmup, steps = cfg.param_scheduler
    assert warmup.type == 'LinearLR' and warmup.end == 500 and not warmup.by_epoch
    assert cfg.train_cfg.max_epochs == (36 if three_x else 12)
    assert steps.milestones == ([27, 33] if three_x else [8, 11])
    # 8 GPUs x 2 images; COCO under detection/data/coco/; test at 1333x800.
    assert cfg.train_dataloader.batch_size == 2 and cfg.auto_scale_lr.base_batch_size == 16
    assert cfg.train_dataloader.dataset.data_root == 'data/coco/'
    resize = [t for t in cfg.test_dataloader.dataset.pipeline if t.type == 'Resize']
    assert resize[0].scale == (1333, 800)
    train_resize = [t for t in cfg.train_dataloader.dataset.pipeline if 'Resize' in t.type]
    if three_x:
        assert train_resize[0].type == 'RandomChoiceResize'
        shorter = sorted(s[1] for s in train_resize[0].scales)
        assert shorter[0] == 480 and shorter[-1] == 800 and all(s[0] == 1333 for s in train_resize[0].scales)
    else:
        assert train_resize[0].type == 'Resize' and train_resize[0].scale == (1333, 800)
    loads = [t for t in cfg.train_dataloader.dataset.pipeline if t.type == 'LoadAnnotations']
    assert loads[0].get('with_mask', False) == (not retina)
    assert cfg.test_evaluator.metric == ('bbox' if retina else ['bbox', 'segm'])


def _build(cfg):
    from mmdet.registry import MODELS
    from mmengine.registry import init_default_scope
    from mmengine.utils import import_modules_from_strings
    import_modules_from_strings(**cfg.custom_imports)
    init_default_scope('mmdet')
    cfg.model.backbone.init_cfg = None
    return MODELS.build(cfg.model)


# The 3x configs share the 1x model (checked above); building the five 1x models covers all ten.
@pytest.mark.parametrize('name', sorted(n for n in PUBLISHED if '_1x_' in n))
def test_param_counts_match_the_published_table(name):
    model = _build(_cfg(name))
    params = sum(p.numel() for p in model.parameters()) / 1e6
    published = PUBLISHED[name]
    if '-s_' in name:
        # S: the released backbone (32.00M with its head) is 0.4M under the paper's 32.4M (README, architecture).
        assert 0.3 <= published - params <= 0.5, params
    else:
        assert abs(params - published) <= 0.1, params
    three_x = name.replace('_1x_', '_ms-3x_')
    if three_x in PUBLISHED:
        assert _cfg(three_x).model == _cfg(name).model


def test_get_flops_prints_params_and_flops():
    out = _ok([sys.executable, osp.join(DET, 'get_flops.py'), TINY_MASK, '--shape', '128', '128'], ROOT)
    m = re.search(r'FLOPs at 128x128 \(W x H\): ([\d.]+) G \(([\d.]+) G without the attention products\)', out)
    assert m and float(m.group(1)) >= float(m.group(2)) > 0, out[-2000:]
    assert re.search(r'params: [\d.]+ M \(backbone [\d.]+ M, neck [\d.]+ M', out), out[-2000:]


# ----------------------------------------------------------------------------------------------------------------
# End to end on the tiny dataset.

@pytest.fixture(scope='module')
def run_dir(tmp_path_factory):
    """A folder holding data/tiny_coco/ (8 training and 4 validation images, 128 px); scripts run inside it."""
    root = tmp_path_factory.mktemp('det')
    make_tiny_coco(str(root / 'data' / 'tiny_coco'), num_train=8, num_val=4, size=128, seed=0)
    return root


def _run(args, cwd, timeout=600):
    env = dict(os.environ, PYTHONUNBUFFERED='1')
    env.pop('PORT', None)  # tools/dist_run.sh picks a free port
    env.pop('TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD', None)  # the checkpoint allow-list must be enough
    proc = subprocess.run(args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=timeout)
    return proc.returncode, proc.stdout


def _ok(args, cwd, timeout=600):
    rc, out = _run(args, cwd, timeout)
    assert rc == 0, out[-6000:]
    return out


def _metric(out, key):
    """The last value of ``coco/<key>`` in the log."""
    found = re.findall(rf'coco/{key}: (-?[\d.]+)', out)
    assert found, f'no coco/{key} in the output:\n{out[-4000:]}'
    return float(found[-1])


def test_tiny_dataset_is_valid_coco(run_dir):
    from pycocotools.coco import COCO
    coco = COCO(str(run_dir / 'data' / 'tiny_coco' / 'annotations' / 'instances_train2017.json'))
    assert len(coco.getImgIds()) == 8 and sorted(coco.getCatIds()) == [1, 2, 3]
    anns = coco.loadAnns(coco.getAnnIds())
    assert anns and all(a['bbox'][2] > 8 and a['bbox'][3] > 8 for a in anns)
    mask = coco.annToMask(anns[0])
    x, y, w, h = anns[0]['bbox']
    assert mask.sum() == pytest.approx(anns[0]['area'], rel=0.15)
    ys, xs = mask.nonzero()
    assert abs(xs.min() - x) <= 1.5 and abs(ys.min() - y) <= 1.5


@pytest.mark.slow
def test_retinanet_train_then_test_prints_bbox_map(run_dir):
    work = run_dir / 'work_retina'
    out = _ok([sys.executable, osp.join(DET, 'train.py'), TINY_RETINA, '--work-dir', str(work),
               '--cfg-options', 'train_cfg.max_epochs=1', 'train_cfg.val_interval=1'], run_dir)
    assert 'Epoch(train) [1][4/4]' in out and 'loss_cls' in out and 'loss_bbox' in out
    _metric(out, 'bbox_mAP')  # validation after the epoch
    ckpt = work / 'epoch_1.pth'
    assert ckpt.is_file()
    out = _ok([sys.executable, osp.join(DET, 'test.py'), TINY_RETINA, str(ckpt), '--work-dir', str(work),
               '--eval', 'mAP', '--out', str(work / 'results.pkl')], run_dir)
    assert '--eval mAP' in out and 'test_evaluator' in out  # noted, not an error
    assert 0. <= _metric(out, 'bbox_mAP') <= 1.
    import pickle
    with open(work / 'results.pkl', 'rb') as f:
        results = pickle.load(f)
    assert len(results) == 4 and 'pred_instances' in results[0]
    eager = _metric(out, 'bbox_mAP')
    out = _ok([sys.executable, osp.join(DET, 'test.py'), TINY_RETINA, str(ckpt), '--work-dir', str(work),
               '--compile'], run_dir)  # backbone and neck through torch.compile (inference graphs only: quick)
    assert '--compile default: backbone and neck compiled' in out
    assert abs(_metric(out, 'bbox_mAP') - eager) <= 0.02  # the same detector, to float rounding


@pytest.mark.slow
def test_mask_rcnn_train_resume_and_test_prints_bbox_and_segm_map(run_dir):
    work = run_dir / 'work_mask'
    train = [sys.executable, osp.join(DET, 'train.py'), TINY_MASK, '--work-dir', str(work)]
    out = _ok(train + ['--cfg-options', 'train_cfg.max_epochs=1'], run_dir)
    assert all(k in out for k in ('loss_rpn_cls', 'loss_cls', 'loss_mask'))
    first = load_mm_checkpoint(work / 'epoch_1.pth')  # weights_only, mmengine's classes allowed for the load
    assert first['meta']['epoch'] == 1 and first['meta']['iter'] == 4

    # --resume continues from the latest checkpoint: optimizer state, epoch and iteration counters.
    out = _ok(train + ['--resume', '--cfg-options', 'train_cfg.max_epochs=2', 'train_cfg.val_interval=1'], run_dir)
    assert 'resumed epoch: 1, iter: 4' in out
    assert 'Epoch(train) [2][4/4]' in out and 'Epoch(train) [1]' not in out
    second = load_mm_checkpoint(work / 'epoch_2.pth')
    assert second['meta']['iter'] == 8 and 'optimizer' in second
    _metric(out, 'segm_mAP')

    out = _ok(['bash', osp.join(DET, 'dist_test.sh'), TINY_MASK, str(work / 'epoch_2.pth'), '1',
               '--work-dir', str(work), '--eval', 'mAP'], run_dir)
    for key in ('bbox_mAP', 'bbox_mAP_50', 'segm_mAP', 'segm_mAP_50'):
        assert 0. <= _metric(out, key) <= 1.


@pytest.mark.slow
def test_two_processes_over_gloo(run_dir):
    work = run_dir / 'work_dist'
    out = _ok(['bash', osp.join(DET, 'dist_train.sh'), TINY_MASK, '2', '--work-dir', str(work),
               '--cfg-options', 'train_cfg.max_epochs=1'], run_dir)
    assert 'Distributed launcher: pytorch' in out and 'Distributed training: True' in out
    assert 'Epoch(train) [1][2/2]' in out  # 8 images / (2 processes x 2 images): the data is split
    out = _ok(['bash', osp.join(DET, 'dist_test.sh'), TINY_MASK, str(work / 'epoch_1.pth'), '2',
               '--work-dir', str(work), '--eval', 'mAP'], run_dir)
    _metric(out, 'segm_mAP')
    assert 'Epoch(test) [1/1]' in out  # 4 images over 2 processes, 2 per batch


@pytest.mark.slow
def test_overfit_tiny_train_set(run_dir):
    """RetinaNet from scratch, 12 epochs on the 8 training images, tested on them: mAP rises well above zero."""
    work = run_dir / 'work_overfit'
    out = _ok([sys.executable, osp.join(DET, 'train.py'), TINY_RETINA, '--work-dir', str(work), '--cfg-options',
               'train_cfg.max_epochs=12', 'train_cfg.val_interval=6',
               'val_dataloader.dataset.ann_file=annotations/instances_train2017.json',
               'val_dataloader.dataset.data_prefix.img=train2017/',
               'val_evaluator.ann_file=data/tiny_coco/annotations/instances_train2017.json'], run_dir)
    map50 = [float(v) for v in re.findall(r'coco/bbox_mAP_50: ([\d.]+)', out)]
    assert len(map50) == 2 and map50[1] > map50[0] and map50[1] > 0.2, map50


@pytest.mark.parametrize('args, message', [
    (['nowhere.py'], 'config file not found'),
    ([TINY_RETINA, '--cfg-options', 'train_dataloader.dataset.data_root=data/none/'], "data_root 'data/none/'"),
    ([TINY_RETINA, '--resume', 'none.pth'], 'checkpoint not found'),
])
def test_train_errors_are_one_line(run_dir, args, message):
    from scalablevit.errors import UserError
    from scalablevit.mm.runner import train_main
    cwd = os.getcwd()
    os.chdir(run_dir)
    try:
        with pytest.raises(UserError) as err:  # an exception, not an exit: callable from a notebook
            train_main(args, 'detection', DET)
    finally:
        os.chdir(cwd)
    assert message in str(err.value)


def test_test_errors_are_one_line(run_dir):
    from scalablevit.errors import UserError
    from scalablevit.mm.runner import test_main
    with pytest.raises(UserError, match='checkpoint not found'):
        test_main([TINY_RETINA, str(run_dir / 'none.pth')], 'detection', DET)
    with pytest.raises(UserError, match='tta_model'):
        test_main([TINY_RETINA, __file__, '--tta'], 'detection', DET)
    seg_config = osp.join(ROOT, 'segmentation', 'configs', 'tiny', 'scalablevit-tiny_fpn_1xb2-40_tiny-ade-64x64.py')
    with pytest.raises(UserError, match="default_scope is 'mmseg', a segmentation config"):
        test_main([seg_config, __file__], 'detection', DET)


def test_default_work_dir_is_under_detection(run_dir):
    from scalablevit.mm.config import load_config
    cfg = load_config(osp.join(CONFIGS, 'retinanet_scalablevit-s_fpn_1x_coco.py'), DET)
    assert cfg.work_dir == osp.join(DET, 'work_dirs', 'retinanet_scalablevit-s_fpn_1x_coco')
