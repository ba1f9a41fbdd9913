"""tools/plot_logs.py: curves from classification ``log.txt`` and mmengine ``vis_data/scalars.json`` (epoch-based
mmdet with a resumed run, iteration-based mmseg), several runs on one chart, PNGs that hold the curves; errors."""
import json
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope='module')
def plot(load_script):
    return load_script('tools/plot_logs.py')


def write_lines(path: Path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(''.join(json.dumps(r) + '\n' for r in rows))


def cls_log(path: Path, acc_offset=0.0, ema=False):
    """log.txt as classification/main.py writes it: one line per epoch."""
    rows = []
    for e in range(4):
        row = dict(train_lr=2e-3 * (1 - e / 4) + 1e-5, train_loss=2.0 / (e + 1), test_loss=1.5 / (e + 1),
                   test_acc1=60.0 + 10 * e + acc_offset, test_acc5=90.0 + 2 * e, test_count=360, epoch=e,
                   n_parameters=458826)
        if ema:
            row.update(test_ema_acc1=55.0 + 10 * e, test_ema_acc5=88.0 + 2 * e, test_ema_loss=1.6 / (e + 1))
        rows.append(row)
    write_lines(path / 'log.txt', rows)
    return rows


def mmdet_work_dir(root: Path):
    """An mmdet work dir, epoch-based, resumed once: two timestamp folders, the second repeating iteration 20."""
    def train(it, epoch):
        return dict(base_lr=1e-4, lr=1e-4 * min(1.0, it / 10), data_time=0.01, loss=3.0 / it ** 0.3,
                    loss_cls=2.0 / it ** 0.3, loss_bbox=1.0 / it ** 0.3, time=0.5, epoch=epoch, iter=it, memory=900,
                    step=it)

    def val(epoch, m):
        return {'coco/bbox_mAP': m, 'coco/bbox_mAP_50': m + 0.2, 'coco/bbox_mAP_75': m - 0.05,
                'coco/bbox_mAP_s': -1.0, 'coco/bbox_mAP_m': m, 'coco/bbox_mAP_l': m, 'data_time': 0.01,
                'time': 0.2, 'step': epoch}

    write_lines(root / '20261201_060000' / 'vis_data' / 'scalars.json',
                [train(10, 1), train(20, 1), val(1, 0.10), train(30, 2)])  # stopped in epoch 2
    write_lines(root / '20261201_070000' / 'vis_data' / 'scalars.json',
                [train(30, 2), train(40, 2), val(2, 0.25)])
    (root / '20261201_070000' / '20261201_070000.log').write_text('text log, not read\n')


def mmseg_work_dir(root: Path):
    """An mmseg work dir, iteration-based, validated every 20 iterations."""
    rows = []
    for it in (10, 20, 30, 40):
        rows.append({'base_lr': 6e-5, 'lr': 6e-5 * (1 - it / 40) ** 1.0 + 1e-8, 'data_time': 0.01,
                     'loss': 2.0 / it ** 0.5, 'decode.loss_ce': 1.5 / it ** 0.5, 'decode.acc_seg': 10.0 + it,
                     'aux.loss_ce': 0.5 / it ** 0.5, 'time': 0.3, 'iter': it, 'memory': 500, 'step': it})
        if it % 20 == 0:
            rows.append({'aAcc': 50.0 + it, 'mIoU': 10.0 + it / 2, 'mAcc': 20.0 + it / 2, 'data_time': 0.01,
                         'time': 0.1, 'step': it})
    write_lines(root / '20261201_063000' / 'vis_data' / 'scalars.json', rows)


def curves(panels, title):
    panel = next(p for p in panels if p.title == title)
    return {(c.run, c.name): (c.x, c.y) for c in panel.curves}, panel


def png_pixels(path: Path) -> np.ndarray:
    import matplotlib.image as mpimg
    return mpimg.imread(str(path))


# ---------------------------------------------------------------------------------------------------------------------

def test_classification_runs_on_one_chart(plot, tmp_path, capsys):
    a = cls_log(tmp_path / 'run_a', ema=True)
    cls_log(tmp_path / 'run_b', acc_offset=5.0)
    panels = plot.merge([plot.read_run(str(tmp_path / 'run_a'), 0), plot.read_run(str(tmp_path / 'run_b'), 1)])
    assert [p.title for p in panels] == ['loss', 'learning rate', 'top-1 (%)', 'top-5 (%)']
    top1, panel = curves(panels, 'top-1 (%)')
    assert panel.xlabel == 'epoch'
    assert top1[(0, '')] == ([0, 1, 2, 3], [r['test_acc1'] for r in a])
    assert top1[(1, '')][1] == [r['test_acc1'] + 5 for r in a]
    assert top1[(0, 'EMA')][1] == [r['test_ema_acc1'] for r in a] and (1, 'EMA') not in top1
    loss, _ = curves(panels, 'loss')
    assert loss[(0, 'train')][1] == [r['train_loss'] for r in a] and loss[(0, 'val')][1] == [r['test_loss'] for r in a]

    out = tmp_path / 'figs' / 'cls.png'
    assert plot.cli([str(tmp_path / 'run_a'), str(tmp_path / 'run_b' / 'log.txt'), '--out', str(out)]) == 0
    assert 'loss, learning rate, top-1 (%), top-5 (%) for run_a, run_b' in capsys.readouterr().out
    img = png_pixels(out)
    assert img.shape[0] > 400 and img.shape[1] > 600
    # the curves are drawn in the run colours (matplotlib's first two: blue #1f77b4, orange #ff7f0e)
    rgb = img[..., :3]
    for colour in ((0x1f, 0x77, 0xb4), (0xff, 0x7f, 0x0e)):
        close = np.abs(rgb - np.array(colour) / 255.0).max(-1) < 0.02
        assert close.sum() > 200, colour


def test_mmengine_detection_resumed_and_segmentation(plot, tmp_path, capsys):
    mmdet_work_dir(tmp_path / 'det')
    mmseg_work_dir(tmp_path / 'seg')

    det = plot.read_run(str(tmp_path / 'det'), 0)
    titles = [p.title for p in det]
    assert titles == ['loss', 'loss_bbox', 'loss_cls', 'learning rate', 'coco/bbox_mAP']  # headline metric only
    loss, panel = curves(det, 'loss')
    assert panel.xlabel == 'iteration' and loss[(0, '')][0] == [10, 20, 30, 40]  # iteration 30 once, after resume
    mAP, panel = curves(det, 'coco/bbox_mAP')
    assert panel.xlabel == 'epoch' and mAP[(0, '')] == ([1, 2], [0.10, 0.25])

    seg = plot.read_run(str(tmp_path / 'seg' / '20261201_063000' / 'vis_data' / 'scalars.json'), 1)
    assert [p.title for p in seg] == ['loss', 'aux.loss_ce', 'decode.loss_ce', 'learning rate', 'aAcc', 'mAcc',
                                      'mIoU']
    miou, panel = curves(seg, 'mIoU')
    assert panel.xlabel == 'iteration' and miou[(1, '')] == ([20, 40], [20.0, 30.0])

    smooth = plot.read_run(str(tmp_path / 'seg'), 0, smooth=2)
    raw = curves(seg, 'loss')[0][(1, '')][1]
    assert curves(smooth, 'loss')[0][(0, '')][1] == pytest.approx(
        [raw[0], (raw[0] + raw[1]) / 2, (raw[1] + raw[2]) / 2, (raw[2] + raw[3]) / 2])

    # two detection runs and a chosen key on one chart
    mmdet_work_dir(tmp_path / 'det2')
    out = tmp_path / 'det.png'
    assert plot.cli([str(tmp_path / 'det'), str(tmp_path / 'det2'), '--labels', 'a', 'b', '--keys', 'loss',
                     'coco/bbox_mAP_50', '--out', str(out)]) == 0
    assert 'wrote' in capsys.readouterr().out and png_pixels(out).shape[1] > 600
    keyed = plot.merge([plot.read_run(str(tmp_path / 'det'), 0, keys=['coco/bbox_mAP_50']),
                        plot.read_run(str(tmp_path / 'det2'), 1, keys=['coco/bbox_mAP_50'])])
    assert len(keyed) == 1 and len(keyed[0].curves) == 2 and keyed[0].curves[1].y == pytest.approx([0.30, 0.45])


def test_errors_are_one_line(plot, tmp_path, capsys):
    (tmp_path / 'empty').mkdir()
    write_lines(tmp_path / 'bad' / 'log.txt', [dict(epoch=0, train_loss=1.0)])
    with open(tmp_path / 'bad' / 'log.txt', 'a') as f:
        f.write('Epoch: [1] not json\n')
    cls_log(tmp_path / 'ok')
    cases = [
        ([str(tmp_path / 'missing')], 'no such file or folder'),
        ([str(tmp_path / 'empty')], 'no log.txt'),
        ([str(tmp_path / 'bad')], 'line 2 is not JSON'),
        ([str(tmp_path / 'ok'), '--keys', 'nothing_like_this'], 'has no nothing_like_this to plot'),
        ([str(tmp_path / 'ok'), '--labels', 'a', 'b'], '2 --labels for 1 runs'),
        ([str(tmp_path / 'ok'), '--out', str(tmp_path / 'x.pdf')], 'name a .png file'),
    ]
    for argv, message in cases:
        assert plot.cli(argv + (['--out', str(tmp_path / 'o.png')] if '--out' not in argv else [])) == 1
        err = capsys.readouterr().err
        assert err.startswith('error: ') and message in err and len(err.strip().splitlines()) == 1, (argv, err)
    assert not (tmp_path / 'o.png').exists()
