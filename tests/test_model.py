"""The backbone: faithful to the released code, loadable, any input size, timm's feature API, export."""
import math
import subprocess
import sys

import pytest
import timm
import torch
from timm.optim._param_groups import param_groups_layer_decay

import scalablevit
from scalablevit import InteractiveWindowAttention, ScalableViT
from scalablevit.info import count_macs, count_macs_by_op, count_params

# Relative (L2) error allowed against the released code's outputs. Measured in float32 on CPU, fused and plain
# alike: logits <= 9.4e-7, last-block tokens of every stage <= 1.4e-6 (tiny, S, and S with the eps probe).
REF_RTOL = 1e-5


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def _filled(ref_name, reference, fill, scale=None):
    ref = reference(ref_name)
    model = ScalableViT(**ref['config']) if 'config' in ref else timm.create_model(ref['name'])
    return fill.fill_by_name(model, scale).eval(), ref


# ---------------------------------------------------------------------------------------------------------------
# The released function


@pytest.mark.parametrize('fused', [True, False], ids=['fused', 'plain'])
@pytest.mark.parametrize('name', ['tiny', 'scalable_vit_small'])
def test_reference_outputs(name, fused, reference, fill):
    model, ref = _filled(name, reference, fill)
    model.set_fused_attn(fused)
    tokens = []
    hooks = [stage[-1].register_forward_hook(lambda m, i, o: tokens.append(o)) for stage in model.stages]
    with torch.no_grad():
        logits = model(fill.fixed_input(2, 224))
    for h in hooks:
        h.remove()
    assert logits.shape == ref['logits'].shape
    assert _rel(logits, ref['logits']) < REF_RTOL
    assert len(tokens) == len(ref['stage_last_block_tokens']) == 4
    for ours, theirs in zip(tokens, ref['stage_last_block_tokens']):
        assert ours.shape == theirs.shape
        assert _rel(ours, theirs) < REF_RTOL


@pytest.mark.parametrize('fused', [True, False], ids=['fused', 'plain'])
def test_reference_layernorm_eps(fused, reference, fill):
    """SSA's norm_act LayerNorm uses eps 1e-5 (the rest 1e-6): with shrunk reduction weights it moves logits ~30%."""
    ref = reference('scalable_vit_small.eps')
    model, _ = _filled('scalable_vit_small', reference, fill, scale=ref['scale'])
    model.set_fused_attn(fused)
    with torch.no_grad():
        logits = model(fill.fixed_input(2, 224))
    assert _rel(logits, ref['logits']) < REF_RTOL


@pytest.mark.parametrize('name', ['tiny', 'scalable_vit_small'])
def test_state_dict_matches_released(name, reference):
    ref = reference(name)
    model = ScalableViT(**ref['config']) if 'config' in ref else timm.create_model(name)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    theirs = {k: tuple(v) for k, v in ref['keys'].items()}
    assert sorted(set(ours) - set(theirs)) == [] and sorted(set(theirs) - set(ours)) == []
    assert ours == theirs
    assert count_params(model) == ref['n_params']


@pytest.mark.parametrize('name, params', [
    ('scalable_vit_small', 32_000_472),
    ('scalable_vit_base', 81.88e6),
    ('scalable_vit_large', 109.29e6),
])
def test_param_counts_of_released_code(name, params):
    n = count_params(timm.create_model(name))
    assert round(n / 1e6, 2) == round(params / 1e6, 2)


def test_info_tool_prints_table():
    out = subprocess.run([sys.executable, '-m', 'scalablevit.info', '--models', 'scalable_vit_small', 'test_vit'],
                         capture_output=True, text=True, check=True).stdout
    rows = {line.split('|')[1].strip(): [c.strip() for c in line.strip('|').split('|')]
            for line in out.splitlines() if line.startswith('| ') and not line.startswith('| model')}
    cells = rows['scalable_vit_small']
    assert cells[1] == '32.00' and cells[2] == '32.00'  # ours, the released code's
    assert cells[3] == '32.4' and cells[6] == '4.2' and cells[7] == '83.1'  # published
    assert 4.0 < float(cells[5]) < float(cells[4]) < 4.5  # GFLOPs (multiply-adds) at 224, without / with attention
    other = rows['test_vit']  # no published row: its own figures, '-' for the rest
    assert float(other[1]) > 0 and other[2] == other[3] == other[6] == other[7] == '-'


def test_info_tool_rejects_unknown_model(capsys):
    from scalablevit.info import main
    with pytest.raises(SystemExit) as e:
        main(['--models', 'scalable_vit_tiny'])
    assert e.value.code == 2
    assert 'unknown model(s): scalable_vit_tiny' in capsys.readouterr().err


def test_count_macs_inputs_and_convention():
    model = timm.create_model('scalable_vit_small', **dict(
        embed_dims=(32, 64, 96, 128), num_heads=(1, 2, 3, 4), depths=(1, 1, 1, 1)))
    m224, m448 = count_macs(model, 224), count_macs(model, (448, 448))
    assert m224.total > m224.without_attention > 0 and m224.attention == m224.total - m224.without_attention
    assert 3.5 < m448.total / m224.total < 5.0  # ~4x pixels; windowed attention keeps it near-linear
    x = torch.zeros(1, 3, 224, 224)
    assert count_macs(model, x) == m224 == count_macs(model, lambda: model(x))
    assert model.training and model.stages[0][0].attn.fused_attn  # mode and attention path restored
    # attention products on their own: one IWSA (two 49x49 window products per window) at 14x14, C=16
    attn = InteractiveWindowAttention(16, num_heads=2, ws=7)
    macs = count_macs(attn, lambda: attn(torch.zeros(1, 196, 16), (14, 14)))
    assert macs.attention == 2 * 4 * 49 * 49 * 16  # 2 products x 4 windows x 49 queries x 49 keys x C
    ops = count_macs_by_op(attn, lambda: attn(torch.zeros(1, 196, 16), (14, 14)))
    assert sum(ops.values()) == macs.total and ops['aten.bmm'] == macs.attention
    assert ops['aten.convolution'] == 196 * 16 * 9  # the LIM's depthwise 3x3: 9 per output value
    assert ops.get('aten.addmm', 0) + ops.get('aten.mm', 0) == 196 * 16 * (3 * 16 + 16)  # qkv and proj


# ---------------------------------------------------------------------------------------------------------------
# Loading checkpoints


def test_strict_round_trip(tmp_path, tiny_args):
    a = ScalableViT(num_classes=10, **tiny_args).eval()
    path = tmp_path / 'ckpt.pth'
    torch.save({'model': a.state_dict(), 'epoch': 3}, path)  # the released file's layout
    b = ScalableViT(num_classes=10, **tiny_args).eval()
    b.load_state_dict(scalablevit.unwrap_state_dict(torch.load(path, weights_only=True)), strict=True)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(a(x), b(x))


@pytest.mark.parametrize('wrap', ['model', 'state_dict', None])
def test_timm_pretrained_from_local_file(tmp_path, tiny_args, wrap):
    src = timm.create_model('scalable_vit_small', **tiny_args)  # 1000 classes, the released head
    path = tmp_path / 'released.pth'
    sd = {f'module.{k}': v for k, v in src.state_dict().items()} if wrap == 'state_dict' else src.state_dict()
    torch.save({wrap: sd} if wrap else sd, path)
    model = timm.create_model('scalable_vit_small', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                              **tiny_args)
    for k, v in src.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k


def test_finetune_with_other_class_count_drops_only_last_layer(tmp_path, tiny_args):
    src = timm.create_model('scalable_vit_small', **tiny_args)
    path = tmp_path / 'released.pth'
    torch.save({'model': src.state_dict()}, path)
    model = timm.create_model('scalable_vit_small', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                              num_classes=7, **tiny_args)
    assert model.head[3].out_features == 7
    assert torch.equal(model.head[0].weight, src.head[0].weight)
    assert torch.equal(model.stages[1][1].attn.k.weight, src.stages[1][1].attn.k.weight)


def test_wrong_checkpoint_is_an_error_naming_keys(tmp_path, tiny_args):
    src = timm.create_model('scalable_vit_small', **tiny_args)
    sd = src.state_dict()
    sd.pop('stages.2.1.attn.k.weight')
    sd['stages.2.1.attn.extra'] = torch.zeros(1)
    path = tmp_path / 'bad.pth'
    torch.save({'model': sd}, path)
    with pytest.raises(RuntimeError, match=r'stages\.2\.1\.attn\.k\.weight') as e:
        timm.create_model('scalable_vit_small', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                          **tiny_args)
    assert 'stages.2.1.attn.extra' in str(e.value)
    # a checkpoint of another size fails on shapes, naming the parameter
    torch.save({'model': src.state_dict()}, path)
    with pytest.raises(RuntimeError, match='size mismatch for patch_embeds.0.proj.weight'):
        timm.create_model('scalable_vit_small', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))


# ---------------------------------------------------------------------------------------------------------------
# Any input size


def _ceil_pyramid(h, w):
    return [(math.ceil(h / s), math.ceil(w / s)) for s in (4, 8, 16, 32)]


@pytest.mark.parametrize('size', [(112, 137), (511, 511), (65, 65), (32, 32), (224, 224)])
def test_odd_sizes_pyramid_and_fused_equals_plain(size, tiny_args):
    torch.manual_seed(0)
    model = ScalableViT(num_classes=5, **tiny_args).eval()
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        model.set_fused_attn(True)
        final, feats = model.forward_intermediates(x)
        logits_fused = model(x)
        model.set_fused_attn(False)
        _, feats_plain = model.forward_intermediates(x)
        logits_plain = model(x)
    assert [tuple(f.shape) for f in feats] == [(2, c, h, w) for c, (h, w) in zip(tiny_args['embed_dims'],
                                                                                 _ceil_pyramid(*size))]
    assert final.shape == feats[-1].shape  # the normed last map
    for a, b in zip(feats, feats_plain):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(logits_fused, logits_plain, rtol=1e-4, atol=1e-5)


def test_cpu_low_precision_training_takes_the_plain_attention(tiny_args, monkeypatch):
    """SDPA in every fp32 step and in bf16 inference; not when bf16 attention is trained on CPU (its flash backward
    is slow there), where the step still matches the fused fp32 one's gradients within bf16's precision."""
    import torch.nn.functional as F
    calls = []
    real = F.scaled_dot_product_attention
    monkeypatch.setattr(F, 'scaled_dot_product_attention', lambda *a, **k: calls.append(1) or real(*a, **k))
    torch.manual_seed(0)
    model = ScalableViT(num_classes=5, **tiny_args)
    x = torch.randn(2, 3, 64, 64)
    attn_layers = sum(1 for m in model.modules() if hasattr(m, 'attend'))

    def grads(dtype, grad=True):
        calls.clear()
        model.zero_grad()
        with torch.autocast('cpu', dtype=dtype, enabled=dtype != torch.float32), torch.set_grad_enabled(grad):
            out = model(x)
        if grad:
            out.float().sum().backward()
        return len(calls), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    n32, g32 = grads(torch.float32)
    n16, g16 = grads(torch.bfloat16)
    assert n32 == attn_layers and n16 == 0
    assert grads(torch.bfloat16, grad=False)[0] == attn_layers
    cos = torch.nn.functional.cosine_similarity(torch.cat([g.flatten() for g in g32]),
                                                torch.cat([g.flatten() for g in g16]), dim=0)
    assert cos > 0.99, cos


def test_window_padding_is_invisible():
    """A 5x5 map padded into one 7x7 window attends exactly as a 5x5 window would: padding is masked out."""
    torch.manual_seed(0)
    padded = InteractiveWindowAttention(16, num_heads=2, ws=7).eval()
    exact = InteractiveWindowAttention(16, num_heads=2, ws=5).eval()
    exact.load_state_dict(padded.state_dict())
    x = torch.randn(2, 25, 16)
    for fused in (True, False):
        padded.fused_attn = exact.fused_attn = fused
        with torch.no_grad():
            torch.testing.assert_close(padded(x, (5, 5)), exact(x, (5, 5)), rtol=1e-5, atol=1e-6)


def test_window_attention_is_local():
    """Changing a token in one window changes the attention outputs of that window only (LIM aside)."""
    torch.manual_seed(0)
    attn = InteractiveWindowAttention(8, num_heads=1, ws=7).eval()
    torch.nn.init.zeros_(attn.lim_func.weight)
    torch.nn.init.zeros_(attn.lim_func.bias)
    x = torch.randn(1, 14 * 14, 8)
    y = x.clone()
    y[0, 0] += 1.0  # top-left window
    with torch.no_grad():
        d = (attn(x, (14, 14)) - attn(y, (14, 14))).abs().sum(-1).reshape(14, 14)
    assert d[:7, :7].min() > 0
    assert d[7:, :].max() == 0 and d[:, 7:].max() == 0


def test_features_only_matches_forward_intermediates(tiny_args):
    torch.manual_seed(0)
    feat_model = timm.create_model('scalable_vit_small', features_only=True, out_indices=(1, 2, 3), **tiny_args)
    assert feat_model.feature_info.reduction() == [8, 16, 32]
    assert feat_model.feature_info.channels() == [64, 96, 128]
    full = timm.create_model('scalable_vit_small', **tiny_args)
    sd = {k.removeprefix('model.'): v for k, v in feat_model.state_dict().items()}
    missing, unexpected = full.load_state_dict(sd, strict=False)
    assert not unexpected and all(k.startswith(('head.', 'norm.')) for k in missing)
    feat_model.eval(), full.eval()
    x = torch.randn(1, 3, 112, 137)
    with torch.no_grad():
        a = feat_model(x)
        b = full.forward_intermediates(x, indices=[1, 2, 3], intermediates_only=True)
    assert len(a) == len(b) == 3
    for u, v in zip(a, b):
        torch.testing.assert_close(u, v)


def test_prune_intermediate_layers(tiny_args):
    model = ScalableViT(**tiny_args).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        want = model.forward_intermediates(x, indices=[0, 1], intermediates_only=True)
    kept = model.prune_intermediate_layers([0, 1])
    assert kept == [0, 1] and len(model.stages) == 2 and isinstance(model.head, torch.nn.Identity)
    with torch.no_grad():
        got = model.forward_intermediates(x, indices=[0, 1], intermediates_only=True)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_grad_checkpointing_equals_plain(tiny_args):
    torch.manual_seed(0)
    model = ScalableViT(num_classes=4, drop_path_rate=0., **tiny_args)
    x = torch.randn(2, 3, 72, 61)

    def run(ckpt):
        model.zero_grad()
        model.set_grad_checkpointing(ckpt)
        out = model(x)
        out.square().sum().backward()
        return out.detach(), [p.grad.clone() for p in model.parameters()]

    out_a, grads_a = run(False)
    out_b, grads_b = run(True)
    torch.testing.assert_close(out_a, out_b)
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# Model API


def test_heads_and_pooling(tiny_args):
    model = ScalableViT(num_classes=10, **tiny_args).eval()
    assert [type(m).__name__ for m in model.head] == ['Linear', 'LayerNorm', 'GELU', 'Linear']
    assert model.head[1].eps == 1e-6
    assert model.head[0].out_features == 4096 and model.head_hidden_size == model.num_features == 128
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.shape == (2, 128, 2, 2)  # the normed last map, NCHW (as timm's PVTv2)
        assert model.forward_head(feats, pre_logits=True).shape == (2, 128)
        torch.testing.assert_close(model.forward_head(feats, pre_logits=True), feats.mean((2, 3)))
        assert model(x).shape == (2, 10)
        model.reset_classifier(3)
        assert isinstance(model.head, torch.nn.Linear) and model(x).shape == (2, 3)
        model.reset_classifier(0)
        assert model(x).shape == (2, 128)
        model.reset_classifier(0, '')
        torch.testing.assert_close(model(x), feats)
    narrow = ScalableViT(num_classes=10, mlp_head_dim=48, **tiny_args)
    assert [m.weight.shape[0] for m in narrow.head if hasattr(m, 'weight')] == [48, 48, 10]
    assert narrow.head_hidden_size == 128  # timm's meaning: the width of the pooled features


def test_no_weight_decay_and_group_matcher(tiny_args):
    model = ScalableViT(**tiny_args)
    nwd = model.no_weight_decay()
    assert nwd == {n for n, _ in model.named_parameters() if n.startswith('pos_block.')} and len(nwd) == 8
    groups = param_groups_layer_decay(model, weight_decay=0.05, no_weight_decay_list=nwd, layer_decay=0.9)
    assert sum(len(g['params']) for g in groups) == len(list(model.parameters()))
    assert len({g['lr_scale'] for g in groups}) > 4  # blocks map to distinct layers


def test_released_norm_eps_and_drop_path_schedule():
    model = timm.create_model('scalable_vit_small', drop_path_rate=0.2)
    blocks = [b for stage in model.stages for b in stage]
    rates = [b.drop_path.drop_prob if hasattr(b.drop_path, 'drop_prob') else 0. for b in blocks]
    assert rates[0] == 0. and math.isclose(rates[-1], 0.2, rel_tol=1e-6)
    assert all(b > a for a, b in zip(rates, rates[1:]))
    ssa = model.stages[0][1].attn
    assert ssa.norm_act[0].eps == 1e-5 and model.stages[0][1].norm1.eps == 1e-6
    assert math.isclose(ssa.scale, (32 * 1.25) ** -0.5)
    assert type(model.stages[0][0].attn).__name__ == 'InteractiveWindowAttention'
    assert type(model.stages[3][1].attn).__name__ == 'ScalableSelfAttention' and model.stages[3][1].attn.kv


def test_bad_config_is_an_error():
    with pytest.raises(ValueError, match='c_ratios has 3 entries'):
        ScalableViT(c_ratios=(1, 1, 1))


# ---------------------------------------------------------------------------------------------------------------
# timm's model contract: device/dtype kwargs, TorchScript, torch.fx (timm's own test_models.py runs in
# test_timm_suite.py; these are the fast checks of the same paths, with outputs compared to eager)

# IWSA, SSA with a reduction and SSA without one, in few blocks (scripting time grows with them); windows that tile
# the maps of a 64x64 input exactly (16, 8, 4, 2) and pad those of 65x71 (17x18, 9x9, 5x5, 3x3), as SSA's reductions do
_SMALL = dict(depths=(1, 2, 1, 2), wss=(4, 4, 4, 2))


def test_device_and_dtype_kwargs(tiny_args):
    model = timm.create_model('scalable_vit_small', device='meta', **tiny_args)
    tensors = dict(model.named_parameters(), **dict(model.named_buffers()))
    assert tensors and all(t.device.type == 'meta' for t in tensors.values())
    assert model(torch.empty(2, 3, 65, 71, device='meta')).shape == (2, 1000)
    model = timm.create_model('scalable_vit_small', dtype=torch.bfloat16, num_classes=3, **tiny_args).eval()
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64, dtype=torch.bfloat16)).dtype == torch.bfloat16
    model.reset_classifier(5)
    assert model.head.weight.dtype == torch.bfloat16 and not model.head.training


def test_forward_intermediates_agrees_with_forward_features(tiny_args):
    torch.manual_seed(0)
    model = ScalableViT(**tiny_args).eval()
    x = torch.randn(1, 3, 72, 61)
    with torch.no_grad():
        final, feats = model.forward_intermediates(x)
        torch.testing.assert_close(final, model.forward_features(x), rtol=0, atol=0)
        normed = model.forward_intermediates(x, indices=1, norm=True, intermediates_only=True)
        torch.testing.assert_close(normed[0], final, rtol=0, atol=0)
        early, taps = model.forward_intermediates(x, indices=[1], stop_early=True)
        torch.testing.assert_close(taps[0], feats[1], rtol=0, atol=0)
        torch.testing.assert_close(early, feats[1], rtol=0, atol=0)  # no final norm before the last stage
        tokens = model.forward_intermediates(x, output_fmt='NLC', intermediates_only=True)
    for t, f in zip(tokens, feats):
        torch.testing.assert_close(t, f.flatten(2).transpose(1, 2), rtol=0, atol=0)


def _fx_trace(model):
    from timm.layers import get_notrace_functions, get_notrace_modules
    tracer = torch.fx.Tracer(autowrap_functions=tuple(get_notrace_functions()))
    tracer.leaf_modules = set(get_notrace_modules())
    return torch.fx.GraphModule(model, tracer.trace(model))


@pytest.mark.parametrize('fused', [True, False], ids=['fused', 'plain'])
def test_torchscript_and_fx_match_eager(fused, tiny_args):
    """One scripted and one FX-traced graph serve any input size: padded maps (65x71) and whole windows (64x64)."""
    torch.manual_seed(0)
    model = ScalableViT(num_classes=10, **dict(tiny_args, **_SMALL)).eval()
    model.set_fused_attn(fused)
    scripted = torch.jit.script(model)
    traced = _fx_trace(model)
    assert any(n.target is scalablevit.model.window_key_mask for n in traced.graph.nodes)  # mask decided at run time
    for size in [(65, 71), (64, 64)]:
        x = torch.randn(2, 3, *size)
        with torch.no_grad():
            want = model(x)
            torch.testing.assert_close(scripted(x), want, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(traced(x), want, rtol=1e-5, atol=1e-6)


def test_fx_torchscript_and_fx_feature_extractor(tiny_args):
    torch.manual_seed(0)
    model = ScalableViT(num_classes=10, **dict(tiny_args, **_SMALL)).eval()
    x = torch.randn(1, 3, 65, 71)
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.script(_fx_trace(model))(x), model(x), rtol=1e-5, atol=1e-6)
    feats = {}
    for cls in ('fx', 'hook', 'getter'):
        torch.manual_seed(0)
        feats[cls] = timm.create_model('scalable_vit_small', features_only=True, feature_cls=cls,
                                       **dict(tiny_args, **_SMALL)).eval()
    with torch.no_grad():
        want = feats['getter'](x)
        assert [tuple(f.shape) for f in want] == [(1, c, h, w) for c, (h, w) in zip(tiny_args['embed_dims'],
                                                                                    _ceil_pyramid(65, 71))]
        for cls in ('fx', 'hook'):
            for a, b in zip(feats[cls](x), want):
                torch.testing.assert_close(a, b, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------------
# Precision, compile, export


def test_bf16_autocast_cpu(tiny_args):
    torch.manual_seed(0)
    model = ScalableViT(num_classes=10, **tiny_args).eval()
    x = torch.randn(2, 3, 96, 80)
    with torch.no_grad():
        ref = model(x)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            out = model(x)
    assert out.dtype == torch.bfloat16
    assert _rel(out.float(), ref) < 0.05


def test_torch_compile_matches_eager(tiny_args, fresh_compile):
    torch.manual_seed(0)
    model = ScalableViT(num_classes=10, **dict(tiny_args, depths=(1, 2, 1, 1))).eval()  # IWSA and SSA, less code
    x = torch.randn(2, 3, 64, 64)
    compiled = torch.compile(model)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-5)


def test_jit_trace(tiny_args):
    model = ScalableViT(num_classes=10, **tiny_args).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        traced = torch.jit.trace(model, x)
        torch.testing.assert_close(traced(x), model(x))


def test_onnx_export_plain_path(tmp_path, tiny_args):
    import onnxruntime as ort
    torch.manual_seed(0)
    model = ScalableViT(num_classes=10, **tiny_args).eval()
    model.set_fused_attn(False)
    x = torch.randn(2, 3, 112, 137)
    path = tmp_path / 'scalablevit.onnx'
    torch.onnx.export(model, (x,), dynamo=True).save(str(path))
    sess = ort.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    out = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(out), model(x), rtol=1e-4, atol=1e-4)
