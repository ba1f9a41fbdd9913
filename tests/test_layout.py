"""The package's shape: imports that run one way, nothing of OpenMMLab in ``import scalablevit``, no exits in library
code, the old module names that configs and checkpoints record, and the torch.hub entry points."""
import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / 'scalablevit'
MODULES = sorted('.'.join(p.relative_to(REPO).with_suffix('').parts).replace('.__init__', '')
                 for p in PACKAGE.rglob('*.py'))


def _imports_of(path: Path, module: str):
    """The scalablevit modules that the file of ``module`` imports (absolute and relative imports)."""
    package = module if path.name == '__init__.py' else module.rsplit('.', 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith('scalablevit')}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split('.')[:len(package.split('.')) - node.level + 1]
                target = '.'.join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ''
            if not target.startswith('scalablevit'):
                continue
            found.add(target)
            found |= {f'{target}.{a.name}' for a in node.names if f'{target}.{a.name}' in MODULES}
    return {m for m in found if m in MODULES and m != module}


def test_imports_run_one_way():
    """No cycle among the package's modules: a depth-first walk of the import graph never meets a module on its
    own path. (A package's ``__init__`` importing its submodules is the way in, not a cycle, so the edges from a
    submodule to its own package are left out.)"""
    graph = {}
    for m in MODULES:
        path = PACKAGE.joinpath(*m.split('.')[1:])
        path = path / '__init__.py' if path.is_dir() else path.with_suffix('.py')
        graph[m] = {t for t in _imports_of(path, m) if not m.startswith(t + '.')}
    assert graph['scalablevit.mm.runner'] >= {'scalablevit.mm.config', 'scalablevit.mm.data', 'scalablevit.mm.tasks'}

    state = {}

    def visit(m, path):
        state[m] = 'open'
        for t in sorted(graph[m]):
            assert state.get(t) != 'open', f'import cycle: {" -> ".join(path + [m, t])}'
            if t not in state:
                visit(t, path + [m])
        state[m] = 'done'

    for m in MODULES:
        if m not in state:
            visit(m, [])


def test_every_module_imports_alone_and_scalablevit_imports_no_openmmlab():
    """Each module of the package imports in a process that has imported nothing of the package before (a child
    forked from an interpreter holding only the third-party libraries, so each import costs milliseconds)."""
    code = ('import importlib, os, sys\n'
            'import scalablevit, timm\n'
            'timm.create_model("scalable_vit_small")\n'
            'print(sorted(m for m in sys.modules if m.split(".")[0] in ("mmengine", "mmcv", "mmdet", "mmseg")))\n')
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0 and out.stdout.strip() == '[]', out.stdout + out.stderr[-2000:]
    code = ('import importlib, os, sys, traceback\n'
            'import torch, timm, numpy, mmengine.runner, mmdet.registry, mmseg.registry  # third-party only\n'
            'assert not [m for m in sys.modules if m.startswith("scalablevit")]\n'
            'failed = []\n'
            'for name in sys.argv[1:]:\n'
            '    pid = os.fork()\n'
            '    if pid == 0:\n'
            '        try:\n'
            '            importlib.import_module(name)\n'
            '        except BaseException:\n'
            '            traceback.print_exc()\n'
            '            os._exit(1)\n'
            '        os._exit(0)\n'
            '    if os.waitpid(pid, 0)[1]:\n'
            '        failed.append(name)\n'
            'print("failed:", failed)\n')
    out = subprocess.run([sys.executable, '-c', code, *MODULES], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0 and out.stdout.strip() == 'failed: []', out.stdout + out.stderr[-3000:]


def test_library_code_neither_exits_nor_raises_exits():
    """Only a script's entry point turns errors into an exit status (scalablevit.errors.run_main)."""
    # A DataLoader worker told to stop by its main process ends at once, as torch's own handler ends it.
    worker_exit = ('signals.py', '_take_worker_signals')
    for path in PACKAGE.rglob('*.py'):
        tree = ast.parse(path.read_text())
        for fn in ast.walk(tree):
            if isinstance(fn, ast.FunctionDef) and (path.name, fn.name) == worker_exit:
                fn.body = []  # not inspected
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr == '_exit':
                pytest.fail(f'{path}:{node.lineno}: os._exit')
            if isinstance(node, ast.ClassDef):
                bases = {getattr(b, 'id', getattr(b, 'attr', None)) for b in node.bases}
                assert not bases & {'SystemExit', 'BaseException'}, f'{path}:{node.lineno}: {node.name}'
            if isinstance(node, ast.Raise) and node.exc is not None:
                exc = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
                assert getattr(exc, 'id', None) != 'SystemExit', f'{path}:{node.lineno}: raise SystemExit'


def test_user_errors_are_exceptions_ended_in_one_line_by_run_main(capsys, monkeypatch):
    from scalablevit.checkpoint import CheckpointError
    from scalablevit.errors import EXIT_ERROR, EXIT_STOPPED, StoppedToResume, UserError, run_main

    assert issubclass(CheckpointError, UserError) and not issubclass(UserError, SystemExit)
    monkeypatch.delenv('TORCHELASTIC_ERROR_FILE', raising=False)

    def fail(exc):
        raise exc

    assert run_main(fail, UserError('bad --flag')) == EXIT_ERROR
    assert capsys.readouterr().err == 'error: bad --flag\n'
    assert run_main(fail, StoppedToResume('stopped by SIGTERM')) == EXIT_STOPPED
    assert capsys.readouterr().err == 'stopped by SIGTERM\n'
    with pytest.raises(KeyError):  # a bug keeps its traceback
        run_main(fail, KeyError('x'))
    assert run_main(lambda: None) == 0


def test_under_torchrun_the_line_goes_to_the_error_file(tmp_path, capsys, monkeypatch):
    import json

    from scalablevit.errors import EXIT_REPORTED, UserError, run_main
    error_file = tmp_path / 'error.json'
    monkeypatch.setenv('TORCHELASTIC_ERROR_FILE', str(error_file))
    monkeypatch.setenv('RANK', '1')
    assert run_main(lambda: (_ for _ in ()).throw(UserError('no data'))) == EXIT_REPORTED
    assert json.loads(error_file.read_text())['message'] == 'error: no data'
    assert capsys.readouterr().err == ''  # rank 1 prints nothing; the launcher (or rank 0) does
    monkeypatch.setenv('RANK', '0')
    run_main(lambda: (_ for _ in ()).throw(UserError('no data')))
    assert capsys.readouterr().err == 'error: no data\n'
    monkeypatch.setenv('SCALABLEVIT_LAUNCHER_REPORTS', '1')  # tools/torchrun.py prints it
    run_main(lambda: (_ for _ in ()).throw(UserError('no data')))
    assert capsys.readouterr().err == ''


def test_old_module_names_recorded_in_configs_still_load(tmp_path):
    """Configs (and the checkpoints that record them in meta.cfg) written before scalablevit.mm was a package name
    scalablevit.mm_compat in custom_imports; they still build."""
    from mmengine.config import Config
    from mmengine.utils import import_modules_from_strings

    cfg = tmp_path / 'old.py'
    cfg.write_text("_base_ = '" + str(REPO / 'detection/configs/tiny/retinanet_scalablevit-tiny_fpn_tiny-coco.py')
                   + "'\ncustom_imports = dict(imports=['scalablevit.mm', 'scalablevit.mm_compat'], "
                   "allow_failed_imports=False)\n")
    cfg = Config.fromfile(str(cfg))
    import_modules_from_strings(**cfg.custom_imports)
    import scalablevit.mm.checkpoint as new_checkpoint
    import scalablevit.mm.compat as new
    import scalablevit.mm_compat as old
    from scalablevit.mm.config import build_model
    from scalablevit.mm.tasks import DETECTION
    assert old.SyncBatchNormCPU is new.SyncBatchNormCPU
    assert old.MMENGINE_SAFE_GLOBALS is new_checkpoint.MMENGINE_SAFE_GLOBALS
    assert type(build_model(cfg, DETECTION).backbone).__name__ == 'ScalableViTBackbone'


def test_torch_hub_loads_the_entry_points(tmp_path):
    """``torch.hub.load(repo_dir, name, source='local')`` from another folder, with timm's arguments."""
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        models = {name: torch.hub.load(str(REPO), name, source='local', num_classes=7, depths=(1, 1, 1, 1))
                  for name in ('scalable_vit_small', 'scalable_vit_base', 'scalable_vit_large')}
    finally:
        os.chdir(cwd)
    for name, model in models.items():
        assert type(model).__name__ == 'ScalableViT' and model.num_classes == 7 and model.depths == (1, 1, 1, 1)
        assert model.pretrained_cfg['architecture'] == name
    assert models['scalable_vit_base'].embed_dims == (96, 192, 384, 768)
    assert models['scalable_vit_small'](torch.randn(1, 3, 64, 64)).shape == (1, 7)
