"""scalablevit.mm.ScalableViTBackbone, in the shape of mmdet's tests/test_models/test_backbones/test_swin.py."""
import pytest
import torch

import scalablevit.mm as mm  # noqa: E402
from scalablevit import ScalableViT  # noqa: E402
from scalablevit.checkpoint import CheckpointError, CheckpointMismatchError  # noqa: E402

ScalableViTBackbone = mm.ScalableViTBackbone

# Four stages, both block types (IWSA at even, SSA at odd block indices), every SSA branch (r > 1 and r = 1).
TINY = dict(embed_dims=(16, 32, 48, 64), num_heads=(1, 2, 3, 4), depths=(2, 2, 2, 2), sr_ratios=(8, 4, 2, 1),
            c_ratios=(1.25, 1.25, 1.25, 1))


def _backbone(**kwargs):
    kwargs.setdefault('arch', TINY)
    kwargs.setdefault('drop_path_rate', 0.)
    return ScalableViTBackbone(**kwargs)


def _classifier_state_dict(**overrides):
    torch.manual_seed(1)
    return ScalableViT(**dict(TINY, **overrides), num_classes=10).state_dict()


@pytest.mark.parametrize('size, shapes', [
    ((511, 511), [(128, 128), (64, 64), (32, 32), (16, 16)]),
    ((112, 137), [(28, 35), (14, 18), (7, 9), (4, 5)]),
    ((64, 64), [(16, 16), (8, 8), (4, 4), (2, 2)]),
])
def test_odd_sizes_give_exact_pyramid(size, shapes):
    model = _backbone().eval()
    with torch.no_grad():
        outs = model(torch.randn(1, 3, *size))
    assert [tuple(o.shape) for o in outs] == [(1, c, h, w) for c, (h, w) in zip(TINY['embed_dims'], shapes)]
    assert all(torch.isfinite(o).all() for o in outs)


def test_out_indices_prunes_unused_stages():
    model = _backbone(out_indices=(1, 2))
    assert len(model.stages) == 3 and len(model.patch_embeds) == 3  # stage 3 is never built
    assert sorted(model.out_norms.keys()) == ['1', '2']
    assert not any(k.startswith(('head.', 'norm.')) for k in model.state_dict())
    outs = model(torch.randn(2, 3, 96, 80))
    assert [tuple(o.shape) for o in outs] == [(2, 32, 12, 10), (2, 48, 6, 5)]
    # Every parameter gets a gradient (DDP with find_unused_parameters=False needs this).
    sum(o.sum() for o in outs).backward()
    assert all(p.grad is not None for p in model.parameters())


def test_out_norm_is_a_layernorm_on_channels():
    model = _backbone(out_indices=(3,)).eval()
    with torch.no_grad():
        (y,) = model(torch.randn(2, 3, 64, 64))
    assert torch.allclose(y.mean(1), torch.zeros_like(y.mean(1)), atol=1e-4)  # weight 1, bias 0 at init
    plain = _backbone(out_indices=(3,), out_norm=False)
    assert all(isinstance(m, torch.nn.Identity) for m in plain.out_norms.values())


def test_arch_names():
    from scalablevit.model import MODEL_ARGS, resolve_arch
    for alias, name in (('s', 'scalable_vit_small'), ('B', 'scalable_vit_base'), ('l', 'scalable_vit_large')):
        assert resolve_arch(alias) == resolve_arch(name) == (name, MODEL_ARGS[name])
    # Backbone = classification model without its 4096-wide head and final norm, plus four output norms.
    model = ScalableViTBackbone(arch='s')
    full = ScalableViT(**MODEL_ARGS['scalable_vit_small'])
    head_and_norm = sum(p.numel() for n, p in full.named_parameters() if n.startswith(('head.', 'norm.')))
    out_norms = sum(2 * c for c in model.embed_dims)
    assert sum(p.numel() for p in model.parameters()) == \
        sum(p.numel() for p in full.parameters()) - head_and_norm + out_norms


@pytest.mark.parametrize('kwargs, match', [
    (dict(arch='xl'), 'unknown ScalableViT arch'),
    (dict(out_indices=(4,)), 'out_indices'),
    (dict(out_indices=(-1,)), 'out_indices'),
    (dict(out_indices=()), 'out_indices'),
    (dict(out_indices=(2, 1)), 'increasing'),
    (dict(frozen_stages=4), 'frozen_stages'),
    (dict(frozen_stages=-2), 'frozen_stages'),
    (dict(pretrained='a.pth', init_cfg=dict(type='Pretrained', checkpoint='a.pth')), 'either'),
    (dict(init_cfg=dict(type='Kaiming')), 'init_cfg'),
    (dict(arch=dict(TINY, num_heads=(1, 2, 3))), 'num_heads'),
])
def test_invalid_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _backbone(**kwargs)


@pytest.mark.parametrize('frozen_stages', [0, 2])
def test_frozen_stages_stay_frozen(frozen_stages):
    model = _backbone(frozen_stages=frozen_stages)
    model.train()
    for i in range(4):
        frozen = i <= frozen_stages
        for part in (model.patch_embeds[i], model.stages[i], model.pos_block[i]):
            assert all(p.requires_grad != frozen for p in part.parameters())
            assert all(m.training != frozen for m in part.modules())
    assert all(p.requires_grad for p in model.out_norms.parameters())
    # A training step leaves the frozen weights untouched.
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    torch.manual_seed(0)  # (a plain mean of a LayerNorm output has no gradient: weight it)
    sum((o * torch.randn_like(o)).mean() for o in model(torch.randn(2, 3, 64, 64))).backward()
    opt.step()
    after = model.state_dict()
    for k in before:
        changed = not torch.equal(before[k], after[k])
        stage = int(k.split('.')[1]) if k.startswith(('patch_embeds.', 'stages.', 'pos_block.')) else None
        if stage is not None and stage <= frozen_stages:
            assert not changed, k
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith('stages.3.'))


def test_with_cp_equals_plain():
    torch.manual_seed(0)
    plain = _backbone()
    cp = _backbone(with_cp=True)
    cp.load_state_dict(plain.state_dict())
    plain.train(), cp.train()
    x = torch.randn(1, 3, 64, 72)
    outs_p, outs_c = plain(x), cp(x)
    for a, b in zip(outs_p, outs_c):
        torch.testing.assert_close(a, b)
    sum(o.square().mean() for o in outs_p).backward()
    sum(o.square().mean() for o in outs_c).backward()
    for (n, a), b in zip(plain.named_parameters(), cp.parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=n)


def test_pretrained_from_classification_checkpoint(tmp_path):
    sd = _classifier_state_dict()
    path = tmp_path / 'cls.pth'
    torch.save({'model': sd, 'epoch': 3}, path)  # what classification/ writes (DeiT layout)
    model = _backbone(out_indices=(0, 1, 2), init_cfg=dict(type='Pretrained', checkpoint=str(path)))
    model.init_weights()
    own = model.state_dict()
    for k, v in own.items():
        if k.startswith('out_norms.'):
            continue
        assert torch.equal(v, sd[k]), k
    assert not any(k.startswith('stages.3.') for k in own)
    # `pretrained=` is the same thing, and the result dict names what was dropped, skipped and initialised.
    info = mm.load_pretrained(_backbone(out_indices=(0, 1, 2)), str(path))
    assert {k.split('.')[0] for k in info['dropped']} == {'head', 'norm'}
    assert info['skipped'] and all(k.split('.')[1] == '3' for k in info['skipped'])
    assert info['missing'] and all(k.startswith('out_norms.') for k in info['missing'])


def test_pretrained_released_small_state_dict():
    import timm

    import scalablevit  # noqa: F401  (registers the timm entry points)
    sd = timm.create_model('scalable_vit_small').state_dict()
    model = ScalableViTBackbone(arch='s')
    info = mm.load_pretrained(model, {'model': sd})
    assert sorted(info['missing']) == sorted(f'out_norms.{i}.{w}' for i in range(4) for w in ('weight', 'bias'))
    assert {k.split('.')[0] for k in info['dropped']} == {'head', 'norm'} and not info['skipped']
    assert torch.equal(model.stages[2][19].attn.proj.weight, sd['stages.2.19.attn.proj.weight'])


def test_pretrained_wrong_checkpoint_names_the_keys(tmp_path):
    wrong_size = tmp_path / 'wider.pth'
    torch.save({'model': _classifier_state_dict(embed_dims=(16, 32, 48, 96), num_heads=(1, 2, 3, 4))}, wrong_size)
    model = _backbone(init_cfg=dict(type='Pretrained', checkpoint=str(wrong_size)))
    with pytest.raises(CheckpointMismatchError, match=r'34 of another shape \(patch_embeds\.3\.norm\.bias: checkpoint'):
        model.init_weights()

    sd = _classifier_state_dict()
    del sd['pos_block.1.proj.0.weight']
    sd['extra.weight'] = torch.zeros(1)
    with pytest.raises(CheckpointMismatchError) as err:
        mm.load_pretrained(_backbone(), {'state_dict': sd})
    assert '1 missing (pos_block.1.proj.0.weight)' in str(err.value)
    assert '1 unexpected (extra.weight)' in str(err.value)
    assert '\n' not in str(err.value)  # one line, the project's one format (scalablevit.checkpoint)

    with pytest.raises(CheckpointError, match='checkpoint not found: .*nowhere.pth'):
        _backbone(pretrained=str(tmp_path / 'nowhere.pth')).init_weights()


def test_found_by_mmdet_registry():
    from mmdet.registry import MODELS as mmdet_models
    model = mmdet_models.build(dict(type='ScalableViTBackbone', arch=TINY, out_indices=(3,)))
    assert type(model) is ScalableViTBackbone and model.out_indices == (3,)
    direct = ScalableViTBackbone(arch=TINY, out_indices=(3,))
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in direct.named_parameters()]
    outs = model.eval()(torch.zeros(1, 3, 64, 64))
    assert len(outs) == 1 and outs[0].shape[-2:] == (2, 2)  # stage 4: stride 32


def test_adapt_cfg_to_device_on_cpu():
    from mmengine.config import Config

    from scalablevit.mm.config import adapt_cfg_to_device
    cfg = Config(dict(model=dict(backbone=dict(norm_cfg=dict(type='SyncBN')),
                                 heads=[dict(norm_cfg=dict(type='SyncBN', requires_grad=True))]),
                      env_cfg=dict(dist_cfg=dict(backend='nccl'))))
    adapt_cfg_to_device(cfg, device='cpu')
    assert cfg.env_cfg.dist_cfg.backend == 'gloo'
    assert cfg.model.backbone.norm_cfg.type == 'SyncBNCPU' and cfg.model.heads[0].norm_cfg.type == 'SyncBNCPU'
    assert cfg.model_wrapper_cfg.device_ids is None
    gpu = Config(dict(model=dict(norm_cfg=dict(type='SyncBN')), env_cfg=dict(dist_cfg=dict(backend='nccl'))))
    adapt_cfg_to_device(gpu, device='cuda')
    assert gpu.model.norm_cfg.type == 'SyncBN' and gpu.env_cfg.dist_cfg.backend == 'nccl'


@pytest.mark.slow
def test_importing_scalablevit_mm_applies_the_patches_and_scalablevit_does_not():
    """The configs' one entry point brings the compatibility patches; the model package brings nothing of
    OpenMMLab."""
    import subprocess
    import sys
    code = '\n'.join([
        'import builtins, torch, mmengine.hooks.checkpoint_hook as hook',
        'from mmengine.fileio import get_file_backend',
        'from mmengine.registry import MODELS',
        'from torch.serialization import get_safe_globals',
        'safe = set(get_safe_globals())',
        'import scalablevit, timm; timm.create_model("scalable_vit_small")',
        'assert type(get_file_backend("/x.pth")).__name__ == "LocalBackend", "patched by import scalablevit"',
        'assert "open" not in vars(hook) and "SyncBNCPU" not in MODELS.module_dict',
        'import scalablevit.mm',
        'assert type(get_file_backend("/x.pth")).__name__ == "AtomicLocalBackend"',
        'assert hook.open.__name__ == "atomic_open" and "SyncBNCPU" in MODELS.module_dict',
        'added = [g for g in get_safe_globals() if g not in safe and not g.__module__.startswith("torch")]',
        'assert added == [], f"added to torch\'s allow-list: {added}"',
        'print("ok")'])
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == 'ok', out.stderr[-2000:]


def _sync_bn_worker(rank, world, port, x, queue):
    import torch.distributed as dist

    from scalablevit.mm.compat import SyncBatchNormCPU
    dist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{port}', rank=rank, world_size=world)
    torch.manual_seed(0)
    bn = SyncBatchNormCPU(3, momentum=0.5)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1., 2., 3.]))
    part = x.chunk(world)[rank].clone().requires_grad_(True)
    y = bn(part)
    (y * torch.arange(1., part.numel() + 1).view_as(part)).sum().backward()
    # numpy: pickled by value (a tensor would travel as shared memory that dies with this process)
    queue.put((rank, *(t.detach().numpy().copy() for t in (y, part.grad, bn.weight.grad, bn.running_mean,
                                                           bn.running_var))))
    dist.destroy_process_group()


@pytest.mark.slow
def test_sync_bn_cpu_equals_batch_norm_on_the_whole_batch(free_port):
    """Two gloo processes with half the batch each: outputs, input and weight gradients (summed as DDP does) and
    running statistics equal one BatchNorm2d on the whole batch."""
    import torch.multiprocessing as mp
    torch.manual_seed(0)
    x = torch.randn(4, 3, 5, 6) * 2 + 1
    ctx = mp.get_context('fork')  # the workers inherit the imports: seconds, not tens of seconds
    queue = ctx.Queue()
    procs = [ctx.Process(target=_sync_bn_worker, args=(r, 2, free_port, x, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = {r[0]: [torch.from_numpy(a) for a in r[1:]] for r in (queue.get(timeout=120) for _ in procs)}
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0

    ref = torch.nn.BatchNorm2d(3, momentum=0.5)
    with torch.no_grad():
        ref.weight.copy_(torch.tensor([1., 2., 3.]))
    whole = x.clone().requires_grad_(True)
    y = ref(whole)
    weights = torch.cat([torch.arange(1., x[:2].numel() + 1).view_as(x[:2])] * 2)
    (y * weights).sum().backward()
    y0, g0, w0, m0, v0 = results[0]
    y1, g1, w1, m1, v1 = results[1]
    torch.testing.assert_close(torch.cat([y0, y1]), y.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat([g0, g1]), whole.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(w0 + w1, ref.weight.grad, atol=1e-4, rtol=1e-4)
    for m, v in ((m0, v0), (m1, v1)):
        torch.testing.assert_close(m, ref.running_mean)
        torch.testing.assert_close(v, ref.running_var)
