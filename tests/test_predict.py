"""classification/predict.py and the checkpoint ``meta`` it reads: real image files (RGB, grayscale, RGBA, an
unreadable one), folders and globs, JSON checked against the model's own output, DIGITS PNGs predicted with the
accuracy of ``main.py --eval``; clear one-line errors.

Tiny models on CPU. ``classification/`` scripts import each other as top-level modules (DeiT layout), so the
in-process tests load them through a fixture that restores ``sys.path`` and ``sys.modules`` afterwards.
"""
import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from torchvision import transforms

import scalablevit  # noqa: F401  (registers the models)

REPO = Path(__file__).resolve().parents[1]
CLS_DIR = REPO / 'classification'

TINY_KWARGS = dict(embed_dims=(16, 32), num_heads=(1, 2), depths=(2, 2), sr_ratios=(2, 1), c_ratios=(1, 1),
                   wss=(4, 2), mlp_ratios=(2, 2), mlp_head=False)
TINY = ['--model', 'scalable_vit_small', '--model-kwargs', 'embed_dims=(16,32)', 'num_heads=(1,2)', 'depths=(2,2)',
        'sr_ratios=(2,1)', 'c_ratios=(1,1)', 'wss=(4,2)', 'mlp_ratios=(2,2)', 'mlp_head=False']
DIGITS = ['--data-set', 'DIGITS', '--input-size', '16', '--batch-size', '64', '--num_workers', '0',
          '--lr', '4e-3', '--unscale-lr', '--warmup-epochs', '0', '--min-lr', '1e-4', '--print-freq', '100',
          '--mixup', '0', '--cutmix', '0', '--smoothing', '0', '--drop-path', '0']


def run(script, argv, timeout=600):
    env = dict(os.environ, PYTHONUNBUFFERED='1', OMP_NUM_THREADS='1')
    env.pop('RANK', None), env.pop('WORLD_SIZE', None)
    return subprocess.run([sys.executable, script, *map(str, argv)], cwd=CLS_DIR, env=env, capture_output=True,
                          text=True, timeout=timeout)


def tiny_model(num_classes=3, seed=0):
    torch.manual_seed(seed)
    return timm.create_model('scalable_vit_small', num_classes=num_classes, **TINY_KWARGS).eval()


def save_with_meta(datasets, model, path, class_names, input_size=32, crop_ratio=0.875):
    args = argparse.Namespace(model='scalable_vit_small', model_kwargs=dict(TINY_KWARGS), nb_classes=len(class_names),
                              data_set='IMNET', input_size=input_size, eval_crop_ratio=crop_ratio)
    meta = datasets.checkpoint_meta(args, argparse.Namespace(classes=class_names))
    torch.save({'model': model.state_dict(), 'epoch': 0, 'meta': meta}, path)
    return meta


def make_images(root: Path):
    """An RGB JPEG, a grayscale PNG, an RGBA PNG (in a sub-folder), a text file named .jpg and a non-image file."""
    rng = np.random.default_rng(0)
    (root / 'sub').mkdir(parents=True)
    Image.fromarray(rng.integers(0, 256, (40, 52, 3), dtype=np.uint8)).save(root / 'rgb.jpg', quality=95)
    Image.fromarray(rng.integers(0, 256, (30, 30), dtype=np.uint8)).save(root / 'sub' / 'gray.png')
    Image.fromarray(rng.integers(0, 256, (36, 28, 4), dtype=np.uint8)).save(root / 'sub' / 'rgba.png')
    (root / 'broken.jpg').write_text('not an image')
    (root / 'notes.txt').write_text('not an image either, and not named like one')
    return [root / 'broken.jpg', root / 'rgb.jpg', root / 'sub' / 'gray.png', root / 'sub' / 'rgba.png']


def reference_probs(model, path, size, crop_pct, interpolation, mean, std):
    """The model's softmax on ``path``, preprocessed by hand (torchvision), independently of predict.py."""
    img = Image.open(path)
    img = img.convert('RGB')  # grayscale replicated; RGBA's alpha dropped, as the ImageFolder loader does
    t = transforms.Compose([
        transforms.Resize(int(size / crop_pct), interpolation=interpolation),
        transforms.CenterCrop(size),
        transforms.ToTensor(),
        transforms.Normalize(mean, std)])
    with torch.no_grad():
        return model(t(img)[None]).softmax(-1)[0]


# ---------------------------------------------------------------------------------------------------------------------

def test_meta_is_plain_and_builds_the_eval_transform(cls_dir, tmp_path):
    datasets = cls_dir('datasets')
    args = argparse.Namespace(model='scalable_vit_small', model_kwargs=dict(TINY_KWARGS), nb_classes=10,
                              data_set='DIGITS', input_size=16, eval_crop_ratio=0.875)
    digits = datasets.DigitsDataset(False, 16)
    meta = datasets.checkpoint_meta(args, digits)
    assert meta['class_names'] == [str(i) for i in range(10)] and meta['num_classes'] == 10
    assert meta['pretrained_cfg'] == dict(input_size=(3, 16, 16), interpolation='bilinear', crop_pct=1.0,
                                          crop_mode='center', mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    assert meta['model_kwargs']['depths'] == [2, 2]
    torch.save({'meta': meta}, tmp_path / 'meta.pth')
    assert torch.load(tmp_path / 'meta.pth', weights_only=True)['meta'] == meta  # plain types only
    # DIGITS: the dataset's val tensors are the recorded eval transform applied to its 8x8 'L' images
    t = datasets.build_eval_transform(meta['pretrained_cfg'])
    img, label = digits[5]
    assert digits.images[5].size == (8, 8) and digits.images[5].mode == 'L'
    assert torch.equal(img, t(digits.images[5].convert('RGB'))) and img.shape == (3, 16, 16)
    assert img.min() >= -1 and img.max() <= 1 and label == digits.targets[5]
    # ImageFolder data at 32 px resizes (no CIFAR-style pass-through): 64x48 -> short side 36 -> crop 32
    imnet = argparse.Namespace(data_set='IMNET', input_size=32, eval_crop_ratio=0.875)
    x = datasets.build_eval_transform(datasets.eval_pretrained_cfg(imnet))(Image.new('RGB', (64, 48), 'white'))
    assert x.shape == (3, 32, 32)


def test_predict_files_folders_globs_and_an_unreadable_image(cls_dir, tmp_path, capsys):
    datasets = cls_dir('datasets')
    predict = cls_dir('predict')
    model = tiny_model()
    meta = save_with_meta(datasets, model, tmp_path / 'ckpt.pth', ['cat', 'dog', 'eel'], input_size=32)
    broken, rgb, gray, rgba = make_images(tmp_path / 'images')
    out = tmp_path / 'out' / 'preds.json'

    rc = predict.cli([str(tmp_path / 'images'), str(rgb), str(tmp_path / 'images' / 'sub' / '*.png'),
                      '--checkpoint', str(tmp_path / 'ckpt.pth'), '--results-file', str(out), '--topk', '2',
                      '--batch-size', '2'])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert f'skipped cannot read image {broken}' in captured.err  # named, and the others still predicted
    results = json.loads(out.read_text())
    # folder walk order (sorted, recursive), then repeats dropped; notes.txt is not an image
    assert [r['image'] for r in results] == [str(rgb), str(gray), str(rgba)]
    cfg = meta['pretrained_cfg']
    for r, path in zip(results, (rgb, gray, rgba)):
        expected = reference_probs(model, path, 32, cfg['crop_pct'], transforms.InterpolationMode.BICUBIC,
                                   cfg['mean'], cfg['std'])
        probs, index = expected.topk(2)
        assert [e['index'] for e in r['topk']] == index.tolist()
        assert [e['label'] for e in r['topk']] == [['cat', 'dog', 'eel'][i] for i in index.tolist()]
        assert [e['prob'] for e in r['topk']] == pytest.approx(probs.tolist(), abs=1e-5)
        assert f'{path}: {r["topk"][0]["label"]} ' in captured.out

    # flags override the recorded preprocessing: another size and interpolation give other probabilities
    rc = predict.cli([str(rgb), '--checkpoint', str(tmp_path / 'ckpt.pth'), '--results-file', str(out), '--topk',
                      '5', '--input-size', '48', '--interpolation', 'bilinear', '--crop-pct', '1.0', '--quiet'])
    assert rc == 0
    r = json.loads(out.read_text())[0]
    assert len(r['topk']) == 3  # --topk is capped at the number of classes
    expected = reference_probs(model, rgb, 48, 1.0, transforms.InterpolationMode.BILINEAR, cfg['mean'], cfg['std'])
    assert [e['prob'] for e in r['topk']] == pytest.approx(expected.sort(descending=True).values.tolist(), abs=1e-5)
    assert sum(e['prob'] for e in r['topk']) == pytest.approx(1.0, abs=1e-5)


def test_weights_only_checkpoint_needs_model_and_gets_imagenet_labels(cls_dir, tmp_path, capsys):
    predict = cls_dir('predict')
    model = tiny_model(num_classes=1000)
    torch.save(model.state_dict(), tmp_path / 'weights.pth')  # a released-style file: weights only
    img = tmp_path / 'x.png'
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(img)

    assert predict.cli([str(img), '--checkpoint', str(tmp_path / 'weights.pth')]) == 1
    err = capsys.readouterr().err
    assert err.startswith('error: ') and 'give --model NAME' in err and len(err.strip().splitlines()) == 1

    out = tmp_path / 'p.json'
    kwargs = ['embed_dims=(16,32)', 'num_heads=(1,2)', 'depths=(2,2)', 'sr_ratios=(2,1)', 'c_ratios=(1,1)',
              'wss=(4,2)', 'mlp_ratios=(2,2)', 'mlp_head=False']
    rc = predict.cli([str(img), '--checkpoint', str(tmp_path / 'weights.pth'), '--model', 'scalable_vit_small',
                      '--model-kwargs', *kwargs, '--input-size', '32', '--results-file', str(out)])
    assert rc == 0, capsys.readouterr().err
    top = json.loads(out.read_text())[0]['topk']
    names = timm.data.ImageNetInfo().label_descriptions()
    assert [e['label'] for e in top] == [names[e['index']] for e in top] and len(top) == 5
    # the model's timm pretrained_cfg (bicubic, crop 0.875, ImageNet mean/std) at the overridden size
    expected = reference_probs(model, img, 32, 0.875, transforms.InterpolationMode.BICUBIC,
                               (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert [e['index'] for e in top] == expected.topk(5).indices.tolist()


def test_bad_inputs_are_one_line_errors(cls_dir, tmp_path, capsys):
    datasets = cls_dir('datasets')
    predict = cls_dir('predict')
    save_with_meta(datasets, tiny_model(), tmp_path / 'ckpt.pth', ['a', 'b', 'c'])
    img = tmp_path / 'x.png'
    Image.new('RGB', (20, 20)).save(img)
    (tmp_path / 'junk.pth').write_bytes(b'garbage')
    cases = [
        ([str(img), '--checkpoint', str(tmp_path / 'missing.pth')], 'checkpoint not found'),
        ([str(img), '--checkpoint', str(tmp_path / 'junk.pth')], 'cannot read checkpoint'),
        ([str(tmp_path / 'nothing*.jpg'), '--checkpoint', str(tmp_path / 'ckpt.pth')], 'no images match'),
        ([str(img), '--checkpoint', str(tmp_path / 'ckpt.pth'), '--model-kwargs', 'depths=(2,1)'],
         'does not fit ScalableViT: 14 unexpected (stages.1.1.'),
        ([str(img), '--checkpoint', str(tmp_path / 'ckpt.pth'), '--num-classes', '5'], 'of another shape (head.'),
        ([str(tmp_path / 'ckpt.pth'), '--checkpoint', str(tmp_path / 'ckpt.pth')], 'none of the images'),
    ]
    for argv, message in cases:
        assert predict.cli(argv) == 1, argv
        err = capsys.readouterr().err
        last = err.strip().splitlines()[-1]
        assert last.startswith('error: ') and message in last, err


@pytest.mark.slow
def test_digits_pngs_predicted_with_the_accuracy_of_eval(cls_dir, tmp_path):
    """The README's first run, shrunk: train on DIGITS, write the held-out digits as 8x8 grayscale PNGs, predict
    them from the checkpoint alone; accuracy and per-image top-1 equal ``main.py --eval``'s."""
    out = tmp_path / 'digits'
    r = run('main.py', [*TINY, *DIGITS, '--epochs', '1', '--output_dir', out])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    ckpt = torch.load(out / 'checkpoint_best.pth', weights_only=True)
    assert ckpt['meta']['class_names'] == [str(i) for i in range(10)]
    assert ckpt['meta']['model_kwargs']['embed_dims'] == [16, 32]
    r = run('main.py', [*TINY, *DIGITS, '--eval', '--resume', out / 'checkpoint_best.pth'])
    assert r.returncode == 0, r.stderr[-3000:]
    acc1 = float(r.stdout.split('* Acc@1 ')[1].split()[0])

    datasets = cls_dir('datasets')
    val = datasets.DigitsDataset(False, 16)
    pngs = tmp_path / 'pngs'
    for i, (img, label) in enumerate(zip(val.images, val.targets)):
        (pngs / str(label)).mkdir(parents=True, exist_ok=True)
        img.save(pngs / str(label) / f'{i:03d}.png')  # 8x8 grayscale, ink bright on black
    preds = tmp_path / 'preds.json'
    r = run('predict.py', [pngs, '--checkpoint', out / 'checkpoint_best.pth', '--results-file', preds, '--quiet'])
    assert r.returncode == 0, r.stderr[-3000:]
    assert 'predict: 100%' in r.stderr  # the progress bar
    results = json.loads(preds.read_text())
    assert len(results) == 360
    correct = sum(Path(e['image']).parent.name == e['topk'][0]['label'] for e in results)
    assert 100.0 * correct / 360 == pytest.approx(acc1, abs=1e-3)
    # and image by image: the model on the dataset's own tensors
    model = timm.create_model('scalable_vit_small', num_classes=10, **TINY_KWARGS).eval()
    model.load_state_dict(ckpt['model'])
    by_name = {Path(e['image']).name: e for e in results}
    with torch.no_grad():
        probs = model(torch.stack([val[i][0] for i in range(360)])).softmax(-1)
    for i in range(360):
        e = by_name[f'{i:03d}.png']
        assert e['topk'][0]['index'] == probs[i].argmax().item()
        assert e['topk'][0]['prob'] == pytest.approx(probs[i].max().item(), abs=1e-5)
