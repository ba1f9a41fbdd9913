"""Old name of :mod:`scalablevit.mm.compat`, kept because configs and the checkpoints written with them record
``custom_imports = dict(imports=['scalablevit.mm', 'scalablevit.mm_compat'])``; importing it imports
:mod:`scalablevit.mm`."""
from .mm.checkpoint import MMENGINE_SAFE_GLOBALS  # noqa: F401
from .mm.compat import *  # noqa: F401,F403
from .mm.compat import SyncBatchNormCPU  # noqa: F401
