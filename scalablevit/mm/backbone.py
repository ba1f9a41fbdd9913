"""``ScalableViTBackbone``: ScalableViT as the backbone of mmdet / mmseg models (mmseg's ``twins.py`` and mmdet's
``swin.py`` are the pattern: a ``BaseModule``-style ``init_cfg`` and a tuple of NCHW maps).

The backbone *is* the classification model (a subclass of :class:`scalablevit.ScalableViT`), so its parameter names
are the released checkpoint's and an ImageNet checkpoint loads by name. It is registered in mmengine's root
``MODELS`` registry, which mmdet's and mmseg's registries search through their parent.
"""
from typing import Dict, Optional, Sequence, Union

import torch
import torch.nn as nn
from mmengine.logging import print_log
from mmengine.registry import MODELS

from ..checkpoint import check_state_dict
from ..model import ScalableViT, resolve_arch, unwrap_state_dict
from .checkpoint import load_mm_checkpoint

__all__ = ['ScalableViTBackbone', 'load_pretrained']


def load_pretrained(model: ScalableViT, checkpoint: Union[str, Dict], prefix: str = '') -> Dict[str, list]:
    """Load an ImageNet checkpoint (released file, ``classification/`` output or timm) into a backbone.

    The classification head and final norm are dropped (the backbone has none); weights of stages the backbone
    does not build (``out_indices`` stops early) are skipped. Anything else missing or unexpected, or of the
    wrong shape, raises :class:`scalablevit.checkpoint.CheckpointMismatchError` naming the keys (a missing or
    unreadable file: :class:`scalablevit.checkpoint.CheckpointError`); nothing is half-loaded silently.

    Returns:
        ``dict(dropped=[...], skipped=[...], missing=[...])`` (``missing``: keys the backbone initialises itself,
        its output norms).
    """
    source = checkpoint if isinstance(checkpoint, str) else 'given as a dict'
    if isinstance(checkpoint, str):
        checkpoint = load_mm_checkpoint(checkpoint)
    state_dict = unwrap_state_dict(checkpoint)
    if prefix:
        state_dict = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    own = model.state_dict()
    num_stages = len(model.stages)
    dropped, skipped, load = [], [], {}
    for k, v in state_dict.items():
        if k.startswith(('head.', 'norm.')) and k not in own:
            dropped.append(k)
            continue
        parts = k.split('.')
        if (parts[0] in ('patch_embeds', 'stages', 'pos_block') and len(parts) > 1 and parts[1].isdigit()
                and int(parts[1]) >= num_stages):
            skipped.append(k)
            continue
        load[k] = v
    check_state_dict(model, load, source, allow_missing=('out_norms.',),
                     hint='is it an ImageNet ScalableViT checkpoint of the size given by `arch`?')
    result = model.load_state_dict(load, strict=False)
    return dict(dropped=dropped, skipped=skipped, missing=sorted(result.missing_keys))


@MODELS.register_module()
class ScalableViTBackbone(ScalableViT):
    """ScalableViT as a dense-prediction backbone: a pyramid of NCHW maps at strides 4, 8, 16, 32.

    Args:
        arch: ``'s'``, ``'b'``, ``'l'``, a timm name (``'scalable_vit_small'``) or a dict of
            :class:`scalablevit.ScalableViT` size arguments (``embed_dims``, ``depths``, ...). Default: ``'s'``.
        out_indices: stages whose outputs are returned, increasing; stages after the last are not built.
            Default: ``(0, 1, 2, 3)``.
        out_norm: a LayerNorm on each returned map (``out_norms.{i}``). Default: ``True``.
        drop_rate: dropout after patch embeddings and in MLPs. Default: 0.
        attn_drop_rate: dropout on attention weights. Default: 0.
        drop_path_rate: stochastic depth, linear over all blocks. Default: 0.1.
        frozen_stages: stages ``0..frozen_stages`` are frozen (no grad, eval mode); -1 freezes nothing.
            Default: -1.
        with_cp: gradient checkpointing per block. Default: ``False``.
        pretrained: path of an ImageNet checkpoint; same as ``init_cfg=dict(type='Pretrained', checkpoint=...)``.
            Default: ``None``.
        init_cfg: ``dict(type='Pretrained', checkpoint=PATH, prefix=...)`` or ``None`` (ScalableViT's own init),
            applied by mmengine's runner through :meth:`init_weights`. Default: ``None``.
        **kwargs: other :class:`scalablevit.ScalableViT` arguments (they override ``arch``).
    """

    def __init__(
            self,
            arch: Union[str, Dict] = 's',
            out_indices: Sequence[int] = (0, 1, 2, 3),
            out_norm: bool = True,
            drop_rate: float = 0.,
            attn_drop_rate: float = 0.,
            drop_path_rate: float = 0.1,
            frozen_stages: int = -1,
            with_cp: bool = False,
            pretrained: Optional[str] = None,
            init_cfg: Optional[Dict] = None,
            **kwargs,
    ):
        _, model_args = resolve_arch(arch)
        model_args.update(kwargs)
        model_args.pop('num_classes', None)
        super().__init__(num_classes=0, drop_rate=drop_rate, attn_drop_rate=attn_drop_rate,
                         drop_path_rate=drop_path_rate, **model_args)
        num_stages = len(self.stages)
        out_indices = tuple(out_indices)
        if not out_indices or any(not isinstance(i, int) or not 0 <= i < num_stages for i in out_indices):
            raise ValueError(f'out_indices must be stage indices in [0, {num_stages - 1}], got {out_indices}')
        if list(out_indices) != sorted(set(out_indices)):
            raise ValueError(f'out_indices must be increasing and unique, got {out_indices}')
        if not -1 <= frozen_stages < num_stages:
            raise ValueError(f'frozen_stages must be in [-1, {num_stages - 1}], got {frozen_stages}')
        if pretrained is not None and init_cfg is not None:
            raise ValueError('give either pretrained or init_cfg, not both')
        if pretrained is not None:
            init_cfg = dict(type='Pretrained', checkpoint=pretrained)
        if init_cfg is not None and init_cfg.get('type') != 'Pretrained':
            raise ValueError(f"init_cfg must be dict(type='Pretrained', checkpoint=...) or None, got {init_cfg}")
        self.init_cfg = init_cfg
        self.out_indices = out_indices
        self.frozen_stages = frozen_stages

        # Only what the pyramid uses: no head, no final norm, no stage after the last output (DDP would
        # otherwise see parameters without gradients).
        self.prune_intermediate_layers(list(out_indices), prune_norm=True, prune_head=True)
        self.out_norms = nn.ModuleDict({
            str(i): nn.LayerNorm(self.embed_dims[i], eps=1e-6) if out_norm else nn.Identity() for i in out_indices})
        for m in self.out_norms.values():
            self._init_weights(m)
        self.set_grad_checkpointing(with_cp)
        self._freeze_stages()

    def init_weights(self):
        """Called by mmengine's runner: load ``init_cfg``'s checkpoint, if any."""
        if self.init_cfg is None:
            return
        ckpt = self.init_cfg['checkpoint']
        info = load_pretrained(self, ckpt, prefix=self.init_cfg.get('prefix', ''))
        print_log(f'ScalableViTBackbone: loaded {ckpt}; dropped {len(info["dropped"])} classification keys '
                  f'({", ".join(sorted({k.split(".")[0] for k in info["dropped"]})) or "none"}), skipped '
                  f'{len(info["skipped"])} of unused stages, initialised {", ".join(info["missing"]) or "nothing"}',
                  logger='current')

    def _freeze_stages(self):
        for i in range(self.frozen_stages + 1):
            for m in (self.patch_embeds[i], self.pos_drops[i], self.stages[i], self.pos_block[i]):
                m.eval()
                for p in m.parameters():
                    p.requires_grad = False

    def train(self, mode: bool = True):
        super().train(mode)
        self._freeze_stages()
        return self

    def forward(self, x: torch.Tensor) -> tuple:
        feats = self.forward_intermediates(x, indices=list(self.out_indices), intermediates_only=True)
        outs = []
        for i, y in zip(self.out_indices, feats):
            y = self.out_norms[str(i)](y.permute(0, 2, 3, 1))  # (B, H, W, C)
            outs.append(y.permute(0, 3, 1, 2).contiguous())  # (B, C, H, W)
        return tuple(outs)

