""" ScalableViT

Paper: `ScalableViT: Rethinking the Context-oriented Generalization of Vision Transformer`
    - https://arxiv.org/abs/2203.10790

@article{ScalableVit,
  title={Scalablevit: Rethinking the context-oriented generalization of vision transformer},
  author={Yang, Rui and Ma, Hailong and Wu, Jie and Tang, Yansong and Xiao, Xuefeng and Zheng, Min and Li, Xiu},
  journal={arXiv preprint arXiv:2203.10790},
  year={2022}
}

A reimplementation of the released classification model (itself built on Twins), with parameter names and
shapes identical to the released checkpoints so they load with ``strict=True``. Blocks alternate Interactive
Window Self-Attention (IWSA, even blocks) and Scalable Self-Attention (SSA, odd blocks); a depthwise positional
conv follows the first block of every stage.

Beyond the released code: any input size (IWSA pads to whole windows and masks the padding, SSA pads to a
multiple of its reduction ratio; both are no-ops at 224), fused ``F.scaled_dot_product_attention`` with the
plain attention kept as the reference path, and timm's feature API (``forward_intermediates``,
``features_only=True``) for dense prediction. A timm model in full: ``device``/``dtype`` kwargs (``device='meta'``
builds without memory), ``torch.jit.script``, torch.fx tracing (timm's ``feature_cls='fx'``); timm's own
``tests/test_models.py`` passes on it (``tests/test_timm_suite.py``).

Layout follows timm's ``pvt_v2.py`` / ``twins.py``.
"""
import math
from functools import partial
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import (
    DropPath,
    Mlp,
    calculate_drop_path_rates,
    get_device_dtype,
    register_notrace_function,
    to_2tuple,
    trunc_normal_,
    use_fused_attn,
)
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from torch.fx._symbolic_trace import is_fx_symbolic_tracing
from torch.utils.checkpoint import checkpoint

__all__ = ['ScalableViT', 'ScalableSelfAttention', 'InteractiveWindowAttention', 'Block', 'PatchEmbed', 'PosConv',
           'TokensToMap']

_LayerNorm = partial(nn.LayerNorm, eps=1e-6)


# -------------------------------------------------------------------------------------------------------------------
# Size-dependent steps. Any input size makes the padding data-dependent; these few functions hold the only Python
# branches on tensor sizes, and are registered as leaves for torch.fx (timm's FX feature extractor traces around
# them). They are plain typed functions, so TorchScript compiles them too.
# -------------------------------------------------------------------------------------------------------------------


@register_notrace_function  # reason: branches on the map size
def pad_to_multiple(x: torch.Tensor, multiple: int, channels_last: bool = False) -> torch.Tensor:
    """Zero-pad the bottom and right of a map (B, C, H, W), or (B, H, W, C) if ``channels_last``, so that H and W
    become multiples of ``multiple``; the map itself when they already are."""
    H, W = (x.shape[1], x.shape[2]) if channels_last else (x.shape[2], x.shape[3])
    pad_b, pad_r = (multiple - H % multiple) % multiple, (multiple - W % multiple) % multiple
    if pad_b == 0 and pad_r == 0:
        return x
    pad = [0, 0, 0, pad_r, 0, pad_b] if channels_last else [0, pad_r, 0, pad_b]
    return F.pad(x, pad)


@register_notrace_function  # reason: None unless the map was padded
def window_key_mask(H: int, W: int, ws: int, batch: int, device: torch.device) -> Optional[torch.Tensor]:
    """Attention mask of an (H, W) map padded to whole ``ws x ws`` windows: (batch * nW, 1, 1, ws * ws) bool, True
    where the key is a real token; ``None`` when no window is padded."""
    Hp, Wp = (H + ws - 1) // ws * ws, (W + ws - 1) // ws * ws
    if Hp == H and Wp == W:
        return None
    real = torch.zeros(Hp, Wp, dtype=torch.bool, device=device)
    real[:H, :W] = True
    real = real.reshape(Hp // ws, ws, Wp // ws, ws).transpose(1, 2)  # (hg, wg, ws, ws)
    return real.reshape(-1, 1, 1, ws * ws).repeat(batch, 1, 1, 1)  # (batch * nW, 1, 1, L)


@register_notrace_function  # reason: masking is skipped without a mask
def mask_scores(attn: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Attention scores with the masked-out keys (``mask`` False) at -inf."""
    if mask is None:
        return attn
    return attn.masked_fill(~mask, float('-inf'))


@register_notrace_function  # reason: the unpadded case reverses the windows inside the add, without a copy
def add_window_output(lim: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """IWSA's output: the LIM map ``lim`` (B, H, W, C) plus the attention output ``x`` (B, hg, ws, wg, ws, C) of
    the windows that cover it (padded ones cropped), as tokens (B, H * W, C)."""
    B, H, W, C = lim.shape
    hg, ws, wg = x.shape[1], x.shape[2], x.shape[3]
    if hg * ws == H and wg * ws == W:
        x = lim.reshape(B, hg, ws, wg, ws, C) + x  # (B, hg, ws, wg, ws, C): the window reverse happens in this add
    else:
        x = lim + x.reshape(B, hg * ws, wg * ws, C)[:, :H, :W]  # (B, H, W, C)
    return x.reshape(B, H * W, C)  # (B, N, C)


# -------------------------------------------------------------------------------------------------------------------
# Layers
# -------------------------------------------------------------------------------------------------------------------


class PatchEmbed(nn.Module):
    """Strided conv + LayerNorm; returns tokens and the spatial size the conv produced."""

    def __init__(self, in_chans: int, embed_dim: int, kernel_size: int, stride: int, device=None, dtype=None):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size, stride=stride, padding=kernel_size // 2, **dd)
        self.norm = _LayerNorm(embed_dim, **dd)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int]]:
        x = self.proj(x)
        H, W = x.shape[2], x.shape[3]
        x = x.flatten(2).transpose(1, 2)  # (B, N, C)
        return self.norm(x), (H, W)


class PosConv(nn.Module):
    """Positional encoding: residual depthwise 3x3 conv on the token map (Twins' PEG)."""

    def __init__(self, dim: int, device=None, dtype=None):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        self.proj = nn.Sequential(nn.Conv2d(dim, dim, 3, 1, 1, bias=True, groups=dim, **dd))

    def forward(self, x: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
        B, N, C = x.shape
        feat = x.transpose(1, 2).reshape(B, C, size[0], size[1])  # (B, C, H, W)
        x = self.proj(feat) + feat
        return x.flatten(2).transpose(1, 2)  # (B, N, C)


class TokensToMap(nn.Module):
    """A stage's tokens (B, N, C) as its feature map (B, C, H, W): a view, no copy, no parameters.

    A module (``stage_ends.i``) so that the stage outputs are named nodes for torch.fx and forward hooks
    (timm's ``features_only=True`` with ``feature_cls='fx'`` or ``'hook'``).
    """

    def forward(self, x: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
        B, N, C = x.shape
        return x.transpose(1, 2).reshape(B, C, size[0], size[1])  # (B, C, H, W)


def _slow_fused_backward(q: torch.Tensor) -> bool:
    """Whether the attention is being trained in bf16/fp16 on CPU, where the fused kernel's backward is slow
    (always False while TorchScript or ``torch.fx`` records the model: they keep the fused call)."""
    if torch.jit.is_scripting():
        return False
    if is_fx_symbolic_tracing():
        return False
    return q.requires_grad and q.device.type == 'cpu' and (q.dtype == torch.bfloat16 or q.dtype == torch.float16)


class _Attention(nn.Module):
    """What SSA and IWSA share: the attention product, fused or plain."""
    fused_attn: torch.jit.Final[bool]

    def __init__(self, dim: int, num_heads: int, attn_drop: float, proj_drop: float, device=None, dtype=None):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        assert dim % num_heads == 0, f'dim {dim} should be divided by num_heads {num_heads}.'
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads  # of the values and the output
        self.qk_head_dim = self.head_dim  # of the queries and keys; SSA's channel ratio changes it
        self.scale = self.head_dim ** -0.5
        self.fused_attn = use_fused_attn()
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)

    def attend(
            self,
            q: torch.Tensor,
            k: torch.Tensor,
            v: torch.Tensor,
            mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """softmax(q k^T * scale) v over the last two dims; ``mask`` (bool, True = attend) broadcasts over scores.

        The fused branch is ``F.scaled_dot_product_attention`` with the explicit scale; the plain branch is the
        reference (the released computation) and the export path. Training in bf16/fp16 on CPU takes the plain
        branch, where the flash kernel's backward is the slower of the two on many short sequences such as IWSA's
        windows (``benchmarks/README.md``, "Training (CPU)").
        """
        if self.fused_attn and not _slow_fused_backward(q):
            dq, dv = self.qk_head_dim, self.head_dim
            # The CPU flash kernel (and CUDA flash) wants one head width for q, k and v; SSA's values are narrower
            # or wider than its queries. Zero columns keep the fused kernel and the function: padded value columns
            # give zero output columns (cut off), padded query/key columns add zero to every score.
            if dv < dq:
                v = F.pad(v, [0, dq - dv])
            elif dv > dq:
                q, k = F.pad(q, [0, dv - dq]), F.pad(k, [0, dv - dq])
            x = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=self.attn_drop.p if self.training else 0., scale=self.scale)
            return x[..., :dv] if dv < dq else x
        attn = (q * self.scale) @ k.transpose(-2, -1)  # (..., Nq, Nk)
        attn = mask_scores(attn, mask)
        attn = attn.softmax(dim=-1)
        attn = self.attn_drop(attn)
        return attn @ v  # (..., Nq, dv)


class ScalableSelfAttention(_Attention):
    """Scalable Self-Attention (SSA).

    Spatial scalability: keys and values come from the map reduced ``sr_ratio`` times by a depthwise strided
    conv. Channel scalability: queries and keys have ``int(dim * c_ratio)`` channels while values keep ``dim``.
    The scale is ``(head_dim * c_ratio) ** -0.5`` as released, not the inverse root of the q/k head width.
    """

    def __init__(
            self,
            dim: int,
            num_heads: int = 8,
            qkv_bias: bool = True,
            attn_drop: float = 0.,
            proj_drop: float = 0.,
            sr_ratio: int = 1,
            c_ratio: float = 1.,
            device=None,
            dtype=None,
    ):
        dd = {'device': device, 'dtype': dtype}
        super().__init__(dim, num_heads, attn_drop, proj_drop, **dd)
        self.sr_ratio = sr_ratio
        self.c_dim = int(dim * c_ratio) if sr_ratio > 1 else dim
        assert self.c_dim % num_heads == 0, f'int(dim * c_ratio) = {self.c_dim} should be divided by num_heads.'
        self.qk_head_dim = self.c_dim // num_heads
        self.scale = (self.head_dim * c_ratio) ** -0.5

        self.q = nn.Linear(dim, self.c_dim, bias=qkv_bias, **dd)
        if sr_ratio > 1:
            self.reduction = nn.Sequential(
                nn.Conv2d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio, groups=dim, **dd),
                nn.Conv2d(dim, self.c_dim, kernel_size=1, **dd),
            )
            self.norm_act = nn.Sequential(nn.LayerNorm(self.c_dim, **dd), nn.GELU())  # eps 1e-5, as released
            self.k = nn.Linear(self.c_dim, self.c_dim, bias=qkv_bias, **dd)
            self.v = nn.Linear(self.c_dim, dim, bias=qkv_bias, **dd)
            self.kv = None
        else:
            self.reduction = self.norm_act = self.k = self.v = None
            self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias, **dd)

    def forward(self, x: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
        B, N, C = x.shape
        h = self.num_heads
        q = self.q(x).reshape(B, N, h, self.qk_head_dim).transpose(1, 2)  # (B, h, N, c_dim / h)
        if self.kv is None:  # sr_ratio > 1
            x_ = x.transpose(1, 2).reshape(B, C, size[0], size[1])  # (B, C, H, W)
            x_ = pad_to_multiple(x_, self.sr_ratio)  # (B, C, Hp, Wp)
            x_ = self.reduction(x_).flatten(2).transpose(1, 2)  # (B, M, c_dim), M = ceil(H / r) * ceil(W / r)
            x_ = self.norm_act(x_)
            k = self.k(x_).reshape(B, -1, h, self.qk_head_dim).transpose(1, 2)  # (B, h, M, c_dim / h)
            v = self.v(x_).reshape(B, -1, h, self.head_dim).transpose(1, 2)  # (B, h, M, d)
        else:
            kv = self.kv(x).reshape(B, N, 2, h, self.head_dim).permute(2, 0, 3, 1, 4)  # (2, B, h, N, d)
            k, v = kv.unbind(0)
        x = self.attend(q, k, v)  # (B, h, N, d)
        x = x.transpose(1, 2).reshape(B, N, C)  # (B, N, C)
        x = self.proj(x)
        return self.proj_drop(x)


class InteractiveWindowAttention(_Attention):
    """Interactive Window Self-Attention (IWSA).

    Self-attention inside non-overlapping ``ws x ws`` windows, plus the local interactive module (LIM): the
    value map through a depthwise 3x3 conv (``lim_func``), added to the attention output so that windows
    exchange information. Maps that are not whole windows are padded at right/bottom; padded keys are masked
    out, so every real token sees exactly the real tokens of its window.
    """

    def __init__(
            self,
            dim: int,
            num_heads: int = 8,
            qkv_bias: bool = True,
            attn_drop: float = 0.,
            proj_drop: float = 0.,
            ws: int = 7,
            device=None,
            dtype=None,
    ):
        dd = {'device': device, 'dtype': dtype}
        super().__init__(dim, num_heads, attn_drop, proj_drop, **dd)
        self.ws = ws

        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias, **dd)
        self.lim_func = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim, **dd)

    def forward(self, x: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
        B, N, C = x.shape
        H, W = size
        ws, h, d = self.ws, self.num_heads, self.head_dim
        x = pad_to_multiple(x.reshape(B, H, W, C), ws, channels_last=True)  # (B, Hp, Wp, C)
        Hp, Wp = x.shape[1], x.shape[2]
        hg, wg = Hp // ws, Wp // ws
        mask = window_key_mask(H, W, ws, B, x.device)  # (B * nW, 1, 1, L), None without padding
        # one window partition, of x (C wide) before qkv (3C wide): q, k and v come out grouped by window, and the
        # fused kernel takes them as strided views
        x = x.reshape(B, hg, ws, wg, ws, C).transpose(2, 3).reshape(B * hg * wg, ws * ws, C)  # (B * nW, L, C)
        qkv = self.qkv(x).reshape(B * hg * wg, ws * ws, 3, h, d)  # (B * nW, L, 3, h, d)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B * nW, h, L, d)

        x = self.attend(q, k, v, mask)  # (B * nW, h, L, d)
        x = x.transpose(1, 2).reshape(B, hg, wg, ws, ws, C).transpose(2, 3)  # (B, hg, ws, wg, ws, C)
        # LIM on the value map at its real size, channels-last so that the conv reads and writes it without copies
        v = qkv[:, :, 2].reshape(B, hg, wg, ws, ws, C).transpose(2, 3).reshape(B, Hp, Wp, C)  # (B, Hp, Wp, C)
        v = v[:, :H, :W]  # (B, H, W, C), a view
        lim = self.lim_func(v.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)  # (B, H, W, C)
        x = add_window_output(lim, x)  # (B, N, C)
        x = self.proj(x)
        return self.proj_drop(x)


class Block(nn.Module):
    """Pre-norm transformer block with IWSA (``ws`` set) or SSA (``ws=None``) attention."""

    def __init__(
            self,
            dim: int,
            num_heads: int,
            mlp_ratio: float = 4.,
            qkv_bias: bool = True,
            proj_drop: float = 0.,
            attn_drop: float = 0.,
            drop_path: float = 0.,
            sr_ratio: int = 1,
            c_ratio: float = 1.,
            ws: Optional[int] = None,
            act_layer: Callable = nn.GELU,
            norm_layer: Callable = _LayerNorm,
            device=None,
            dtype=None,
    ):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        self.norm1 = norm_layer(dim, **dd)
        if ws is None:
            self.attn = ScalableSelfAttention(
                dim, num_heads, qkv_bias, attn_drop, proj_drop, sr_ratio=sr_ratio, c_ratio=c_ratio, **dd)
        else:
            self.attn = InteractiveWindowAttention(dim, num_heads, qkv_bias, attn_drop, proj_drop, ws=ws, **dd)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = norm_layer(dim, **dd)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop, **dd)

    def forward(self, x: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), size))
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x


class ScalableViT(nn.Module):
    """ScalableViT.

    ``forward_features`` returns the normed last map (B, C, H, W) (as timm's PVTv2); ``forward_head`` pools it.

    Args:
        img_size: nominal input size (pretrained cfg only; any size is accepted).
        patch_size: stride of the first patch embedding.
        in_chans: input channels.
        num_classes: classes of the head; 0 gives pooled features.
        embed_dims: channels of each stage.
        num_heads: attention heads of each stage.
        mlp_ratios: MLP expansion of each stage.
        qkv_bias: bias on q/k/v projections.
        drop_rate: dropout after each patch embedding and before the head.
        attn_drop_rate: dropout on attention weights.
        drop_path_rate: stochastic depth, growing linearly from 0 over all blocks.
        depths: blocks per stage.
        wss: IWSA window size of each stage.
        sr_ratios: SSA spatial reduction of each stage.
        c_ratios: SSA channel ratio of each stage.
        mlp_head: the released MLP head (``Linear -> LayerNorm -> GELU -> Linear``); ``False`` gives a plain
            ``Linear`` head, as ``reset_classifier`` does.
        mlp_head_dim: hidden width of the MLP head (4096 as released).
        global_pool: ``'avg'`` (mean over positions) or ``''`` (``forward`` returns the map).
        norm_layer: norm of the blocks, patch embeddings and the final norm.
        device: device of the parameters (``'meta'`` builds without memory).
        dtype: dtype of the parameters.
    """

    def __init__(
            self,
            img_size: Union[int, Tuple[int, int]] = 224,
            patch_size: int = 4,
            in_chans: int = 3,
            num_classes: int = 1000,
            embed_dims: Sequence[int] = (64, 128, 256, 512),
            num_heads: Sequence[int] = (2, 4, 8, 16),
            mlp_ratios: Sequence[float] = (4, 4, 4, 4),
            qkv_bias: bool = True,
            drop_rate: float = 0.,
            attn_drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            depths: Sequence[int] = (2, 2, 20, 2),
            wss: Sequence[int] = (7, 7, 7, 7),
            sr_ratios: Sequence[int] = (8, 4, 2, 1),
            c_ratios: Sequence[float] = (1.25, 1.25, 1.25, 1),
            mlp_head: bool = True,
            mlp_head_dim: int = 4096,
            global_pool: str = 'avg',
            norm_layer: Callable = _LayerNorm,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        assert global_pool in ('avg', ''), f'global_pool must be "avg" or "", got {global_pool!r}'
        num_stages = len(depths)
        for name, v in dict(embed_dims=embed_dims, num_heads=num_heads, mlp_ratios=mlp_ratios, wss=wss,
                            sr_ratios=sr_ratios, c_ratios=c_ratios).items():
            if len(v) != num_stages:
                raise ValueError(f'{name} has {len(v)} entries but depths has {num_stages} stages')
        self.img_size = to_2tuple(img_size)
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.depths = tuple(depths)
        self.embed_dims = tuple(embed_dims)
        self.num_features = self.head_hidden_size = embed_dims[-1]  # timm: the width of the pooled features
        self.mlp_head_dim = mlp_head_dim
        self.grad_checkpointing = False

        # the first embedding is a (patch_size + 3) conv of stride patch_size, the others 3x3 of stride 2
        in_dims = (in_chans,) + tuple(embed_dims[:-1])
        self.patch_embeds = nn.ModuleList([
            PatchEmbed(in_dims[i], embed_dims[i], patch_size + 3 if i == 0 else 3, patch_size if i == 0 else 2, **dd)
            for i in range(num_stages)])
        self.pos_drops = nn.ModuleList([nn.Dropout(p=drop_rate) for _ in range(num_stages)])

        dpr = calculate_drop_path_rates(drop_path_rate, sum(depths))  # linear from 0 over all blocks, as released
        first_block = [sum(depths[:i]) for i in range(num_stages)]
        block_args = dict(qkv_bias=qkv_bias, proj_drop=drop_rate, attn_drop=attn_drop_rate, norm_layer=norm_layer, **dd)
        self.stages = nn.ModuleList([nn.ModuleList([Block(
            embed_dims[i],
            num_heads[i],
            mlp_ratio=mlp_ratios[i],
            drop_path=dpr[first_block[i] + j],
            sr_ratio=sr_ratios[i],
            c_ratio=c_ratios[i],
            ws=wss[i] if j % 2 == 0 else None,  # IWSA and SSA alternate, IWSA first
            **block_args,
        ) for j in range(depths[i])]) for i in range(num_stages)])
        self.feature_info = [
            dict(num_chs=d, reduction=patch_size * 2 ** i, module=f'stage_ends.{i}') for i, d in enumerate(embed_dims)]
        self.pos_block = nn.ModuleList([PosConv(d, **dd) for d in embed_dims])
        self.stage_ends = nn.ModuleList([TokensToMap() for _ in embed_dims])
        self.norm = norm_layer(self.num_features, **dd)

        self.head_drop = nn.Dropout(drop_rate)
        self.head = self._make_head(num_classes, mlp_head, **dd)
        self.apply(self._init_weights)

    def _make_head(self, num_classes: int, mlp_head: bool, device=None, dtype=None) -> nn.Module:
        dd = {'device': device, 'dtype': dtype}
        if num_classes <= 0:
            return nn.Identity()
        if mlp_head:
            hidden = self.mlp_head_dim
            return nn.Sequential(
                nn.Linear(self.num_features, hidden, **dd),
                _LayerNorm(hidden, **dd),
                nn.GELU(),
                nn.Linear(hidden, num_classes, **dd),
            )
        return nn.Linear(self.num_features, num_classes, **dd)

    @staticmethod
    def _init_weights(m: nn.Module):
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Conv2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
            m.weight.data.normal_(0, math.sqrt(2.0 / fan_out))
            if m.bias is not None:
                m.bias.data.zero_()

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        return {n for n, _ in self.named_parameters() if n.startswith('pos_block.')}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict:
        if coarse:
            blocks = [(r'^(?:patch_embeds|pos_block|stages)\.(\d+)', None), (r'^norm', (99999,))]
        else:
            blocks = [
                (r'^stages\.(\d+)\.(\d+)', None),
                (r'^(?:patch_embeds|pos_block)\.(\d+)', (0,)),
                (r'^norm', (99999,)),
            ]
        return dict(stem=r'^patch_embeds\.0', blocks=blocks)

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True):
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def set_fused_attn(self, enable: bool = True):
        """Switch every attention between the fused SDPA path and the plain reference path."""
        for m in self.modules():
            if isinstance(m, _Attention):
                m.fused_attn = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None):
        """Replace the head by a plain ``Linear(num_features, num_classes)`` (identity for 0 classes)."""
        self.num_classes = num_classes
        if global_pool is not None:
            assert global_pool in ('avg', ''), f'global_pool must be "avg" or "", got {global_pool!r}'
            self.global_pool = global_pool
        self.head = self._make_head(num_classes, mlp_head=False, **get_device_dtype(self))
        if isinstance(self.head, nn.Linear):
            self._init_weights(self.head)
        self.head.train(self.training)

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Forward returning the outputs of the selected stages.

        Args:
            x: input images (B, C, H, W), any H and W.
            indices: stages to return (``int``: the last n), ``None`` for all.
            norm: apply the final norm to the last stage's output.
            stop_early: stop after the last selected stage.
            output_fmt: ``'NCHW'`` or ``'NLC'`` (tokens).
            intermediates_only: return only the intermediates.

        Returns:
            The intermediates, or (the output of ``forward_features``, intermediates); when ``stop_early`` ends
            before the last stage, the first item is that stage's map, without the final norm.
        """
        assert output_fmt in ('NCHW', 'NLC'), 'output_fmt must be NCHW or NLC.'
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        last_idx = len(self.stages) - 1
        x, maps, i = self._forward_stages(x, take_indices, max_index if stop_early or intermediates_only else last_idx)
        intermediates = []
        for j, y in zip(take_indices, maps):
            y = self._final_norm(y) if (norm and j == last_idx) else y
            intermediates.append(y if output_fmt == 'NCHW' else y.flatten(2).transpose(1, 2))  # (B, N, C)
        if intermediates_only:
            return intermediates
        if i == last_idx:
            x = self._final_norm(x)
        return x, intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        """Drop the stages after the last index kept (and optionally norm and head)."""
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        for name in ('patch_embeds', 'pos_drops', 'stages', 'pos_block', 'stage_ends'):
            setattr(self, name, getattr(self, name)[:max_index + 1])
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, '')
        return take_indices

    def _final_norm(self, x: torch.Tensor) -> torch.Tensor:
        """The final norm on a map (B, C, H, W), channels-last inside: the map is a view of tokens, so no copies."""
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # (B, C, H, W)

    def _forward_stages(
            self,
            x: torch.Tensor,
            take_indices: List[int],
            last: int,
    ) -> Tuple[torch.Tensor, List[torch.Tensor], int]:
        """The stage loop: images through the stages ``0..last``. Returns the last stage's map (B, C, H, W), the maps
        of the stages in ``take_indices``, and ``last``. (A guard rather than a slice of the module lists keeps the
        loop scriptable: TorchScript iterates module lists only as attributes.)"""
        maps: List[torch.Tensor] = []
        for i, (embed, drop, blocks, pos_blk, to_map) in enumerate(
                zip(self.patch_embeds, self.pos_drops, self.stages, self.pos_block, self.stage_ends)):
            if i <= last:
                x, size = embed(x)
                x = drop(x)
                for j, blk in enumerate(blocks):
                    if self.grad_checkpointing and not torch.jit.is_scripting() and torch.is_grad_enabled():
                        x = checkpoint(blk, x, size, use_reentrant=False)
                    else:
                        x = blk(x, size)
                    if j == 0:
                        x = pos_blk(x, size)
                x = to_map(x, size)  # (B, C, H, W)
                if i in take_indices:
                    maps.append(x)
        return x, maps, min(last, len(self.stages) - 1)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C_in, H, W) -> the normed last map (B, C, H / 32, W / 32)."""
        x, _, _ = self._forward_stages(x, torch.jit.annotate(List[int], []), len(self.stages) - 1)
        return self._final_norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == 'avg':
            x = x.mean(dim=(2, 3))
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_features(x)
        return self.forward_head(x)


def unwrap_state_dict(checkpoint: Dict) -> Dict[str, torch.Tensor]:
    """The weights of a checkpoint: the released file (``'model'``), timm/ours (plain or ``'state_dict'``)."""
    if not isinstance(checkpoint, dict):
        raise TypeError(f'expected a checkpoint dict, got {type(checkpoint).__name__}')
    for key in ('model', 'state_dict', 'model_ema', 'state_dict_ema'):
        if key in checkpoint and isinstance(checkpoint[key], dict):
            checkpoint = checkpoint[key]
            break
    state_dict = {}
    for k, v in checkpoint.items():
        if not isinstance(v, torch.Tensor):
            continue
        for prefix in ('module.', '_orig_mod.'):  # DDP / torch.compile wrappers
            if k.startswith(prefix):
                k = k[len(prefix):]
        state_dict[k] = v
    return state_dict


def checkpoint_filter_fn(state_dict: Dict, model: ScalableViT) -> Dict[str, torch.Tensor]:
    """Released or own checkpoint -> ``model``'s state dict (names are already the released ones).

    A head that does not fit ``model`` (plain ``Linear`` vs the released 4096 MLP, or no head) is dropped; every
    other key is passed on unchanged, so a wrong checkpoint fails the strict load naming its keys.
    """
    state_dict = unwrap_state_dict(state_dict)
    own = model.state_dict()
    head = {k for k in state_dict if k.startswith('head.')}
    own_head = {k for k in own if k.startswith('head.')}
    if head != own_head:
        state_dict = {k: v for k, v in state_dict.items() if k not in head}
    return state_dict


def _create_scalable_vit(variant: str, pretrained: bool = False, **kwargs) -> ScalableViT:
    out_indices = kwargs.pop('out_indices', 4)
    return build_model_with_cfg(
        ScalableViT,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(feature_cls='getter', out_indices=out_indices),
        **kwargs,
    )


def _cfg(url: str = '', **kwargs) -> Dict:
    return {
        'url': url,
        'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': (7, 7),
        'crop_pct': .875, 'interpolation': 'bicubic',
        'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'patch_embeds.0.proj', 'classifier': 'head.3',
        'license': 'apache-2.0',
        'paper_ids': 'arXiv:2203.10790',
        'paper_name': 'ScalableViT: Rethinking the Context-oriented Generalization of Vision Transformer',
        **kwargs,
    }


default_cfgs = generate_default_cfgs({
    'scalable_vit_small.in1k': _cfg(),
    'scalable_vit_base.in1k': _cfg(),
    'scalable_vit_large.in1k': _cfg(),
})

# The released sizes (the released code's model definitions); the only place they are written down.
MODEL_ARGS = {
    'scalable_vit_small': dict(
        embed_dims=(64, 128, 256, 512), num_heads=(2, 4, 8, 16), depths=(2, 2, 20, 2),
        sr_ratios=(8, 4, 2, 1), c_ratios=(1.25, 1.25, 1.25, 1)),
    'scalable_vit_base': dict(
        embed_dims=(96, 192, 384, 768), num_heads=(3, 6, 12, 24), depths=(2, 2, 14, 6),
        sr_ratios=(8, 4, 2, 1), c_ratios=(2, 1.25, 1.25, 1)),
    'scalable_vit_large': dict(
        embed_dims=(128, 256, 512, 1024), num_heads=(4, 8, 16, 32), depths=(2, 6, 12, 4),
        sr_ratios=(8, 4, 2, 1), c_ratios=(0.25, 0.5, 1, 1)),
}

#: Short names of the sizes, as the detection and segmentation configs write ``arch``.
ARCH_ALIASES = {'s': 'scalable_vit_small', 'b': 'scalable_vit_base', 'l': 'scalable_vit_large'}


def resolve_arch(arch: Union[str, Dict]) -> Tuple[str, Dict]:
    """``(timm name, size arguments)`` of an ``arch``: ``'s'`` / ``'b'`` / ``'l'``, a timm name, or a dict of
    :class:`ScalableViT` size arguments (``embed_dims``, ``depths``, ...) over the small model's."""
    if isinstance(arch, dict):
        return 'scalable_vit_small', dict(arch)
    name = ARCH_ALIASES.get(str(arch).lower(), arch)
    if name not in MODEL_ARGS:
        raise ValueError(f'unknown ScalableViT arch {arch!r}; use one of {sorted(ARCH_ALIASES)}, '
                         f'{sorted(MODEL_ARGS)} or a dict of sizes')
    return name, dict(MODEL_ARGS[name])


@register_model
def scalable_vit_small(pretrained: bool = False, **kwargs) -> ScalableViT:
    model_args = dict(MODEL_ARGS['scalable_vit_small'], **kwargs)
    return _create_scalable_vit('scalable_vit_small', pretrained=pretrained, **model_args)


@register_model
def scalable_vit_base(pretrained: bool = False, **kwargs) -> ScalableViT:
    model_args = dict(MODEL_ARGS['scalable_vit_base'], **kwargs)
    return _create_scalable_vit('scalable_vit_base', pretrained=pretrained, **model_args)


@register_model
def scalable_vit_large(pretrained: bool = False, **kwargs) -> ScalableViT:
    model_args = dict(MODEL_ARGS['scalable_vit_large'], **kwargs)
    return _create_scalable_vit('scalable_vit_large', pretrained=pretrained, **model_args)
