"""ScalableViT for OpenMMLab (mmengine 0.10, mmdet 3.x, mmseg 1.x): what the configs' single entry point
``custom_imports = dict(imports=['scalablevit.mm'], allow_failed_imports=False)`` brings in.

Importing it registers, in mmengine's root registries (which mmdet's and mmseg's search through their parent):
the backbone ``ScalableViTBackbone``, the ``PreemptionHook`` and the resumable train loops, and ``SyncBNCPU``; and it
applies the compatibility patches of :mod:`scalablevit.mm.compat` (``torchrun`` on CPU, atomic checkpoint files), none
of which changes what a CUDA run computes; and makes :mod:`scalablevit.mm.checkpoint` mmengine's loader of local
checkpoint files (read as data: ``weights_only=True`` with mmengine's few classes allowed for each load only, the
config text they record never run). ``import scalablevit`` imports none of this.

One module per concern: ``backbone``, ``checkpoint`` (reading mmengine checkpoints), ``compat``, ``config``
(reading a config for this machine, building its model and runner), ``tasks`` (what detection and segmentation do
differently), ``data`` (own-data flags and checks), ``resume`` (preemption, mid-epoch resume), ``runner`` (train /
test commands), ``predict``, ``flops``, ``pipelines`` (what several configs build from a scale).
"""
import warnings

# mmengine and mmcv import pkg_resources, which setuptools deprecates with a warning on each import (three lines
# before every command's output); install.sh pins the setuptools that still has it.
warnings.filterwarnings('ignore', message='pkg_resources is deprecated as an API', category=UserWarning)
try:
    import mmengine  # noqa: F401,E402
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError('scalablevit.mm needs the OpenMMLab stack (mmengine, mmcv with compiled ops, mmdet/mmseg); '
                      'install it with `bash install.sh` from the repository root') from e

from . import checkpoint, compat  # noqa: E402,F401  (the checkpoint loader; the patches, SyncBNCPU)
from .backbone import ScalableViTBackbone, load_pretrained  # noqa: E402
from .resume import PreemptionHook, ResumableEpochBasedTrainLoop, ResumableIterBasedTrainLoop  # noqa: E402

__all__ = ['PreemptionHook', 'ResumableEpochBasedTrainLoop', 'ResumableIterBasedTrainLoop', 'ScalableViTBackbone',
           'load_pretrained']
