"""Reading mmengine checkpoints as data: what their pickles need beyond tensors, allowed for each load only.

mmengine 0.10 checkpoints hold a few non-tensor objects: the message hub's :class:`HistoryBuffer` (with numpy
arrays, dtypes and scalars inside), and ``HistoryBuffer.__getstate__`` pickles its four statistics methods, which
pickle (protocol 2) writes as ``getattr(HistoryBuffer, 'min')`` and so on. ``torch.load(weights_only=True)``
refuses all of them. Allowing ``builtins.getattr`` itself would hand a crafted file the whole interpreter
(``getattr(getattr, '__self__')`` is the builtins module), so the pickled name ``builtins.getattr`` is served by
:func:`history_buffer_method`, which returns those four methods and refuses anything else.

:func:`load_mm_checkpoint` reads a file with exactly these allowed, for that load (``scalablevit.checkpoint.
allowed_globals``); nothing is added to torch's allow-list for the process. Importing this module registers it as
mmengine's loader of local files (``CheckpointLoader.register_scheme``), so every mmengine load (``load_from``,
resume, ``init_cfg=dict(type='Pretrained')``, the inferencers) goes through it, and it leaves out the config text
a checkpoint records (``meta['cfg']``, ``meta['config']``, the message hub's ``runtime_info['cfg']``): mmengine
runs such text as Python (``Runner.resume`` runs ``meta['config']``; an inferencer built without a config runs
``cfg``). A checkpoint is data; configs come from the command line. ``scalablevit.checkpoint.recorded_config``
reads the recorded text without running it, for the tools that want it.
"""
import os
import pickle
from typing import Any, Dict, List, Union

import numpy as np
from mmengine.logging.history_buffer import HistoryBuffer
from mmengine.runner.checkpoint import CheckpointLoader

from ..checkpoint import load_checkpoint

__all__ = ['MMENGINE_SAFE_GLOBALS', 'RECORDED_CONFIG_TEXT', 'history_buffer_method', 'load_mm_checkpoint']

#: The methods ``HistoryBuffer.__getstate__`` pickles (``HistoryBuffer._set_default_statistics``).
HISTORY_BUFFER_METHODS = ('min', 'max', 'current', 'mean')

#: Where a checkpoint records config text that mmengine would run: left out of what mmengine's loader returns.
RECORDED_CONFIG_TEXT = (('meta', 'cfg'), ('meta', 'config'), ('message_hub', 'runtime_info', 'cfg'))


def history_buffer_method(owner: Any, name: str):
    """``getattr`` as mmengine's pickles use it, and no further: ``HistoryBuffer``'s statistics methods."""
    if owner is HistoryBuffer and name in HISTORY_BUFFER_METHODS:
        return getattr(HistoryBuffer, name)
    raise pickle.UnpicklingError(f'it calls getattr({type(owner).__name__}, {name!r}); only '
                                 f'getattr(HistoryBuffer, {"|".join(HISTORY_BUFFER_METHODS)}) is allowed')


def _safe_globals() -> List[Any]:
    core = getattr(np, '_core', None) or np.core
    dtypes = [type(np.dtype(t)) for t in ('bool', 'int8', 'int16', 'int32', 'int64', 'uint8', 'float16', 'float32',
                                          'float64')]
    return [HistoryBuffer, (history_buffer_method, 'builtins.getattr'), np.ndarray, np.dtype, *dtypes,
            core.multiarray.scalar, core.multiarray._reconstruct]


#: What mmengine checkpoints need beyond tensors under ``weights_only=True``; pass it to
#: ``scalablevit.checkpoint.load_checkpoint(path, safe_globals=...)`` (never to ``add_safe_globals``).
MMENGINE_SAFE_GLOBALS = _safe_globals()


def load_mm_checkpoint(path: Union[str, os.PathLike], mmap: bool = False) -> Dict[str, Any]:
    """An mmengine checkpoint (or any checkpoint) read with ``weights_only=True`` and :data:`MMENGINE_SAFE_GLOBALS`
    allowed for this load; errors are :class:`scalablevit.checkpoint.CheckpointError` (one line naming the file)."""
    return load_checkpoint(path, safe_globals=MMENGINE_SAFE_GLOBALS, mmap=mmap)


def without_config_text(checkpoint: Dict[str, Any]) -> Dict[str, Any]:
    """``checkpoint`` with the :data:`RECORDED_CONFIG_TEXT` entries removed (in place; returned for chaining)."""
    for *parents, key in RECORDED_CONFIG_TEXT:
        node = checkpoint
        for p in parents:
            node = node.get(p) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(key, None)
    return checkpoint


@CheckpointLoader.register_scheme(prefixes='', force=True)
def _load_local(filename: str, map_location=None) -> Dict[str, Any]:
    """mmengine's loader of local files (it replaces ``mmengine.runner.checkpoint.load_from_local``): the file
    read as data, tensors on the CPU (mmengine moves the weights to the model's device when it loads them)."""
    return without_config_text(load_mm_checkpoint(os.path.expanduser(filename)))
