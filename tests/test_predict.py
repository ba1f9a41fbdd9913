"""classification/predict.py and the checkpoint ``meta`` it reads: real image files (RGB, grayscale, RGBA, an
unreadable one), folders and globs, JSON checked against the model's own output, DIGITS PNGs predicted with the
accuracy of ``main.py --eval``; clear one-line errors.

Tiny models on CPU. ``classification/`` scripts import each other as top-level modules (DeiT layout), so the
in-process tests load them through a fixture that restores ``sys.path`` and ``sys.modules`` afterwards.
"""
import argparse
import json
import os
import re
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
    latin1 = tmp_path / 'latin1.txt'
    latin1.write_bytes('caf\xe9\nb\nc\n'.encode('latin-1'))  # 'caf' + 0xe9 + '\n': not UTF-8 at offset 3
    cases = [
        ([str(img), '--checkpoint', str(tmp_path / 'missing.pth')], 'checkpoint not found'),
        ([str(img), '--checkpoint', str(tmp_path / 'junk.pth')], 'cannot read checkpoint'),
        ([str(tmp_path / 'nothing*.jpg'), '--checkpoint', str(tmp_path / 'ckpt.pth')], 'no images match'),
        ([str(img), '--checkpoint', str(tmp_path / 'ckpt.pth'), '--model-kwargs', 'depths=(2,1)'],
         'does not fit ScalableViT: 14 unexpected (stages.1.1.'),
        ([str(img), '--checkpoint', str(tmp_path / 'ckpt.pth'), '--num-classes', '5'], 'of another shape (head.'),
        ([str(tmp_path / 'ckpt.pth'), '--checkpoint', str(tmp_path / 'ckpt.pth')], 'none of the images'),
        ([str(img), '--checkpoint', str(tmp_path / 'ckpt.pth'), '--batch-size', '0'],
         '--batch-size must be at least 1, got 0'),
        ([str(img), '--checkpoint', str(tmp_path / 'ckpt.pth'), '--num-workers', '-1'],
         '--num-workers must be 0 or more, got -1'),
        ([str(img), '--checkpoint', str(tmp_path / 'ckpt.pth'), '--class-names', str(latin1)],
         f'--class-names {latin1}: not UTF-8 text (byte 3: invalid continuation byte)'),
        ([str(img), '--checkpoint', str(tmp_path / 'ckpt.pth'), '--class-names', str(tmp_path / 'no.txt')],
         'file not found'),
    ]
    for argv, message in cases:
        assert predict.cli(argv) == 1, argv
        err = capsys.readouterr().err
        assert 'Traceback' not in err, err
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
    # stderr is a pipe here: no progress bar (it would interleave with the log), a timing line per batch
    assert 'predict:' not in r.stderr and '%|' not in r.stderr, r.stderr[-2000:]
    timings = re.findall(r'^batch (\d+)/(\d+): (\d+) images, model [\d.]+ ms', r.stderr, re.M)
    assert [int(t[0]) for t in timings] == list(range(1, int(timings[0][1]) + 1))
    assert sum(int(t[2]) for t in timings) == 360
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


# ---------------------------------------------------------------------------------------------------------------------
# Engine backends: the files of tools/export.py, run without the model's code

_EXPORTED = {}  # the files of the fixture below, made once: the tests read them (and write only their results)


@pytest.fixture
def exported(cls_dir, tmp_path_factory):
    """A tiny checkpoint with meta and its ONNX and OpenVINO exports (32 px), plus a folder of images."""
    if 'dir' not in _EXPORTED:
        from scalablevit.serving import export_model, serving_meta
        tmp = tmp_path_factory.mktemp('exported')
        datasets = cls_dir('datasets')
        model = tiny_model()
        meta = save_with_meta(datasets, model, tmp / 'ckpt.pth', ['cat', 'dog', 'eel'], input_size=32)
        cfg = meta['pretrained_cfg']
        for fmt, name in (('onnx', 'm.onnx'), ('openvino', 'm.xml')):
            export_model(tiny_model(), str(tmp / name), fmt, serving_meta(model, ['cat', 'dog', 'eel'], cfg),
                         (3, 32, 32))
        make_images(tmp / 'images')
        _EXPORTED['dir'] = tmp
    return _EXPORTED['dir']


@pytest.mark.parametrize('backend, file', [('onnxruntime', 'm.onnx'), ('openvino', 'm.xml'),
                                           ('openvino', 'm.onnx')])
def test_engine_backends_give_the_torch_predictions(cls_dir, exported, backend, file, capsys):
    predict = cls_dir('predict')
    images = str(exported / 'images')
    outs = {}
    for name, argv in (('torch', ['--checkpoint', str(exported / 'ckpt.pth')]),
                       (backend, ['--backend', backend, '--checkpoint', str(exported / file), '--threads', '1'])):
        out = exported / f'{name}.json'
        rc = predict.cli([images, *argv, '--results-file', str(out), '--topk', '2', '--batch-size', '2'])
        captured = capsys.readouterr()
        assert rc == 0, captured.err
        outs[name] = json.loads(out.read_text())
        # a timing line per batch (3 readable images in batches of 2, the unreadable one skipped)
        assert 'batch 1/2: 1 images, model ' in captured.err and 'batch 2/2: 2 images, model ' in captured.err
        assert f'img/s, {name})' in captured.err
        assert 'skipped cannot read image' in captured.err
    torch_out, engine_out = outs['torch'], outs[backend]
    assert [r['image'] for r in engine_out] == [r['image'] for r in torch_out]
    for a, b in zip(engine_out, torch_out):
        assert [e['index'] for e in a['topk']] == [e['index'] for e in b['topk']]
        assert [e['label'] for e in a['topk']] == [e['label'] for e in b['topk']]
        assert [e['prob'] for e in a['topk']] == pytest.approx([e['prob'] for e in b['topk']], abs=1e-5)
    assert set(engine_out[0]) == {'image', 'topk'} and set(engine_out[0]['topk'][0]) == {'index', 'label', 'prob'}


def test_engine_backends_need_no_model_code(cls_dir, exported, monkeypatch, capsys):
    """The engine path builds no torch model: with timm.create_model broken, it still predicts."""
    import scalablevit.serving
    predict = cls_dir('predict')

    def no_model(*a, **k):
        raise AssertionError('the engine backend built a torch model')
    monkeypatch.setattr(timm, 'create_model', no_model)
    monkeypatch.setattr(scalablevit.serving, 'load_classifier', no_model)
    assert predict.cli([str(exported / 'images'), '--backend', 'onnxruntime', '--checkpoint',
                        str(exported / 'm.onnx'), '--quiet']) == 0, capsys.readouterr().err


def test_engine_backend_bad_inputs_are_one_line_errors(cls_dir, exported, monkeypatch, tmp_path, capsys):
    predict = cls_dir('predict')
    images = str(exported / 'images')
    (tmp_path / 'junk.onnx').write_bytes(b'\x00not onnx')
    (tmp_path / 'fake.xml').write_text('<net></net>')  # XML, but no IR: refused before OpenVINO's frontends see it
    (tmp_path / 'binary.xml').write_bytes(b'\x00\xff not xml')
    cases = [
        (['--backend', 'onnxruntime', '--checkpoint', str(exported / 'ckpt.pth')], 'not an exported model'),
        (['--backend', 'onnxruntime', '--checkpoint', str(tmp_path / 'junk.onnx')], 'not an ONNX model'),
        (['--backend', 'openvino', '--checkpoint', str(tmp_path / 'fake.xml')],
         'not an OpenVINO IR (its root element is <net>, not <net version=...>)'),
        (['--backend', 'openvino', '--checkpoint', str(tmp_path / 'binary.xml')], 'not an OpenVINO IR (not XML'),
        (['--backend', 'onnxruntime', '--checkpoint', str(exported / 'm.xml')], 'which onnxruntime does not run'),
        (['--checkpoint', str(exported / 'm.onnx')], 'which torch does not run; use --backend onnxruntime'),
        (['--backend', 'openvino', '--checkpoint', str(tmp_path / 'missing.xml')], 'exported model not found'),
        (['--backend', 'onnxruntime', '--checkpoint', str(exported / 'm.onnx'), '--input-size', '48'],
         'was exported for 32x32 images'),
        (['--backend', 'onnxruntime', '--checkpoint', str(exported / 'm.onnx'), '--model', 'x'],
         '--model: the exported file'),
        (['--backend', 'onnxruntime', '--checkpoint', str(exported / 'm.onnx'), '--amp'], 'fp32 only'),
    ]
    for argv, message in cases:
        assert predict.cli([images, *argv]) == 1, argv
        err = capsys.readouterr().err
        assert 'Traceback' not in err, err
        last = err.strip().splitlines()[-1]
        assert last.startswith('error: ') and message in last, err
    # an engine that is not installed: the package is named
    for package, backend, file in (('openvino', 'openvino', 'm.xml'), ('onnxruntime', 'onnxruntime', 'm.onnx')):
        with monkeypatch.context() as m:
            m.setitem(sys.modules, package, None)  # import raises ImportError
            assert predict.cli([images, '--backend', backend, '--checkpoint', str(exported / file)]) == 1
        err = capsys.readouterr().err
        assert err.strip().splitlines()[-1].startswith(f'error: --backend {backend} needs the {package} package, '
                                                       f'which is not installed'), err
        assert f'pip install {package}' in err
