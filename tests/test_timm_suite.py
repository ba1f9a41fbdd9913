"""timm's own model tests on the ScalableViT models, run the way a timm contributor runs them.

The ``tests/`` folder of the *installed* timm version comes from its source distribution, fetched once with
``pip download --no-deps --no-binary :all: timm==<version>`` into ``${SCALABLEVIT_CACHE:-~/.cache/scalablevit}/
timm-tests/<version>``. A copy of it gets our model module added to ``FEAT_INTER_FILTERS`` (the models with
``forward_intermediates`` and the feature-getter wrapper) and ``import scalablevit`` in its ``conftest.py``; then
``pytest test_models.py -k scalable_vit`` runs in a subprocess: forward, backward, default cfgs (meta device,
``device``/``dtype`` kwargs, classifier reset), features, ``forward_intermediates``, TorchScript, torch.fx and
fx + TorchScript, for S, B and L (30 tests with timm 1.0.31). The one selected test that timm's own CI skips, the
slow ``test_prune_intermediate_layers_contract``, runs with ``SCALABLEVIT_TIMM_SUITE_ALL=1`` (33 tests).

The same by hand::

    python tests/test_timm_suite.py            # fetch (or reuse) and run, printing pytest's output
    SCALABLEVIT_TIMM_SUITE_ALL=1 python tests/test_timm_suite.py -x   # every selected test; more pytest args
"""
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import List

import pytest
import timm

import scalablevit

REPO = Path(__file__).resolve().parents[1]
MODELS = ('scalable_vit_small', 'scalable_vit_base', 'scalable_vit_large')
# Every one of these must run and pass for every model (timm 1.0.x names); the suite may select more.
REQUIRED = (
    'test_model_forward', 'test_model_backward', 'test_model_default_cfgs', 'test_model_forward_features',
    'test_model_forward_intermediates_features', 'test_model_forward_intermediates', 'test_model_forward_torchscript',
    'test_model_forward_fx', 'test_model_backward_fx', 'test_model_forward_fx_torchscript',
)


def cache_dir(version: str = timm.__version__) -> Path:
    root = Path(os.environ.get('SCALABLEVIT_CACHE', Path.home() / '.cache' / 'scalablevit')).expanduser()
    return root / 'timm-tests' / version


def fetch_timm_tests(version: str = timm.__version__) -> Path:
    """The ``tests/`` folder of timm ``version``'s sdist, from the cache or fetched with pip into it."""
    dest = cache_dir(version)
    if (dest / 'test_models.py').is_file():
        return dest
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, '-m', 'pip', 'download', '--no-deps', '--no-binary', ':all:', f'timm=={version}',
               '-d', tmp, '--disable-pip-version-check', '--quiet']
        proc = subprocess.run(cmd, capture_output=True, text=True)
        archives = sorted(Path(tmp).glob(f'timm-{version}.tar.gz'))
        if proc.returncode != 0 or not archives:
            why = (proc.stderr.strip().splitlines() or ['no archive written'])[-1]
            raise RuntimeError(f'`pip download timm=={version}` (sources) failed: {why} -- the timm suite fetches '
                               f"timm's test files from the package registry once (check the network or "
                               f'PIP_INDEX_URL), then runs from {dest}')
        prefix = f'timm-{version}/tests/'
        with tarfile.open(archives[0]) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(prefix) and (m.isfile() or m.isdir())]
            if not any(m.name == prefix + 'test_models.py' for m in members):
                raise RuntimeError(f'the sdist of timm {version} has no tests/test_models.py')
            kwargs = dict(filter='data') if hasattr(tarfile, 'data_filter') else {}  # Python >= 3.11.4
            tar.extractall(tmp, members=members, **kwargs)
        dest.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f'.{version}-'))
        shutil.copytree(Path(tmp) / prefix, staging, dirs_exist_ok=True)
        try:
            staging.replace(dest)  # atomic: a concurrent run sees the whole folder or none
        except OSError:
            shutil.rmtree(staging, ignore_errors=True)
            if not (dest / 'test_models.py').is_file():
                raise
    return dest


def prepare_suite(tests: Path, workdir: Path) -> Path:
    """A copy of timm's tests with our module in ``FEAT_INTER_FILTERS`` and ``import scalablevit`` in conftest."""
    shutil.copytree(tests, workdir, dirs_exist_ok=True)
    # timm keys models by the last component of the defining module (``scalablevit.model`` -> ``model``)
    modules = sorted({m for m in timm.list_modules() if set(MODELS) & set(timm.list_models(module=m))})
    source = (workdir / 'test_models.py').read_text()
    patched, n = re.subn(r'^FEAT_INTER_FILTERS = \[', lambda m: m.group(0) + ''.join(f'\n    {x!r},' for x in modules),
                         source, count=1, flags=re.M)
    if n != 1:
        raise RuntimeError(f'timm {timm.__version__} test_models.py has no FEAT_INTER_FILTERS list to extend')
    (workdir / 'test_models.py').write_text(patched)
    conftest = workdir / 'conftest.py'
    text = conftest.read_text() if conftest.is_file() else ''
    conftest.write_text(text + '\nimport scalablevit  # noqa: E402,F401  (registers the ScalableViT models)\n')
    return workdir


def selection(everything: bool = None) -> str:
    """``-k`` expression: every ``scalable_vit`` test but the one timm's own CI leaves out, or all of them.

    ``test_prune_intermediate_layers_contract`` has no marker in timm, so timm's CI (one job per marker) never runs
    it ("slow, excluded from CI for now"); it costs as much as all the others together. ``SCALABLEVIT_TIMM_SUITE_ALL=1``
    adds it (it passes).
    """
    if everything is None:
        everything = os.environ.get('SCALABLEVIT_TIMM_SUITE_ALL', '') not in ('', '0')
    return 'scalable_vit' if everything else 'scalable_vit and not test_prune_intermediate_layers_contract'


def run_suite(workdir: Path, extra_args: List[str] = ()) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(Path(scalablevit.__file__).resolve().parents[1])] + os.environ.get('PYTHONPATH', '').split(os.pathsep)))
    env.pop('PYTEST_ADDOPTS', None)
    cmd = [sys.executable, '-m', 'pytest', 'test_models.py', '-k', selection(), '-rA', '-q', '-p',
           'no:cacheprovider', '-W', 'ignore::pytest.PytestUnknownMarkWarning', *extra_args]
    return subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=3600)


def _outcomes(stdout: str):
    """{test id: outcome} from pytest's ``-rA`` short summary."""
    found = {}
    for line in stdout.splitlines():
        m = re.match(r'^(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\s+(?:\[\d+\]\s+)?(\S+)', line)
        if m:
            found[m.group(2).split('::')[-1]] = m.group(1)
    return found


@pytest.mark.slow
def test_timm_model_suite(tmp_path):
    try:
        tests = fetch_timm_tests()
    except RuntimeError as e:
        pytest.fail(str(e), pytrace=False)
    proc = run_suite(prepare_suite(tests, tmp_path / 'timm-tests'))
    outcomes = _outcomes(proc.stdout)
    bad = sorted(f'{test} {outcome}' for test, outcome in outcomes.items() if outcome != 'PASSED')
    missing = sorted(f'{name}[{model}]' for name in REQUIRED for model in MODELS
                     if not any(re.fullmatch(rf'{name}\[.*-{model}(\.\w+)?\]', t) for t in outcomes))
    tail = '\n'.join(proc.stdout.strip().splitlines()[-15:] + proc.stderr.strip().splitlines()[-5:])
    assert proc.returncode == 0 and not bad and not missing, (
        f'timm {timm.__version__} test_models.py -k {selection()!r} (exit {proc.returncode}): '
        f'{len(bad)} not passed: {bad}; required but not run: {missing}\n{tail}')


if __name__ == '__main__':
    workdir = Path(tempfile.mkdtemp(prefix='timm-tests-'))
    proc = run_suite(prepare_suite(fetch_timm_tests(), workdir), sys.argv[1:])
    print(proc.stdout + proc.stderr)
    sys.exit(proc.returncode)
