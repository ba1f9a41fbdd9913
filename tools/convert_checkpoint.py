"""Move ScalableViT weights between classification, detection/segmentation and timm.

    # a detection / segmentation checkpoint -> an ImageNet-style backbone state dict (for timm, main.py --finetune)
    python tools/convert_checkpoint.py work_dirs/retinanet/epoch_12.pth retinanet_backbone.pth
    # a classification checkpoint -> the backbone init the det/seg configs load (init_cfg / `pretrained = ...`)
    python tools/convert_checkpoint.py classification/digits/checkpoint_best.pth pretrained/backbone.pth
    # either -> a timm folder: config.json + model.safetensors
    python tools/convert_checkpoint.py classification/digits/checkpoint_best.pth my_model --to timm

What goes in and out:

* ``--to classifier`` (the default for a det/seg checkpoint, whose weights start with ``backbone.``): ``backbone.`` is
  stripped and what the classifier does not have (``out_norms.*``, neck, heads) is dropped. The output norm of the
  last stage (a LayerNorm with eps 1e-6 on the last stage's output) is the classifier's final ``norm``: same place,
  same function. If the backbone had none (``out_norm=False``), ``norm`` keeps its initial value (weight 1, bias 0)
  and the tool says so. There is no classification head (``num_classes=0``); ``main.py --finetune`` adds one.
* ``--to backbone`` (the default for a classification checkpoint: ours, the released files, timm's): the
  classification head and final norm are dropped; the rest is what ``ScalableViTBackbone``'s ``init_cfg`` loads.
* ``--to timm``: a folder with timm's ``config.json`` (architecture, ``model_args``, preprocessing, class names) and
  ``model.safetensors``, written with ``timm.models.save_for_hf``. It loads with
  ``timm.create_model('local-dir:FOLDER', pretrained=True)``, or with ``timm.create_model(NAME, pretrained=True,
  pretrained_cfg_overlay=dict(file='FOLDER/model.safetensors', num_classes=N), **model_args)``.

Wrappers are unwrapped: ``{'model': ...}``, ``{'state_dict': ...}`` (mmengine, timm), DDP's ``module.``, torch.compile's
``_orig_mod.``; ``--ema`` takes the EMA weights (``model_ema``, timm's ``state_dict_ema``). The architecture comes from
the checkpoint (``meta`` of ``classification/main.py`` checkpoints, ``args`` of DeiT-style files, the config that
mmengine records in ``meta['cfg']``, read as data: its ``model = dict(...)`` is parsed as literals and nothing in it
runs) or from ``--model``/``--model-kwargs`` (classification) and ``--config``/``--arch`` (detection/segmentation).
The input is never overwritten: an output path that is the input is refused.

Every conversion is checked before anything is written: the source weights load strictly into the source model, the
converted weights load strictly into the target (the det/seg backbone, the classifier, timm's loader), and both give
the same outputs on a fixed input. Output files are ``.pth`` (``{'state_dict': ..., 'meta': ...}``, readable with
``torch.load(weights_only=True)``) or ``.safetensors`` (classifier weights; ``meta`` in the header). Errors are one
line, exit status 1.
"""
import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
from typing import Any, Dict, List, Optional, Sequence

import timm
import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a clone without installing
import scalablevit  # noqa: E402,F401  (registers scalable_vit_small/base/large with timm)
from scalablevit.checkpoint import (  # noqa: E402
    atomic_copy,
    atomic_write,
    load_checkpoint,
    load_state_dict_strict,
    recorded_config,
    tensor_bytes,
)
from scalablevit.cli import ParseKwargs
from scalablevit.errors import UserError, run_main
from scalablevit.model import resolve_arch

# ScalableViTBackbone arguments that are not ScalableViT size arguments
BACKBONE_ONLY = ('type', 'arch', 'out_indices', 'out_norm', 'drop_rate', 'attn_drop_rate', 'drop_path_rate',
                 'frozen_stages', 'with_cp', 'pretrained', 'init_cfg')
WRAPPER_PREFIXES = ('module.', '_orig_mod.')
NOT_WEIGHTS = ('n_averaged',)  # torch.optim.swa_utils.AveragedModel's counter


class ConversionError(UserError):
    """A conversion that cannot be done or does not check out; reported in one line."""


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser('Convert ScalableViT checkpoints', add_help=False)
    parser.add_argument('src', help='checkpoint to convert')
    parser.add_argument('out', help='output: FILE.pth or FILE.safetensors, or a folder for --to timm')
    parser.add_argument('--to', choices=('classifier', 'backbone', 'timm'), default=None,
                        help='target (default: classifier for a det/seg checkpoint, backbone for a classification one)')
    parser.add_argument('--ema', action='store_true', help="convert the EMA weights (model_ema / state_dict_ema)")
    parser.add_argument('--model', default=None, help='timm model name of a classification checkpoint')
    parser.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs, metavar='KEY=VALUE',
                        help='model arguments of a classification checkpoint, merged over the recorded ones')
    parser.add_argument('--config', default=None, help='mmdet/mmseg config of a det/seg checkpoint')
    parser.add_argument('--arch', default=None, help="backbone arch of a det/seg checkpoint: 's', 'b', 'l'")
    parser.add_argument('--check-size', default=None, type=int,
                        help='input size of the output comparison (default: the recorded one, else 224)')
    return parser


# ---------------------------------------------------------------------------------------------------------------------
# Reading

def read_checkpoint(path: str) -> Dict[str, Any]:
    """The file, read as data: ``torch.load(weights_only=True)``, with mmengine's few classes allowed for this load
    when the OpenMMLab stack is installed (``scalablevit.mm.checkpoint``)."""
    try:
        from scalablevit.mm.checkpoint import load_mm_checkpoint
    except ImportError:
        return load_checkpoint(path)
    return load_mm_checkpoint(path)


def select_weights(checkpoint: Dict[str, Any], ema: bool, source: str) -> Dict[str, torch.Tensor]:
    """The weights of ``checkpoint`` with wrapper prefixes removed (tensors only)."""
    keys = ('model_ema', 'state_dict_ema') if ema else ('model', 'state_dict')
    weights = next((checkpoint[k] for k in keys if isinstance(checkpoint.get(k), dict)), None)
    if weights is None:
        if ema:
            raise ConversionError(f'--ema: {source} has no EMA weights (model_ema / state_dict_ema)')
        weights = checkpoint
    state_dict = {}
    for k, v in weights.items():
        if not isinstance(v, torch.Tensor) or k in NOT_WEIGHTS:
            continue
        stripped = True
        while stripped:  # DDP(compile(model)), compile(DDP(model)), EMA(DDP(...)): any order, any depth
            stripped = False
            for prefix in WRAPPER_PREFIXES:
                if k.startswith(prefix):
                    k, stripped = k[len(prefix):], True
        state_dict[k] = v
    if not state_dict:
        raise ConversionError(f'{source} holds no tensors')
    return state_dict


def _get(container: Any, key: str, default=None):
    if isinstance(container, dict):
        return container.get(key, default)
    return getattr(container, key, default)


def classification_arch(checkpoint: Dict, state_dict: Dict, args: argparse.Namespace) -> Dict[str, Any]:
    """Model name, kwargs, classes and preprocessing of a classification checkpoint."""
    meta = checkpoint.get('meta') if isinstance(checkpoint.get('meta'), dict) else {}
    run_args = checkpoint.get('args')  # DeiT-style: the command line (dict here, Namespace in released files)
    name = args.model or meta.get('model') or _get(run_args, 'model')
    if not name:
        raise ConversionError(f'{args.src} records no model name; give --model (and --model-kwargs if the sizes are '
                              f'not the released ones)')
    kwargs = dict(meta.get('model_kwargs') or _get(run_args, 'model_kwargs') or {})
    kwargs.update(args.model_kwargs)
    num_classes = meta.get('num_classes')
    if num_classes is None:  # the rows of the last head layer: head.weight (Linear) or head.3.weight (MLP head)
        layers = [k for k in state_dict if k.startswith('head.') and k.endswith('weight')]
        layers.sort(key=lambda k: int(k.split('.')[1]) if k.split('.')[1].isdigit() else -1)
        num_classes = int(state_dict[layers[-1]].shape[0]) if layers else 0
    return dict(name=name, kwargs=kwargs, num_classes=int(num_classes),
                class_names=list(meta.get('class_names') or []), pretrained_cfg=meta.get('pretrained_cfg'))


def backbone_cfg(checkpoint: Dict, args: argparse.Namespace) -> Dict[str, Any]:
    """``model.backbone`` of the det/seg config: ``--config``, else ``--arch``, else the config text mmengine
    recorded in ``meta['cfg']``, read as data (``scalablevit.checkpoint.recorded_config``: literals only, nothing of
    it runs)."""
    if args.config:
        try:
            from mmengine.config import Config
        except ImportError as e:
            raise ConversionError('reading a det/seg config needs mmengine (bash install.sh); or give --arch') from e
        if not os.path.isfile(args.config):
            raise ConversionError(f'--config {args.config}: file not found')
        backbone, where = Config.fromfile(args.config).get('model', {}).get('backbone'), args.config
        backbone = backbone.to_dict() if hasattr(backbone, 'to_dict') else backbone
    elif args.arch:
        backbone, where = dict(type='ScalableViTBackbone', arch=args.arch), '--arch'
    else:
        text, where = _get(checkpoint.get('meta'), 'cfg'), f'the config recorded in {args.src}'
        if not isinstance(text, str):
            raise ConversionError(f'{args.src} records no config (meta["cfg"]); give --config CONFIG or --arch s|b|l')
        try:
            model = recorded_config(text, 'model')
        except ValueError as e:
            raise ConversionError(f'cannot read the model from {where} without running it ({e}); give --config '
                                  f'or --arch') from None
        backbone = model.get('backbone') if isinstance(model, dict) else None
    if not isinstance(backbone, dict) or 'ScalableViT' not in str(backbone.get('type', '')):
        raise ConversionError(f'{where}: model.backbone is {isinstance(backbone, dict) and backbone.get("type")}, '
                              f'not ScalableViTBackbone')
    arch = backbone.get('arch', 's')
    extra = {k: v for k, v in backbone.items() if k not in BACKBONE_ONLY}
    try:
        name, sizes = resolve_arch(arch)
    except ValueError as e:
        raise ConversionError(str(e)) from e
    # a named size: the timm entry point has its sizes; a dict of sizes: over the small model's
    kwargs = dict(extra) if isinstance(arch, str) else {**sizes, **extra}
    kwargs = {k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()}
    return dict(name=name, kwargs=kwargs, backbone=backbone)


# ---------------------------------------------------------------------------------------------------------------------
# Checking

def fixed_input(size: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 3, size, size, generator=g)


def same_outputs(what: str, expected: Sequence[torch.Tensor], got: Sequence[torch.Tensor]) -> float:
    worst = 0.0
    for a, b in zip(expected, got):
        if a.shape != b.shape:
            raise ConversionError(f'{what}: output shapes differ ({tuple(a.shape)} vs {tuple(b.shape)})')
        diff = (a - b).abs().max().item()
        worst = max(worst, diff)
        if not torch.allclose(a, b, rtol=1e-4, atol=1e-5):
            raise ConversionError(f'{what}: outputs differ by up to {diff:.3g} on the check input; not written')
    return worst


def build(name: str, kwargs: Dict, num_classes: int) -> nn.Module:
    try:
        return timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs).eval()
    except (RuntimeError, TypeError, ValueError, AssertionError) as e:
        raise ConversionError(f'cannot build {name} with {kwargs}: {str(e).splitlines()[0]}') from e


def load_strict(model: nn.Module, state_dict: Dict, source: str, hint: str = '', allow_missing=()):
    load_state_dict_strict(model, state_dict, source, allow_missing=allow_missing, hint=hint)


# ---------------------------------------------------------------------------------------------------------------------
# Conversions: each returns (state dict, meta, the classifier for --to timm or None, report lines)

def mm_to_classifier(checkpoint: Dict, state_dict: Dict, args: argparse.Namespace):
    try:
        from scalablevit.mm import ScalableViTBackbone
    except ImportError as e:
        raise ConversionError(f'converting a det/seg checkpoint needs mmengine (bash install.sh): {e}') from e
    spec = backbone_cfg(checkpoint, args)
    bb_weights = {k[len('backbone.'):]: v for k, v in state_dict.items() if k.startswith('backbone.')}
    cfg = {k: v for k, v in spec['backbone'].items() if k not in ('type', 'init_cfg', 'pretrained')}
    try:
        source = ScalableViTBackbone(**cfg, init_cfg=None).eval()
    except (TypeError, ValueError, AssertionError) as e:
        raise ConversionError(f'cannot build the backbone {spec["backbone"]}: {e}') from e
    load_strict(source, bb_weights, f'{args.src} (backbone.*)', hint='check --config / --arch')

    name, kwargs = spec['name'], spec['kwargs']
    target = build(name, kwargs, num_classes=0)
    num_stages = len(target.stages)
    if len(source.stages) != num_stages:
        raise ConversionError(f'the backbone of {args.src} stops after stage {len(source.stages) - 1} (out_indices '
                              f'{source.out_indices}); an ImageNet classifier needs all {num_stages} stages')
    last = str(num_stages - 1)
    out = {k: v for k, v in bb_weights.items() if not k.startswith('out_norms.')}
    notes = []
    norm_from_backbone = last in source.out_norms and isinstance(source.out_norms[last], nn.LayerNorm)
    if norm_from_backbone:
        out['norm.weight'] = bb_weights[f'out_norms.{last}.weight']
        out['norm.bias'] = bb_weights[f'out_norms.{last}.bias']
        notes.append(f'norm <- out_norms.{last} (the last stage output norm)')
    else:
        out.update({k: v.clone() for k, v in target.state_dict().items() if k.startswith('norm.')})
        notes.append('the backbone has no output norm on the last stage: norm keeps its initial value (1, 0)')
    dropped = sorted({k.split('.')[0] for k in state_dict if not k.startswith('backbone.')})
    notes.append(f'dropped out_norms and {", ".join(dropped) or "nothing else"}')
    load_strict(target, out, f'converted {args.src}')

    x = fixed_input(args.check_size or 224)
    indices = list(source.out_indices)
    with torch.no_grad():
        want = source.forward_intermediates(x, indices=indices, intermediates_only=True)
        got = target.forward_intermediates(x, indices=indices, intermediates_only=True)
        if norm_from_backbone:
            want = [*want, source(x)[-1]]
            final = target.forward_features(x)  # normed last map: (B, C, H, W), or tokens (B, N, C)
            if final.dim() == 3:
                final = final.transpose(1, 2).reshape(want[-1].shape)  # (B, C, H, W)
            got = [*got, final]
    diff = same_outputs('backbone vs converted classifier', want, got)
    compared = 'feature maps and final norm' if norm_from_backbone else 'feature maps'
    notes.append(f'checked: strict load into {name} (num_classes=0), {compared} equal to the backbone\'s on a '
                 f'{x.shape[-1]}x{x.shape[-1]} input (max diff {diff:.2g})')
    meta = dict(model=name, model_kwargs=kwargs, num_classes=0, class_names=[],
                converted_from=os.path.abspath(args.src))
    return out, meta, target, notes


def classifier_to_backbone(checkpoint: Dict, state_dict: Dict, args: argparse.Namespace):
    spec = classification_arch(checkpoint, state_dict, args)
    source = build(spec['name'], spec['kwargs'], spec['num_classes'])
    load_strict(source, state_dict, args.src, hint='check --model / --model-kwargs')
    out = {k: v for k, v in state_dict.items() if not k.startswith(('head.', 'norm.'))}
    num_stages = len(source.stages)
    x = fixed_input(args.check_size or (spec['pretrained_cfg'] or {}).get('input_size', (3, 224, 224))[-1])
    with torch.no_grad():
        want = source.forward_intermediates(x, intermediates_only=True)
    try:
        from scalablevit.mm import ScalableViTBackbone, load_pretrained
    except ImportError:  # no OpenMMLab stack: the same network, pruned by hand
        target = build(spec['name'], spec['kwargs'], num_classes=0)
        target.prune_intermediate_layers(list(range(num_stages)), prune_norm=True, prune_head=True)
        load_strict(target, out, f'converted {args.src}')
        what = 'the pruned classifier (mmengine not installed)'
    else:
        kwargs = {k: v for k, v in spec['kwargs'].items() if k != 'num_classes'}
        target = ScalableViTBackbone(arch=spec['name'], out_indices=tuple(range(num_stages)), **kwargs).eval()
        load_pretrained(target, {'state_dict': out})
        what = 'ScalableViTBackbone, as init_cfg loads it'
    with torch.no_grad():
        got = target.forward_intermediates(x, indices=list(range(num_stages)), intermediates_only=True)
    diff = same_outputs('classifier vs converted backbone', want, got)
    notes = [f'dropped {", ".join(sorted({k.split(".")[0] for k in state_dict} - {k.split(".")[0] for k in out}))}',
             f'checked: strict load into {what}, feature maps equal to the classifier\'s on a '
             f'{x.shape[-1]}x{x.shape[-1]} input (max diff {diff:.2g})']
    meta = dict(model=spec['name'], model_kwargs=spec['kwargs'], converted_from=os.path.abspath(args.src))
    return out, meta, None, notes


def classifier_as_is(checkpoint: Dict, state_dict: Dict, args: argparse.Namespace):
    spec = classification_arch(checkpoint, state_dict, args)
    model = build(spec['name'], spec['kwargs'], spec['num_classes'])
    load_strict(model, state_dict, args.src, hint='check --model / --model-kwargs')
    meta = dict(model=spec['name'], model_kwargs=spec['kwargs'], num_classes=spec['num_classes'],
                class_names=spec['class_names'], converted_from=os.path.abspath(args.src))
    if spec['pretrained_cfg']:
        meta['pretrained_cfg'] = spec['pretrained_cfg']
    return dict(state_dict), meta, model, [f'checked: strict load into {spec["name"]}']


# ---------------------------------------------------------------------------------------------------------------------
# Writing

def write_file(state_dict: Dict, meta: Dict, path: str, target: str):
    if path.endswith('.safetensors'):
        if target == 'backbone':
            raise ConversionError('--to backbone writes .pth: the det/seg configs read their init_cfg checkpoint '
                                  'with torch.load')
        from safetensors.torch import save
        tensors = {k: v.detach().contiguous() for k, v in state_dict.items()}
        atomic_write(path, save(tensors, metadata={'format': 'pt', 'meta': json.dumps(meta)}))
    elif path.endswith('.pth') or path.endswith('.pt'):
        atomic_write(path, lambda f: torch.save({'state_dict': state_dict, 'meta': meta}, f),
                     need=tensor_bytes(state_dict))
    else:
        raise ConversionError(f'{path}: name the output .pth or .safetensors (or use --to timm for a folder)')


def write_timm_folder(model: nn.Module, meta: Dict, folder: str, check_size: Optional[int]) -> List[str]:
    """timm's ``save_for_hf`` into a temporary folder, loaded back both ways and compared, then moved to ``folder``."""
    from timm.models import save_for_hf

    if os.path.isfile(folder):
        raise ConversionError(f'{folder} is a file; --to timm writes a folder')
    parent = os.path.dirname(os.path.abspath(folder))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix='.convert-', dir=parent)
    try:
        model_args = {k: v for k, v in meta['model_kwargs'].items() if k != 'num_classes'}
        model_config = dict(label_names=meta['class_names']) if meta.get('class_names') else None
        data_config = dict(meta['pretrained_cfg']) if meta.get('pretrained_cfg') else None
        save_for_hf(model, tmp, model_config=model_config, model_args=model_args, safe_serialization=True,
                    data_config=data_config)
        n = meta['num_classes']
        size = check_size or (data_config or {}).get('input_size', (3, 224, 224))[-1]
        x = fixed_input(size)
        with torch.no_grad():
            want = model(x)
            by_file = timm.create_model(meta['model'], pretrained=True, num_classes=n, **model_args,
                                        pretrained_cfg_overlay=dict(file=os.path.join(tmp, 'model.safetensors'),
                                                                    num_classes=n)).eval()
            by_dir = timm.create_model(f'local-dir:{tmp}', pretrained=True).eval()
            d1 = same_outputs('timm pretrained_cfg_overlay(file=...) load', [want], [by_file(x)])
            d2 = same_outputs('timm local-dir load', [want], [by_dir(x)])
        os.makedirs(folder, exist_ok=True)
        for name in os.listdir(tmp):
            atomic_copy(os.path.join(tmp, name), os.path.join(folder, name))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return [f'checked: timm.create_model(..., pretrained=True, pretrained_cfg_overlay=dict(file=...)) and '
            f'timm.create_model("local-dir:...", pretrained=True) give the source outputs on a {size}x{size} input '
            f'(max diff {max(d1, d2):.2g})']


def check_not_overwriting(src: str, out: str, to: Optional[str]):
    """Refuse an output that is the input itself (``convert ck.pth ck.pth`` would replace a training checkpoint,
    optimizer and EMA included, by the converted weights); for a timm folder, the files it writes into it."""
    targets = [os.path.join(out, n) for n in ('model.safetensors', 'config.json')] if to == 'timm' else [out]
    for target in targets:
        if os.path.exists(target) and os.path.samefile(src, target):
            raise ConversionError(f'the output {out} is the input {src}: it would be replaced by the converted '
                                  f'weights; give another output path (nothing was written)')


def convert(args: argparse.Namespace) -> List[str]:
    if os.path.isfile(args.src):
        check_not_overwriting(args.src, args.out, args.to)
    checkpoint = read_checkpoint(args.src)
    state_dict = select_weights(checkpoint, args.ema, args.src)
    if any(k.startswith('backbone.') for k in state_dict):
        kind = 'det/seg'
    elif any(k.startswith('patch_embeds.') for k in state_dict):
        kind = 'classification'
    else:
        raise ConversionError(f'{args.src} is not a ScalableViT checkpoint: no patch_embeds.* (classification) nor '
                              f'backbone.* (detection/segmentation) weights among {len(state_dict)} tensors')
    target = args.to or ('classifier' if kind == 'det/seg' else 'backbone')
    if kind == 'det/seg':
        if target == 'backbone':
            raise ConversionError(f'{args.src} is already a det/seg checkpoint; its backbone loads as it is '
                                  f'(init_cfg=dict(type="Pretrained", checkpoint=..., prefix="backbone."))')
        out, meta, model, notes = mm_to_classifier(checkpoint, state_dict, args)
    elif target == 'backbone':
        out, meta, model, notes = classifier_to_backbone(checkpoint, state_dict, args)
    elif target == 'timm':
        out, meta, model, notes = classifier_as_is(checkpoint, state_dict, args)
    else:
        raise ConversionError(f'{args.src} is already a classification checkpoint; use --to backbone or --to timm')
    if target == 'timm':
        notes += write_timm_folder(model, meta, args.out, args.check_size)
    else:
        write_file(out, meta, args.out, target)
    return [f'{args.src} ({kind}) -> {args.out} ({target}, {len(out)} tensors)', *notes]


def cli(argv=None) -> int:
    parser = argparse.ArgumentParser('Convert ScalableViT checkpoints', parents=[get_args_parser()],
                                     description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    args = parser.parse_args(argv)
    logging.getLogger('timm').setLevel(logging.WARNING)  # its "Loading pretrained weights" lines of the check
    return run_main(lambda: print('\n'.join(convert(args))))


if __name__ == '__main__':
    sys.exit(cli())
