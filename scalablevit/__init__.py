"""ScalableViT backbone (arXiv 2203.10790). Importing registers the timm entry points
``scalable_vit_small``, ``scalable_vit_base`` and ``scalable_vit_large``."""
from .inference import OptimizedModel, optimize_for_inference
from .model import (
    MODEL_ARGS,
    Block,
    InteractiveWindowAttention,
    PatchEmbed,
    PosConv,
    ScalableSelfAttention,
    ScalableViT,
    TokensToMap,
    checkpoint_filter_fn,
    scalable_vit_base,
    scalable_vit_large,
    scalable_vit_small,
    unwrap_state_dict,
)

__version__ = '0.1.0'

__all__ = [
    'MODEL_ARGS', 'Block', 'InteractiveWindowAttention', 'OptimizedModel', 'PatchEmbed', 'PosConv',
    'ScalableSelfAttention', 'ScalableViT', 'TokensToMap', 'checkpoint_filter_fn', 'optimize_for_inference',
    'scalable_vit_base', 'scalable_vit_large', 'scalable_vit_small', 'unwrap_state_dict',
]
