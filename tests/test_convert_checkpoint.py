"""tools/convert_checkpoint.py: classification <-> detection/segmentation backbone <-> timm folder, wrappers and EMA
unwrapped, every output loaded back into its real target and compared; clear errors. Tiny models, CPU."""
import json
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file, safe_open

import scalablevit  # noqa: F401  (registers the models)

REPO = Path(__file__).resolve().parents[1]
TINY = dict(embed_dims=(16, 32, 48), num_heads=(1, 2, 3), depths=(2, 2, 2), sr_ratios=(4, 2, 1),
            c_ratios=(1.25, 1, 1), wss=(4, 2, 2), mlp_ratios=(2, 2, 2))
META_CFG = dict(input_size=(3, 32, 32), interpolation='bicubic', crop_pct=0.875, crop_mode='center',
                mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))


@pytest.fixture(scope='module')
def conv(load_script):
    return load_script('tools/convert_checkpoint.py')


def classifier(num_classes=5, seed=0, **kwargs):
    torch.manual_seed(seed)
    return timm.create_model('scalable_vit_small', num_classes=num_classes, **{**TINY, **kwargs}).eval()


def randomize(model, seed):
    """Every parameter random (norms too), so a weight taken from the wrong place changes the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale_like = 'norm' in name and name.endswith('weight')  # LayerNorm gains around 1
            p.copy_(torch.randn(p.shape, generator=g) * 0.2 + (1.0 if scale_like else 0.0))
    return model


def x_in(size=32):
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(3))


def run(conv, capsys, *argv):
    rc = conv.cli([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def mm_checkpoint(path, out_indices=(0, 1, 2), out_norm=True, with_cfg=True, seed=1):
    """What an mmengine runner saves for a detector: backbone/neck/head weights, message hub, the config text."""
    from mmengine.config import Config
    from mmengine.logging.history_buffer import HistoryBuffer

    from scalablevit.mm import ScalableViTBackbone

    backbone_cfg = dict(type='ScalableViTBackbone', arch=dict(TINY), out_indices=out_indices, out_norm=out_norm,
                        drop_path_rate=0.1, init_cfg=None)
    backbone = randomize(ScalableViTBackbone(**{k: v for k, v in backbone_cfg.items() if k != 'type'}), seed).eval()
    state = {f'backbone.{k}': v for k, v in backbone.state_dict().items()}
    state['neck.lateral_convs.0.conv.weight'] = torch.randn(8, 16, 1, 1)
    state['bbox_head.retina_cls.weight'] = torch.randn(9, 8, 3, 3)
    buffer = HistoryBuffer()
    buffer.update(0.5)
    meta = dict(epoch=1, iter=10, mmengine_version='0.10.7')
    if with_cfg:
        meta['cfg'] = Config(dict(model=dict(type='RetinaNet', backbone=backbone_cfg,
                                             neck=dict(type='FPN', in_channels=[16, 32, 48])))).pretty_text
    torch.save(dict(meta=meta, state_dict=state, message_hub=dict(log_scalars=dict(loss=buffer))), path)
    return backbone


# ---------------------------------------------------------------------------------------------------------------------

def test_classification_to_backbone_unwraps_ddp_compile_and_ema(conv, tmp_path, capsys):
    from scalablevit.mm import ScalableViTBackbone

    model = randomize(classifier(), 0)
    ema = randomize(classifier(), 7)
    wrap = 'module._orig_mod.'  # DDP around torch.compile
    meta = dict(model='scalable_vit_small', model_kwargs={k: list(v) for k, v in TINY.items()}, num_classes=5,
                class_names=list('abcde'), pretrained_cfg=META_CFG)
    torch.save(dict(model={wrap + k: v for k, v in model.state_dict().items()},
                    model_ema={'_orig_mod.module.' + k: v for k, v in ema.state_dict().items()},  # other order
                    optimizer={}, epoch=3, meta=meta), tmp_path / 'cls.pth')

    for flag, source in (((), model), (('--ema',), ema)):
        out = tmp_path / f'backbone{"_ema" * bool(flag)}.pth'
        rc, stdout, err = run(conv, capsys, tmp_path / 'cls.pth', out, *flag)
        assert rc == 0, err
        assert 'strict load into ScalableViTBackbone' in stdout and 'dropped head, norm' in stdout
        saved = torch.load(out, weights_only=True)
        assert not [k for k in saved['state_dict'] if k.startswith(('head.', 'norm.', 'module.', '_orig_mod.'))]
        assert saved['meta']['model'] == 'scalable_vit_small'
        # what a det/seg config does with it: init_cfg=dict(type='Pretrained', checkpoint=...)
        backbone = ScalableViTBackbone(arch=dict(TINY), out_indices=(0, 1, 2),
                                       init_cfg=dict(type='Pretrained', checkpoint=str(out))).eval()
        backbone.init_weights()
        with torch.no_grad():
            want = source.forward_intermediates(x_in(), intermediates_only=True)
            got = backbone.forward_intermediates(x_in(), intermediates_only=True)
        for a, b in zip(want, got):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_detection_to_classifier_takes_the_last_output_norm(conv, tmp_path, capsys):
    backbone = mm_checkpoint(tmp_path / 'det.pth')
    for out in (tmp_path / 'cls.pth', tmp_path / 'cls.safetensors'):
        rc, stdout, err = run(conv, capsys, tmp_path / 'det.pth', out, '--check-size', '64')
        assert rc == 0, err
        assert 'norm <- out_norms.2' in stdout and 'dropped out_norms and bbox_head, neck' in stdout
    weights = torch.load(tmp_path / 'cls.pth', weights_only=True)['state_dict']
    assert weights.keys() == load_file(tmp_path / 'cls.safetensors').keys()
    with safe_open(tmp_path / 'cls.safetensors', 'pt') as f:
        assert json.loads(f.metadata()['meta'])['model_kwargs']['depths'] == [2, 2, 2]
    # an ImageNet-style state dict: timm's loader takes it strictly (pretrained=True, file=...)
    model = timm.create_model('scalable_vit_small', pretrained=True, num_classes=0, **TINY,
                              pretrained_cfg_overlay=dict(file=str(tmp_path / 'cls.safetensors'),
                                                          num_classes=0)).eval()
    assert not any(k.startswith(('backbone.', 'out_norms.', 'neck.')) for k in weights)
    with torch.no_grad():
        feats = backbone(x_in(48))
        final = model.forward_features(x_in(48))  # after the final norm: (B, C, H, W), or tokens (B, N, C)
        inter = model.forward_intermediates(x_in(48), intermediates_only=True)
    final = final.transpose(1, 2).reshape(feats[-1].shape) if final.dim() == 3 else final
    torch.testing.assert_close(final, feats[-1], rtol=0, atol=0)
    # the other stages have no norm in the classifier: their maps are the backbone's before out_norms
    with torch.no_grad():
        for i in (0, 1):
            normed = backbone.out_norms[str(i)](inter[i].permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
            torch.testing.assert_close(normed, feats[i], rtol=0, atol=0)


def test_detection_without_last_norm_and_with_arch_flag(conv, tmp_path, capsys):
    mm_checkpoint(tmp_path / 'det.pth', out_norm=False, with_cfg=False)
    rc, _, err = run(conv, capsys, tmp_path / 'det.pth', tmp_path / 'cls.pth')
    assert rc == 1 and 'records no config' in err and 'give --config' in err
    # --arch names a released size: the tiny weights do not fit it, and the message says which keys
    rc, _, err = run(conv, capsys, tmp_path / 'det.pth', tmp_path / 'cls.pth', '--arch', 's')
    assert rc == 1 and 'does not fit ScalableViTBackbone' in err and 'of another shape' in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / 'cls.pth').exists()
    # the config as a file, as a user would pass it
    from mmengine.config import Config
    Config(dict(model=dict(backbone=dict(type='ScalableViTBackbone', arch=dict(TINY), out_indices=(0, 1, 2),
                                         out_norm=False)))).dump(str(tmp_path / 'cfg.py'))
    rc, stdout, err = run(conv, capsys, tmp_path / 'det.pth', tmp_path / 'cls.pth', '--config', tmp_path / 'cfg.py',
                          '--check-size', '64')
    assert rc == 0, err
    assert 'norm keeps its initial value' in stdout
    norm = {k: v for k, v in torch.load(tmp_path / 'cls.pth', weights_only=True)['state_dict'].items()
            if k.startswith('norm.')}
    assert torch.equal(norm['norm.weight'], torch.ones(48)) and torch.equal(norm['norm.bias'], torch.zeros(48))


@pytest.mark.slow  # about 12 s of CPU
def test_timm_folder_from_classification_and_from_detection(conv, tmp_path, capsys):
    model = randomize(classifier(num_classes=5), 0)
    meta = dict(model='scalable_vit_small', model_kwargs={k: list(v) for k, v in TINY.items()}, num_classes=5,
                class_names=list('abcde'), pretrained_cfg=META_CFG)
    torch.save(dict(model=model.state_dict(), meta=meta), tmp_path / 'cls.pth')
    rc, stdout, err = run(conv, capsys, tmp_path / 'cls.pth', tmp_path / 'folder', '--to', 'timm')
    assert rc == 0, err
    assert 'local-dir' in stdout
    assert sorted(p.name for p in (tmp_path / 'folder').iterdir()) == ['config.json', 'model.safetensors']
    config = json.loads((tmp_path / 'folder' / 'config.json').read_text())
    assert config['architecture'] == 'scalable_vit_small' and config['label_names'] == list('abcde')
    assert config['pretrained_cfg']['input_size'] == [3, 32, 32] and config['num_classes'] == 5
    assert not list(tmp_path.glob('.convert-*'))  # the temporary folder is gone
    loaded = timm.create_model(f'local-dir:{tmp_path / "folder"}', pretrained=True).eval()
    by_file = timm.create_model('scalable_vit_small', pretrained=True, num_classes=5, **TINY,
                                pretrained_cfg_overlay=dict(file=str(tmp_path / 'folder' / 'model.safetensors'),
                                                            num_classes=5)).eval()
    with torch.no_grad():
        want = model(x_in())
        torch.testing.assert_close(loaded(x_in()), want, rtol=0, atol=0)
        torch.testing.assert_close(by_file(x_in()), want, rtol=0, atol=0)

    mm_checkpoint(tmp_path / 'det.pth')
    rc, stdout, err = run(conv, capsys, tmp_path / 'det.pth', tmp_path / 'det_folder', '--to', 'timm', '--check-size',
                          '64')
    assert rc == 0, err
    assert json.loads((tmp_path / 'det_folder' / 'config.json').read_text())['num_classes'] == 0


@pytest.mark.slow  # about 12 s of CPU
def test_released_style_file_and_bad_inputs(conv, tmp_path, capsys):
    import argparse
    model = classifier(num_classes=10, mlp_head=True)  # the released head: Linear(48, 4096) ... Linear(4096, 10)
    # a DeiT-style released file: weights under 'model', the command line as an argparse.Namespace
    torch.save(dict(model=model.state_dict(), args=argparse.Namespace(model='scalable_vit_small')),
               tmp_path / 'released.pth')
    kwargs = ['--model-kwargs', *[f'{k}={tuple(v)}' for k, v in TINY.items()]]
    rc, stdout, err = run(conv, capsys, tmp_path / 'released.pth', tmp_path / 'bb.pth', *kwargs, '--check-size', '64')
    assert rc == 0, err
    assert 'strict load into' in stdout and 'dropped head, norm' in stdout
    # without the sizes, the released sizes are assumed, and the mismatch is named in one line
    rc, _, err = run(conv, capsys, tmp_path / 'released.pth', tmp_path / 'bb2.pth')
    assert rc == 1 and err.startswith('error: checkpoint') and 'does not fit ScalableViT' in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / 'bb2.pth').exists()

    torch.save(model.state_dict(), tmp_path / 'plain.pth')
    torch.save({'fc.weight': torch.zeros(2, 2)}, tmp_path / 'other.pth')
    (tmp_path / 'junk.pth').write_bytes(b'junk')
    cases = [
        ((tmp_path / 'plain.pth', tmp_path / 'o.pth'), 'records no model name; give --model'),
        ((tmp_path / 'other.pth', tmp_path / 'o.pth'), 'is not a ScalableViT checkpoint'),
        ((tmp_path / 'junk.pth', tmp_path / 'o.pth'), 'cannot read checkpoint'),
        ((tmp_path / 'missing.pth', tmp_path / 'o.pth'), 'checkpoint not found'),
        ((tmp_path / 'released.pth', tmp_path / 'o.safetensors', *kwargs), '--to backbone writes .pth'),
        ((tmp_path / 'released.pth', tmp_path / 'o.bin', *kwargs), 'name the output .pth or .safetensors'),
        ((tmp_path / 'released.pth', tmp_path / 'o.pth', '--ema', *kwargs), 'has no EMA weights'),
    ]
    for argv, message in cases:
        rc, _, err = run(conv, capsys, *argv)
        assert rc == 1 and message in err and len(err.strip().splitlines()) == 1, (argv, err)
    assert not (tmp_path / 'o.pth').exists() and not (tmp_path / 'o.safetensors').exists()


@pytest.mark.slow
def test_real_mmengine_checkpoint_and_its_scalars(conv, load_script, tmp_path, capsys):
    """A checkpoint and scalars.json written by mmengine's own Runner (the machinery of mmdet/mmseg's train.py):
    a small detector-shaped model with a ScalableViTBackbone, two iterations on CPU."""
    import torch.nn as nn
    import torch.nn.functional as F
    from mmengine.config import Config
    from mmengine.model import BaseModel
    from mmengine.registry import DATASETS, MODELS
    from mmengine.runner import Runner
    from torch.utils.data import Dataset

    from scalablevit.mm import ScalableViTBackbone

    @MODELS.register_module(name='ConvertTestDetector', force=True)
    class Detector(BaseModel):
        def __init__(self, backbone):
            super().__init__()
            self.backbone = MODELS.build(backbone)
            self.head = nn.Linear(self.backbone.embed_dims[-1], 2)

        def forward(self, inputs, labels=None, mode='tensor'):
            logits = self.head(self.backbone(inputs)[-1].mean((2, 3)))
            return dict(loss_cls=F.cross_entropy(logits, labels)) if mode == 'loss' else logits

    @DATASETS.register_module(name='ConvertTestImages', force=True)
    class Images(Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, i):
            return torch.randn(3, 32, 32, generator=torch.Generator().manual_seed(i)), i % 2

    backbone_cfg = dict(type='ScalableViTBackbone', arch=dict(TINY), out_indices=(1, 2), init_cfg=None)
    cfg = Config(dict(
        model=dict(type='ConvertTestDetector', backbone=backbone_cfg),
        work_dir=str(tmp_path / 'work_dir'),
        train_dataloader=dict(dataset=dict(type='ConvertTestImages'), sampler=dict(type='DefaultSampler'),
                              batch_size=4, num_workers=0, collate_fn=dict(type='default_collate')),
        optim_wrapper=dict(optimizer=dict(type='AdamW', lr=1e-3)),
        train_cfg=dict(by_epoch=True, max_epochs=1),
        default_hooks=dict(checkpoint=dict(type='CheckpointHook', interval=1),
                           logger=dict(type='LoggerHook', interval=1)),
        launcher='none', randomness=dict(seed=0)))
    Runner.from_cfg(cfg).train()
    ckpt = tmp_path / 'work_dir' / 'epoch_1.pth'

    rc, stdout, err = run(conv, capsys, ckpt, tmp_path / 'cls.pth', '--check-size', '64')
    assert rc == 0, err
    assert 'norm <- out_norms.2' in stdout and 'dropped out_norms and head' in stdout
    # independently: the trained backbone (built from the config, weights from the checkpoint) vs timm's load
    from scalablevit.checkpoint import load_checkpoint
    from scalablevit.mm.checkpoint import MMENGINE_SAFE_GLOBALS
    saved = load_checkpoint(ckpt, safe_globals=MMENGINE_SAFE_GLOBALS)['state_dict']  # weights_only, allow-listed
    backbone = ScalableViTBackbone(**{k: v for k, v in backbone_cfg.items() if k != 'type'}).eval()
    backbone.load_state_dict({k[len('backbone.'):]: v for k, v in saved.items() if k.startswith('backbone.')})
    model = timm.create_model('scalable_vit_small', pretrained=True, num_classes=0, **TINY,
                              pretrained_cfg_overlay=dict(file=str(tmp_path / 'cls.pth'), num_classes=0)).eval()
    with torch.no_grad():
        final = model.forward_features(x_in(64))
        want = backbone(x_in(64))[-1]
    final = final.transpose(1, 2).reshape(want.shape) if final.dim() == 3 else final
    torch.testing.assert_close(final, want, rtol=0, atol=0)

    plot = load_script('tools/plot_logs.py')
    panels = plot.read_run(str(tmp_path / 'work_dir'), 0)
    assert [p.title for p in panels] == ['loss', 'loss_cls', 'learning rate']
    assert panels[0].curves[0].x == [1.0, 2.0] and panels[2].curves[0].y == pytest.approx([1e-3, 1e-3])
