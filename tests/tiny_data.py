"""The repository's own data makers for the tests: ``make_tiny_coco`` (detection/tools/make_tiny_coco.py) and
``make_tiny_ade`` (segmentation/tools/make_tiny_ade.py), loaded by file path (the tools folders are not packages,
and both are named ``tools``)."""
import importlib.util
from pathlib import Path

_REPO = Path(__file__).resolve().parent.parent


def _tool(path: str, name: str):
    spec = importlib.util.spec_from_file_location(f'_tiny_data_{name}', _REPO / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, name)


make_tiny_coco = _tool('detection/tools/make_tiny_coco.py', 'make_tiny_coco')
make_tiny_ade = _tool('segmentation/tools/make_tiny_ade.py', 'make_tiny_ade')
