"""Exported models for serving: write them (ONNX, OpenVINO IR, a ``torch.export`` / AOTInductor package), check
them against the eager model before they are written, read them back with an inference engine, and quantize them
to int8 with NNCF.

    model, class_names, cfg = load_classifier('digits/checkpoint_best.pth')
    meta = export_model(model, 'digits.onnx', 'onnx', meta=serving_meta(model, class_names, cfg))
    runner = load_exported('digits.onnx', engine='onnxruntime')
    logits, = runner(images)   # float32 NCHW numpy array in, list of numpy arrays out; runner.meta is meta

What is stored with every file (``meta``): the timm model name and arguments, the class names, the preprocessing
(timm ``pretrained_cfg`` keys: input size, interpolation, crop, mean, std), the input shape (batch dynamic, image
size fixed: the graph is specialised to one image size, see below), the outputs, the precision and the check that
was made. ONNX keeps it in the model's ``metadata_props`` (key ``scalablevit``), OpenVINO IR in the ``.xml``'s
``rt_info`` (key ``scalablevit``), a ``.pt2`` package in a JSON file beside it (``NAME.json``). All three are JSON
text read as data: nothing in an exported file is executed by Python (an ONNX / OpenVINO graph is run by its engine;
an AOTInductor package holds a compiled shared library, so load only packages you made).

The image size is fixed at export: ScalableViT pads a map to whole windows only when its size needs it, a Python
branch that ``torch.export`` resolves for the example's size. A graph traced at one size computes garbage at another
(measured: the export succeeds with a dynamic height and width and fails at run time, or silently differs), so the
exports here have a dynamic batch and a fixed height and width, and the check runs two batch sizes.

Engines are imported when used; one that is missing is a :class:`EngineNotInstalled` (a ``UserError``) naming the
package to install.
"""
import importlib
import json
import os
import shutil
import tempfile
import warnings
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn

from .checkpoint import atomic_write, load_checkpoint, load_state_dict_strict
from .errors import UserError

__all__ = ['ENGINES', 'EXPORT_FORMATS', 'EngineNotInstalled', 'ExportError', 'ExportedModel', 'FeaturePyramid',
           'check_outputs', 'export_model', 'fixed_inputs', 'load_classifier', 'load_exported', 'max_rel_err',
           'quantize_openvino', 'read_meta', 'require', 'serving_meta']

EXPORT_FORMATS = ('onnx', 'openvino', 'pt2')
ENGINES = ('onnxruntime', 'openvino', 'torch')
FORMAT_SUFFIX = {'onnx': '.onnx', 'openvino': '.xml', 'pt2': '.pt2'}
META_KEY = 'scalablevit'
META_FORMAT = 'scalablevit-export'
PREPROCESS_KEYS = ('input_size', 'interpolation', 'crop_pct', 'crop_mode', 'mean', 'std')
FP32_TOLERANCE = 1e-4  # max relative error of an fp32 export against eager before it is refused
CHECK_BATCHES = (1, 3)  # the check runs two batch sizes: the batch dimension is dynamic


class ExportError(UserError, ValueError):
    """An export that cannot be made, that does not match eager, or a file that is not an export."""


class EngineNotInstalled(UserError, ImportError):
    """An engine (or the quantizer) that is not installed; the message names the package."""


def require(package: str, purpose: str) -> Any:
    """``import package``, or :class:`EngineNotInstalled` naming it (``purpose``: what needed it)."""
    try:
        return importlib.import_module(package)
    except ImportError as e:
        pip_name = {'openvino': 'openvino', 'nncf': 'nncf', 'onnxruntime': 'onnxruntime', 'onnx': 'onnx',
                    'onnxscript': 'onnxscript'}.get(package.split('.')[0], package.split('.')[0])
        raise EngineNotInstalled(f'{purpose} needs the {pip_name} package, which is not installed ({e}); '
                                 f'pip install {pip_name} (requirements.txt pins the tested version; '
                                 f'bash install.sh installs it)') from e


# ---------------------------------------------------------------------------------------------------------------------
# The model to export

class FeaturePyramid(nn.Module):
    """The backbone's feature maps as a module for export: timm's ``features_only`` wrapper
    (``FeatureGetterNet``) around a classifier whose weights are loaded, so the pyramid is that of the checkpoint."""

    def __init__(self, model: nn.Module, out_indices: Sequence[int]):
        super().__init__()
        from timm.models._features import FeatureGetterNet
        self.net = FeatureGetterNet(model, out_indices=tuple(out_indices))
        self.feature_info = self.net.feature_info

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        return list(self.net(x))


def _timm_folder(path: str) -> Tuple[str, Dict[str, Any], List[str], Dict[str, Any], Dict[str, torch.Tensor]]:
    """A timm folder (``config.json`` + ``model.safetensors``, as ``tools/convert_checkpoint.py --to timm`` and
    ``timm.models.save_for_hf`` write it): name, model arguments, class names, preprocessing and weights."""
    config_path = os.path.join(path, 'config.json')
    weights_path = os.path.join(path, 'model.safetensors')
    if not os.path.isfile(config_path) or not os.path.isfile(weights_path):
        raise ExportError(f'{path} is a folder but not a timm model folder (config.json and model.safetensors)')
    try:
        with open(config_path) as f:
            config = json.load(f)
        from safetensors.torch import load_file
        weights = load_file(weights_path)
    except Exception as e:  # noqa: BLE001  (JSON and safetensors errors: report them uniformly)
        raise ExportError(f'cannot read the timm folder {path}: {type(e).__name__}: {str(e).splitlines()[0]}') from e
    if not isinstance(config, dict) or 'architecture' not in config:
        raise ExportError(f'{config_path} names no architecture')
    kwargs = {k: v for k, v in (config.get('model_args') or {}).items() if k not in ('in_chans',)}
    cfg = dict(config.get('pretrained_cfg') or {})
    return config['architecture'], kwargs, list(config.get('label_names') or []), cfg, weights


def _read_classifier(path: str, model_name: Optional[str], model_kwargs: Optional[Dict[str, Any]],
                     num_classes: Optional[int], ema: bool):
    """What :func:`load_classifier` builds from ``path``: (model name, kwargs, num_classes, class names,
    preprocessing, state dict, the name of the weights' source for errors)."""
    weights_source = path
    if os.path.isdir(path):
        name, kwargs, class_names, cfg, state_dict = _timm_folder(path)
        name = model_name or name
        kwargs = {**kwargs, **(model_kwargs or {})}
        num_classes = num_classes or kwargs.pop('num_classes', None)
        kwargs.pop('num_classes', None)
        if ema:
            raise ExportError(f'--ema: the timm folder {path} holds one set of weights')
    else:
        checkpoint = load_checkpoint(path)
        meta = checkpoint.get('meta')
        if isinstance(meta, dict) and 'model' in meta:  # main.py's (an mmengine meta records no model)
            name = model_name or meta['model']
            kwargs = {**meta.get('model_kwargs', {}), **(model_kwargs or {})}
            num_classes = num_classes or meta.get('num_classes')
            class_names = list(meta.get('class_names') or [])
            cfg = dict(meta.get('pretrained_cfg') or {})
        else:
            if not model_name:
                raise UserError(f'{path} records no model (no "meta" entry: a released or weights-only '
                                f'file); give --model NAME, e.g. --model scalable_vit_small')
            name, kwargs, class_names, cfg = model_name, dict(model_kwargs or {}), [], {}
        if ema:
            if not isinstance(checkpoint.get('model_ema'), dict):
                raise UserError(f'--ema: {path} has no model_ema weights')
            checkpoint, weights_source = checkpoint['model_ema'], f'{path} (model_ema)'
        from . import unwrap_state_dict
        state_dict = unwrap_state_dict(checkpoint)
    return name, kwargs, num_classes, class_names, cfg, state_dict, weights_source


def load_classifier(
        path: str,
        model_name: Optional[str] = None,
        model_kwargs: Optional[Dict[str, Any]] = None,
        num_classes: Optional[int] = None,
        ema: bool = False,
) -> Tuple[nn.Module, List[str], Dict[str, Any]]:
    """A classifier with the weights of ``path`` (loaded strictly), its class names and its preprocessing.

    ``path``: a checkpoint of ``classification/main.py`` (its ``meta`` records the model, classes and
    preprocessing), a weights-only file such as the released ones (``model_name`` needed; ImageNet-1k classes and
    the model's timm preprocessing), or a timm folder. ``model_kwargs`` are merged over the recorded ones.
    """
    import timm

    import scalablevit  # noqa: F401  (registers the entry points)

    name, kwargs, num_classes, class_names, cfg, state_dict, weights_source = _read_classifier(
        path, model_name, model_kwargs, num_classes, ema)
    if num_classes is not None:
        kwargs['num_classes'] = num_classes
    try:
        model = timm.create_model(name, pretrained=False, **kwargs)
    except (RuntimeError, TypeError, ValueError, AssertionError) as e:
        raise UserError(f'cannot build model {name} with {kwargs}: {str(e).splitlines()[0]}') from e
    load_state_dict_strict(model, state_dict, weights_source, hint='check --model / --model-kwargs / --num-classes')
    model.eval()

    n = getattr(model, 'num_classes', None) or model.get_classifier().out_features
    if not class_names:
        class_names = timm.data.ImageNetInfo().label_descriptions() if n == 1000 else [str(i) for i in range(n)]
    if not cfg:
        cfg = dict(timm.data.resolve_data_config(model=model))
    cfg = {k: cfg[k] for k in PREPROCESS_KEYS if k in cfg}
    return model, class_names, cfg


def serving_meta(model: nn.Module, class_names: Sequence[str], preprocessing: Dict[str, Any],
                 features: Optional[Sequence[int]] = None) -> Dict[str, Any]:
    """The metadata stored with an export (plain JSON types): model, classes, preprocessing, what it outputs."""
    cfg = getattr(model, 'pretrained_cfg', {}) or {}
    meta = dict(format=META_FORMAT, version=1, model=cfg.get('architecture', type(model).__name__),
                class_names=[str(c) for c in class_names],
                preprocessing=json.loads(json.dumps({k: preprocessing[k] for k in PREPROCESS_KEYS
                                                     if k in preprocessing})))
    if features is not None:
        meta.update(kind='features', class_names=[], out_indices=[int(i) for i in features],
                    outputs=[f'stage{i}' for i in features])
    else:
        meta.update(kind='classifier', num_classes=len(class_names), outputs=['logits'])
    return meta


# ---------------------------------------------------------------------------------------------------------------------
# Checking

def fixed_inputs(input_size: Sequence[int], batches: Sequence[int] = CHECK_BATCHES, seed: int = 0) -> List[np.ndarray]:
    """The check's inputs: seeded normal images (what a normalised photo looks like to the model), one per batch."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, *input_size, generator=g).numpy() for b in batches]


def max_rel_err(got: Sequence[np.ndarray], want: Sequence[np.ndarray]) -> float:
    """Max absolute difference over the largest absolute reference value, over all outputs (float64)."""
    worst = 0.0
    for a, b in zip(got, want):
        a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
        if a.shape != b.shape:
            return float('inf')
        worst = max(worst, float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12)))
    return worst


@torch.no_grad()
def _eager_outputs(model: nn.Module, x: np.ndarray) -> List[np.ndarray]:
    out = model(torch.from_numpy(x))
    return [t.float().numpy() for t in (out if isinstance(out, (list, tuple)) else [out])]


def check_outputs(model: nn.Module, run: Callable[[np.ndarray], List[np.ndarray]], inputs: Sequence[np.ndarray],
                  what: str, tolerance: float = FP32_TOLERANCE) -> float:
    """Max relative error of ``run`` against the eager ``model`` on ``inputs``; :class:`ExportError` above
    ``tolerance`` or when the shapes differ."""
    worst = 0.0
    for x in inputs:
        want = _eager_outputs(model, x)
        try:
            got = run(x)
        except Exception as e:  # noqa: BLE001  (engine errors: one line, the export is not written)
            raise ExportError(f'{what}: running the exported model on a {tuple(x.shape)} input failed '
                              f'({type(e).__name__}: {_first_line(e)}); not written') from e
        if len(got) != len(want) or any(np.shape(a) != np.shape(b) for a, b in zip(got, want)):
            raise ExportError(f'{what}: output shapes {[np.shape(a) for a in got]} differ from eager '
                              f'{[np.shape(b) for b in want]} on a {tuple(x.shape)} input; not written')
        worst = max(worst, max_rel_err(got, want))
    if not worst <= tolerance:
        raise ExportError(f'{what}: outputs differ from eager by {worst:.2e} (max relative error, tolerance '
                          f'{tolerance:.0e}); not written')
    return worst


def _first_line(e: BaseException) -> str:
    return ((str(e).strip().splitlines() or [type(e).__name__])[0])[:300]


# ---------------------------------------------------------------------------------------------------------------------
# Writing

def _prepare(model: nn.Module) -> nn.Module:
    """Eval mode, no gradients, the plain attention (the export path: the fused SDPA call with its explicit scale
    and IWSA's mask exports too, but the engines fuse the plain products themselves)."""
    model.eval().requires_grad_(False)
    for m in model.modules():
        if hasattr(m, 'set_fused_attn'):
            m.set_fused_attn(False)
            break
    return model


def _copy_into(src: str, dst: str) -> None:
    """``atomic_write`` of the file ``src`` to ``dst``."""
    def write(f):
        with open(src, 'rb') as s:
            shutil.copyfileobj(s, f, 1 << 20)
    atomic_write(dst, write, need=os.path.getsize(src), advice='free some space and export again')


def _export_onnx(model: nn.Module, example: torch.Tensor, tmp: str, meta: Dict[str, Any]) -> str:
    require('onnx', 'ONNX export')
    require('onnxscript', 'ONNX export (torch.onnx.export with dynamo=True)')
    import onnx
    path = os.path.join(tmp, 'model.onnx')
    batch = torch.export.Dim('batch', min=1, max=4096)
    try:
        program = torch.onnx.export(model, (example,), dynamo=True, input_names=['images'],
                                    output_names=list(meta['outputs']), dynamic_shapes=({0: batch},),
                                    verbose=False)
        program.save(path)
    except Exception as e:  # noqa: BLE001  (exporter errors come in many types)
        raise ExportError(f'ONNX export failed: {type(e).__name__}: {_first_line(e)}') from e
    proto = onnx.load(path)
    entry = proto.metadata_props.add()
    entry.key, entry.value = META_KEY, json.dumps(meta)
    onnx.save(proto, path)
    return path


def _openvino_from_torch(model: nn.Module, example: torch.Tensor) -> Any:
    ov = require('openvino', 'OpenVINO export')
    try:
        with warnings.catch_warnings():  # convert_model traces: its TracerWarnings on the size branches are the
            warnings.simplefilter('ignore')  # fixed image size this export states (and checks at two batches)
            ov_model = ov.convert_model(model, example_input=example, input=[(-1, *example.shape[1:])])
    except Exception as e:  # noqa: BLE001
        raise ExportError(f'OpenVINO conversion failed: {type(e).__name__}: {_first_line(e)}') from e
    return ov_model


def _save_openvino(ov_model: Any, tmp: str, meta: Dict[str, Any]) -> str:
    ov = require('openvino', 'OpenVINO export')
    ov_model.set_rt_info(json.dumps(meta), [META_KEY])
    path = os.path.join(tmp, 'model.xml')
    ov.save_model(ov_model, path, compress_to_fp16=False)
    return path


def _export_pt2(model: nn.Module, example: torch.Tensor, tmp: str) -> str:
    path = os.path.join(tmp, 'model.pt2')
    batch = torch.export.Dim('batch', min=1, max=4096)
    try:
        program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
        torch._inductor.aoti_compile_and_package(program, package_path=path, inductor_configs={'freezing': True})
    except Exception as e:  # noqa: BLE001
        raise ExportError(f'torch.export / AOTInductor failed: {type(e).__name__}: {_first_line(e)}') from e
    return path


def _targets(out: str, fmt: str) -> Dict[str, str]:
    """Temporary file name -> final path, in the order they are moved (the file a reader opens first comes last)."""
    stem, _ = os.path.splitext(out)
    if fmt == 'onnx':
        return {'model.onnx': out}
    if fmt == 'openvino':
        return {'model.bin': stem + '.bin', 'model.xml': out}
    return {'model.pt2': out, 'model.json': stem + '.json'}


def _check_export_args(out: str, fmt: str, int8: bool):
    """``ExportError`` for a format, output name or int8 request :func:`export_model` cannot serve."""
    if fmt not in EXPORT_FORMATS:
        raise ExportError(f'--format {fmt}: choose one of {", ".join(EXPORT_FORMATS)}')
    if not out.endswith(FORMAT_SUFFIX[fmt]):
        raise ExportError(f'{out}: --format {fmt} writes NAME{FORMAT_SUFFIX[fmt]}')
    if int8 and fmt != 'openvino':
        raise ExportError('int8 quantization is done with NNCF on the OpenVINO model: use --format openvino')
    if os.path.isdir(out):
        raise ExportError(f'{out} is a folder; name the output file')


def _rewrite_meta(fmt: str, exported: Any, tmp: str, meta: Dict[str, Any]):
    """Store ``meta`` with the exported model in ``tmp``: in the ONNX file's metadata (``exported``: its path), the
    OpenVINO IR's runtime info (``exported``: the ``ov.Model``), or ``model.json`` beside the pt2 package."""
    if fmt == 'onnx':
        import onnx
        proto = onnx.load(exported)
        for entry in proto.metadata_props:
            if entry.key == META_KEY:
                entry.value = json.dumps(meta)
        onnx.save(proto, exported)
    elif fmt == 'openvino':
        _save_openvino(exported, tmp, meta)
    else:
        with open(os.path.join(tmp, 'model.json'), 'w') as f:
            json.dump(meta, f, indent=1)


def export_model(model: nn.Module, out: str, fmt: str, meta: Dict[str, Any], input_size: Sequence[int],
                 threads: Optional[int] = None, int8_calibration: Optional[Iterable[np.ndarray]] = None,
                 int8_subset: int = 300,
                 evaluate: Optional[Callable[['ExportedModel'], Dict[str, Any]]] = None) -> Dict[str, Any]:
    """Export ``model`` to ``out`` in ``fmt`` (``'onnx'``, ``'openvino'``, ``'pt2'``), check the file's outputs
    against eager on :func:`fixed_inputs` (``ExportError`` above 1e-4, nothing written), then write it atomically
    with ``meta`` (the check added as ``meta['check']``). Returns the metadata written.

    ``int8_calibration`` (OpenVINO only): float32 NCHW batches; the model is quantized to int8 with NNCF
    (:func:`quantize_openvino`) and the check reports the error against eager without refusing (int8 is judged by
    the accuracy it keeps: ``evaluate(runner)`` measures it, its result is stored as ``meta['accuracy']``, and an
    ``ExportError`` it raises stops the export). ``input_size``: (C, H, W), fixed in the graph.
    """
    _check_export_args(out, fmt, int8=int8_calibration is not None)
    model = _prepare(model)
    input_size = tuple(int(s) for s in input_size)
    example = torch.from_numpy(fixed_inputs(input_size, batches=(2,), seed=1)[0])
    meta = dict(meta, input=dict(name='images', shape=['batch', *input_size], dtype='float32', layout='NCHW',
                                 dynamic='batch only: the image size is fixed at export'),
                precision='int8' if int8_calibration is not None else 'fp32', torch=torch.__version__)
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix='.export-', dir=parent)
    try:
        inputs = fixed_inputs(input_size)
        if fmt == 'onnx':
            path = _export_onnx(model, example, tmp, meta)
            runner = ExportedModel(path, 'onnxruntime', threads=threads, meta=meta)
        elif fmt == 'openvino':
            ov_model = _openvino_from_torch(model, example)
            if int8_calibration is not None:
                ov_model = quantize_openvino(ov_model, int8_calibration, subset_size=int8_subset)
            path = os.path.join(tmp, 'model.xml')
            runner = ExportedModel(ov_model, 'openvino', threads=threads, meta=meta)
        else:
            path = _export_pt2(model, example, tmp)
            runner = ExportedModel(path, 'torch', threads=threads, meta=meta)
        engine = runner.engine
        tolerance = float('inf') if int8_calibration is not None else FP32_TOLERANCE
        err = check_outputs(model, runner, inputs, f'{fmt} export ({engine})', tolerance)
        meta['check'] = dict(engine=engine, inputs=[list(x.shape) for x in inputs], max_rel_err=float(err),
                             tolerance=None if tolerance == float('inf') else tolerance)
        if evaluate is not None:
            meta['accuracy'] = evaluate(runner)
        del runner
        # the check's result goes into the file too: rewrite the metadata, then move the files into place
        _rewrite_meta(fmt, path if fmt != 'openvino' else ov_model, tmp, meta)
        for name, final in _targets(out, fmt).items():
            _copy_into(os.path.join(tmp, name), final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return meta


# ---------------------------------------------------------------------------------------------------------------------
# int8

def quantize_openvino(ov_model: Any, calibration: Iterable[np.ndarray], subset_size: int = 300) -> Any:
    """NNCF post-training quantization (int8 weights and activations, the transformer preset: the matrix products
    and convolutions quantized, softmax / LayerNorm / GELU left in floating point, SmoothQuant on) of an OpenVINO
    model, calibrated on ``calibration`` (float32 NCHW batches; ``subset_size`` counts batches)."""
    nncf = require('nncf', 'int8 quantization')
    data = list(calibration)
    if not data:
        raise ExportError('int8 quantization needs calibration images; none were given')
    import logging
    logging.getLogger('nncf').setLevel(logging.ERROR)  # its "dataset smaller than subset" notes
    try:
        return nncf.quantize(ov_model, nncf.Dataset(data), subset_size=min(subset_size, len(data)),
                             model_type=nncf.ModelType.TRANSFORMER, preset=nncf.QuantizationPreset.MIXED)
    except Exception as e:  # noqa: BLE001
        raise ExportError(f'NNCF quantization failed: {type(e).__name__}: {_first_line(e)}') from e


# ---------------------------------------------------------------------------------------------------------------------
# Reading and running

def _meta_path(path: str) -> str:
    return os.path.splitext(path)[0] + '.json'


def _parse_meta(text: str, path: str) -> Dict[str, Any]:
    try:
        meta = json.loads(text)
    except ValueError as e:
        raise ExportError(f'{path}: its metadata is not JSON ({e})') from e
    if not isinstance(meta, dict) or meta.get('format') != META_FORMAT:
        raise ExportError(f'{path}: not an export of tools/export.py (its metadata is not {META_FORMAT})')
    return meta


def _engine_for(path: str) -> str:
    if path.endswith('.onnx'):
        return 'onnxruntime'
    if path.endswith('.xml'):
        return 'openvino'
    if path.endswith('.pt2'):
        return 'torch'
    raise ExportError(f'{path}: not an exported model (expected FILE.onnx, FILE.xml (OpenVINO IR) or FILE.pt2)')


def _check_ir_root(path: str) -> None:
    """``ExportError`` unless ``path`` opens as XML with a ``<net version=...>`` root, the IR's: other files would
    go on to every OpenVINO frontend in turn (their parse errors printed on stderr) before failing."""
    import xml.etree.ElementTree as ET
    try:
        _, root = next(ET.iterparse(path, events=('start',)))
    except (ET.ParseError, StopIteration, UnicodeDecodeError) as e:
        raise ExportError(f'{path}: not an OpenVINO IR (not XML: {_first_line(e)})') from e
    if root.tag != 'net' or 'version' not in root.attrib:
        raise ExportError(f'{path}: not an OpenVINO IR (its root element is <{root.tag}>, not <net version=...>)')


def read_meta(path: str) -> Dict[str, Any]:
    """The metadata of an export (``ExportError`` when ``path`` is missing or is not one)."""
    if not os.path.isfile(path):
        raise ExportError(f'exported model not found: {path}')
    engine = _engine_for(path)
    if engine == 'onnxruntime':
        onnx = require('onnx', 'reading an ONNX file')
        try:
            proto = onnx.load(path, load_external_data=False)
        except Exception as e:  # noqa: BLE001  (protobuf decode errors)
            raise ExportError(f'{path}: not an ONNX model ({type(e).__name__}: {_first_line(e)})') from e
        text = next((p.value for p in proto.metadata_props if p.key == META_KEY), None)
    elif engine == 'openvino':
        ov = require('openvino', 'reading an OpenVINO IR')
        _check_ir_root(path)
        try:
            ov_model = ov.Core().read_model(path)
        except Exception as e:  # noqa: BLE001
            raise ExportError(f'{path}: not an OpenVINO IR ({_first_line(e)})') from e
        text = ov_model.get_rt_info([META_KEY]).astype(str) if ov_model.has_rt_info([META_KEY]) else None
    else:
        meta_path = _meta_path(path)
        text = open(meta_path).read() if os.path.isfile(meta_path) else None
        if text is None:
            raise ExportError(f'{path}: its metadata {meta_path} is missing (tools/export.py writes it beside the '
                              f'package)')
    if text is None:
        raise ExportError(f'{path}: not an export of tools/export.py (no "{META_KEY}" metadata: preprocessing and '
                          f'class names unknown)')
    return _parse_meta(text, path)


class ExportedModel:
    """An exported file run by an engine, without the model's code: ``runner(x)`` takes a float32 NCHW array
    (numpy, or a CPU tensor) and returns the outputs as a list of numpy arrays.

    Args:
        path: ``.onnx`` (ONNX Runtime or OpenVINO), ``.xml`` (OpenVINO IR) or ``.pt2`` (AOTInductor package); or an
            ``openvino.Model`` in memory (with ``meta``).
        engine: ``'onnxruntime'``, ``'openvino'`` or ``'torch'``; default: the file's own.
        threads: intra-op threads (default: the engine's, all cores).
        precision: ``'fp32'`` (default) or ``'bf16'`` (OpenVINO's inference precision; on CPUs with AMX or
            AVX512-BF16 OpenVINO otherwise picks bf16 by itself, so fp32 is asked for explicitly).
        meta: the metadata, if already known (else read from the file).
        profile: OpenVINO only: per-node counters (``PERF_COUNT``), read with :meth:`profiling_info` after a call.
    """

    def __init__(self, path: Any, engine: Optional[str] = None, threads: Optional[int] = None,
                 precision: str = 'fp32', meta: Optional[Dict[str, Any]] = None, profile: bool = False):
        if not isinstance(path, str):  # an openvino.Model in memory (the export's check, before it is saved)
            path, own = path, 'openvino'
        elif not os.path.isfile(path):
            raise ExportError(f'exported model not found: {path}')
        else:
            own = _engine_for(path)
        engine = engine or own
        if engine not in ENGINES:
            raise ExportError(f'engine {engine}: choose one of {", ".join(ENGINES)}')
        compatible = {'onnxruntime': ('onnxruntime', 'openvino'), 'openvino': ('openvino',), 'torch': ('torch',)}
        if engine not in compatible[own]:
            raise ExportError(f'{path} is a {dict(onnxruntime="ONNX", openvino="OpenVINO IR", torch="pt2")[own]} '
                              f'file, which {engine} does not run; use --backend {own} or export with '
                              f'--format {dict(onnxruntime="onnx", openvino="openvino", torch="pt2")[engine]}')
        if precision not in ('fp32', 'bf16'):
            raise ExportError(f'precision {precision}: fp32 or bf16')
        self.path, self.engine, self.precision = path, engine, precision
        if engine != 'torch':  # a missing engine is named as the flag that asked for it, before the file is read
            require(engine, f'--backend {engine}')
        self.meta = meta if meta is not None else read_meta(path)
        if engine == 'onnxruntime':
            if precision != 'fp32':
                raise ExportError('ONNX Runtime runs this model in fp32 only on CPU (no bf16 kernels for its ops)')
            self._run = self._onnxruntime(path, threads)
        elif engine == 'openvino':
            self._run = self._openvino(path, threads, precision, profile)
        else:
            if precision != 'fp32':
                raise ExportError('a .pt2 package runs in the precision it was compiled in (fp32)')
            self._run = self._torch(path, threads)

    def profiling_info(self) -> List[Any]:
        """OpenVINO's per-node counters of the last call (``profile=True``): node_type, exec_type, real_time."""
        return list(self._run.request.profiling_info)

    def __call__(self, x) -> List[np.ndarray]:
        if isinstance(x, torch.Tensor):
            x = x.detach().cpu().float().numpy()
        want = tuple(self.meta.get('input', {}).get('shape', [None])[1:])
        if want and tuple(x.shape[1:]) != want:  # OpenVINO would run another size through the fixed graph
            raise ExportError(f'input of shape {tuple(x.shape)}: this export takes (batch, '
                              f'{", ".join(map(str, want))}) (the image size is fixed at export)')
        return self._run(np.ascontiguousarray(x, dtype=np.float32))

    @staticmethod
    def _onnxruntime(path: str, threads: Optional[int]):
        ort = require('onnxruntime', '--backend onnxruntime')
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        try:
            session = ort.InferenceSession(path, sess_options=opts, providers=['CPUExecutionProvider'])
        except Exception as e:  # noqa: BLE001
            raise ExportError(f'{path}: ONNX Runtime cannot load it ({_first_line(e)})') from e
        name = session.get_inputs()[0].name
        return lambda x: session.run(None, {name: x})

    @staticmethod
    def _openvino(path: Any, threads: Optional[int], precision: str, profile: bool = False):
        ov = require('openvino', '--backend openvino')
        config = {'INFERENCE_PRECISION_HINT': 'f32' if precision == 'fp32' else 'bf16',
                  'PERFORMANCE_HINT': 'LATENCY', 'PERF_COUNT': bool(profile)}
        if threads:
            config['INFERENCE_NUM_THREADS'] = threads
        try:
            compiled = ov.Core().compile_model(path, 'CPU', config)
        except Exception as e:  # noqa: BLE001
            raise ExportError(f'{path if isinstance(path, str) else "the model"}: OpenVINO cannot compile it '
                              f'({_first_line(e)})') from e
        request = compiled.create_infer_request()
        outputs = compiled.outputs

        def run(x):
            request.infer({0: x})
            return [np.array(request.get_tensor(o).data) for o in outputs]
        run.request = request
        return run

    @staticmethod
    def _torch(path: str, threads: Optional[int]):
        if threads:
            torch.set_num_threads(threads)
        try:
            runner = torch._inductor.aoti_load_package(path)
        except Exception as e:  # noqa: BLE001
            raise ExportError(f'{path}: not an AOTInductor package torch can load ({_first_line(e)})') from e

        def run(x):
            with torch.no_grad():
                out = runner(torch.from_numpy(x))
            return [t.numpy() for t in (out if isinstance(out, (list, tuple)) else [out])]
        return run


def load_exported(path: str, engine: Optional[str] = None, threads: Optional[int] = None,
                  precision: str = 'fp32') -> ExportedModel:
    """:class:`ExportedModel` of ``path``."""
    return ExportedModel(path, engine, threads=threads, precision=precision)
