"""tools/attention_map.py: the maps are the model's own attention rows (recomputed here from the module weights),
IWSA's stays inside the query's window, the model is left as it was, and the PNG grid is written. Tiny model, CPU."""
import math
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image

import scalablevit  # noqa: F401  (registers the models)
from scalablevit import InteractiveWindowAttention, ScalableSelfAttention

REPO = Path(__file__).resolve().parents[1]
# stage 0: 12x12 tokens at 48 px, windows of 5 (padded to 15) and keys reduced x4 (padded to 12 -> 3x3)
TINY = dict(embed_dims=(16, 32), num_heads=(2, 2), depths=(2, 2), sr_ratios=(4, 1), c_ratios=(1.25, 1), wss=(5, 3),
            mlp_ratios=(2, 2), mlp_head=False)


@pytest.fixture(scope='module')
def attn(load_script):
    return load_script('tools/attention_map.py')


@pytest.fixture(scope='module')
def model():
    torch.manual_seed(0)
    m = timm.create_model('scalable_vit_small', num_classes=4, **TINY).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in m.parameters():  # random weights: peaked, uneven attention
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return m


def inputs_of(model, x):
    """The input tokens and map size of every attention module, from a forward of our own."""
    seen, handles = {}, []
    for name, m in model.named_modules():
        if isinstance(m, (ScalableSelfAttention, InteractiveWindowAttention)):
            handles.append(m.register_forward_pre_hook(
                lambda mod, args, name=name: seen.__setitem__(name, (args[0].detach(), args[1]))))
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return seen


def manual_ssa_row(m, tokens, size, yx):
    B, N, C = tokens.shape
    H, W = size
    h, r = m.num_heads, m.sr_ratio
    q = m.q(tokens).reshape(B, N, h, -1).transpose(1, 2)
    if m.kv is not None:  # sr_ratio 1: keys from every token
        k = m.kv(tokens).reshape(B, N, 2, h, -1)[:, :, 0].transpose(1, 2)
    else:
        grid = tokens.transpose(1, 2).reshape(B, C, H, W)
        grid = F.pad(grid, (0, (r - W % r) % r, 0, (r - H % r) % r))
        red = m.norm_act(m.reduction(grid).flatten(2).transpose(1, 2))
        k = m.k(red).reshape(B, red.shape[1], h, -1).transpose(1, 2)
    probs = ((q * m.scale) @ k.transpose(-2, -1)).softmax(-1)  # (B, h, N, M)
    return probs[0, :, yx[0] * W + yx[1]].mean(0), (math.ceil(H / r), math.ceil(W / r))


def manual_iwsa_window(m, tokens, size, yx):
    B, N, C = tokens.shape
    H, W = size
    ws, h = m.ws, m.num_heads
    top, left = yx[0] // ws * ws, yx[1] // ws * ws
    grid = tokens.reshape(H, W, C)
    idx = [(i, j) for i in range(top, top + ws) for j in range(left, left + ws)]
    real = [(i, j) for i, j in idx if i < H and j < W]
    t = torch.stack([grid[i, j] for i, j in real])  # the real tokens of the window
    qkv = m.qkv(t).reshape(len(real), 3, h, -1).permute(1, 2, 0, 3)  # (3, h, L_real, d)
    probs = ((qkv[0] * m.scale) @ qkv[1].transpose(-2, -1)).softmax(-1)
    row = probs[:, real.index(tuple(yx))].mean(0)
    out = torch.zeros(H, W)
    for (i, j), p in zip(real, row):
        out[i, j] = p
    return out


def test_maps_are_the_models_attention(attn, model):
    x = torch.randn(1, 3, 48, 48, generator=torch.Generator().manual_seed(2))
    point = (0.8, 0.3)
    fused_before = [m.fused_attn for m in model.modules() if hasattr(m, 'fused_attn')]
    with torch.no_grad():
        logits = model(x)
    maps = attn.attention_maps(model, x, point)
    # the model is as it was: no hooks left, attention path restored, same outputs
    assert [m.fused_attn for m in model.modules() if hasattr(m, 'fused_attn')] == fused_before
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(model(x), logits)

    assert [(m['stage'], m['kind'], m['block']) for m in maps] == [(0, 'IWSA', 0), (0, 'SSA', 1), (1, 'IWSA', 0),
                                                                   (1, 'SSA', 1)]
    seen = inputs_of(model, x)
    for item in maps:
        name = f'stages.{item["stage"]}.{item["block"]}.attn'
        module = model.get_submodule(name)
        tokens, size = seen[name]
        assert item['size'] == tuple(size) and item['map'].shape == tuple(size)
        yx = (min(int(point[1] * size[0]), size[0] - 1), min(int(point[0] * size[1]), size[1] - 1))
        assert item['query'] == yx
        with torch.no_grad():
            if item['kind'] == 'SSA':
                row, (hr, wr) = manual_ssa_row(module, tokens, size, yx)
                r = module.sr_ratio
                # the map spreads each reduced key over its r x r tokens: summing the blocks gives the row back
                padded = F.pad(item['map'], (0, wr * r - size[1], 0, hr * r - size[0]))
                blocks = padded.reshape(hr, r, wr, r).sum((1, 3)).flatten()
                keys_real = torch.zeros(hr * r, wr * r)
                keys_real[:size[0], :size[1]] = 1
                coverage = keys_real.reshape(hr, r, wr, r).sum((1, 3)).flatten() / (r * r)
                torch.testing.assert_close(blocks, row * coverage, rtol=1e-4, atol=1e-6)
            else:
                expected = manual_iwsa_window(module, tokens, size, yx)
                torch.testing.assert_close(item['map'], expected, rtol=1e-4, atol=1e-6)
                assert item['map'].sum().item() == pytest.approx(1.0, abs=1e-5)
                outside = ~item['window_mask']
                assert item['map'][outside].abs().max() == 0 and item['window_mask'][yx].item()
    # another query point gives another SSA row (the point is honoured)
    other = attn.attention_maps(model, x, (0.1, 0.9))
    assert not torch.allclose(other[1]['map'], maps[1]['map'])
    # one head instead of the mean
    head0 = attn.attention_maps(model, x, point, head=0)
    assert not torch.allclose(head0[1]['map'], maps[1]['map'])


def test_cli_writes_the_grid_and_reports_errors(attn, model, tmp_path, capsys):
    meta = dict(model='scalable_vit_small', model_kwargs={k: list(v) if isinstance(v, tuple) else v
                                                          for k, v in TINY.items()},
                num_classes=4, class_names=list('abcd'),
                pretrained_cfg=dict(input_size=(3, 48, 48), interpolation='bicubic', crop_pct=1.0, crop_mode='center',
                                    mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)))
    torch.save(dict(model=model.state_dict(), meta=meta), tmp_path / 'ckpt.pth')
    torch.save(model.state_dict(), tmp_path / 'weights.pth')
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (60, 80), dtype=np.uint8)).save(tmp_path / 'gray.png')
    out = tmp_path / 'maps' / 'attn.png'
    assert attn.cli([str(tmp_path / 'gray.png'), '--checkpoint', str(tmp_path / 'ckpt.pth'), '--point', '0.2', '0.7',
                     '--out', str(out)]) == 0
    assert 'wrote' in capsys.readouterr().out
    import matplotlib.image as mpimg
    img = mpimg.imread(str(out))
    assert img.shape[0] > 300 and img.shape[1] > 500  # 2 stages x 3 columns
    cases = [
        (['--checkpoint', str(tmp_path / 'weights.pth')], 'give --model NAME'),
        (['--checkpoint', str(tmp_path / 'ckpt.pth'), '--point', '1.5', '0.5'], 'fractions of width and height'),
        (['--checkpoint', str(tmp_path / 'ckpt.pth'), '--head', '5'], 'stage 0 has 2 heads'),
        (['--checkpoint', str(tmp_path / 'missing.pth')], 'checkpoint not found'),
    ]
    for argv, message in cases:
        assert attn.cli([str(tmp_path / 'gray.png'), *argv, '--out', str(tmp_path / 'x.png')]) == 1
        err = capsys.readouterr().err
        assert err.startswith('error: ') and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / 'x.png').exists()
