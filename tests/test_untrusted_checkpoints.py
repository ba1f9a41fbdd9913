"""A checkpoint is data: crafted files against every entry point that reads one.

Two kinds of crafted file. The *getattr walk*: a pickle that calls ``getattr(getattr, '__self__')`` (the builtins
module) and writes into its ``__dict__``, which runs code as soon as ``builtins.getattr`` is on torch's allow-list.
*Config code*: a real tiny RetinaNet checkpoint whose recorded config text (``meta['cfg']``, ``meta['config']``)
has Python in it that writes a marker file, which runs as soon as anything executes that text (mmengine's
``Config.fromstring`` in ``Runner.resume``, a converter rebuilding the model from it). Every refusal is one line
naming the file; real checkpoints with code in their config text still load, resume and test, and the code never
runs.
"""
import builtins
import os
import pickle
import struct
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import pytest
import torch

import scalablevit.mm  # noqa: F401  (what every det/seg command imports: it must not widen torch's allow-list)
from scalablevit.checkpoint import (
    CheckpointError,
    allowed_globals,
    atomic_copy,
    load_checkpoint,
    recorded_config,
    remove_orphaned_tmp_files,
)
from scalablevit.mm.checkpoint import history_buffer_method, load_mm_checkpoint

from tiny_data import make_tiny_ade, make_tiny_coco

REPO = Path(__file__).resolve().parents[1]
DET = REPO / 'detection'
SEG = REPO / 'segmentation'
TINY_RETINA = DET / 'configs' / 'tiny' / 'retinanet_scalablevit-tiny_fpn_tiny-coco.py'
TINY_FPN = SEG / 'configs' / 'tiny' / 'scalablevit-tiny_fpn_1xb2-40_tiny-ade-64x64.py'
PWNED = '_scalablevit_pwned'  # what the getattr walk sets in builtins if it runs


def _unicode(text: str) -> bytes:
    return pickle.BINUNICODE + struct.pack('<I', len(text)) + text.encode()


def getattr_walk_pickle() -> bytes:
    """Protocol 2: ``d = getattr(getattr(getattr, '__self__'), '__dict__'); d[PWNED] = True``; returns ``{}``. No POP:
    torch's unpickler lacks it."""
    getattr_ = pickle.GLOBAL + b'builtins\ngetattr\n'
    return b''.join([
        pickle.PROTO, b'\x02',
        getattr_, getattr_, _unicode('__self__'), pickle.TUPLE2, pickle.REDUCE,  # the builtins module
        pickle.BINPUT, b'\x00',  # kept in the memo (and on the stack)
        getattr_, pickle.BINGET, b'\x00', _unicode('__dict__'), pickle.TUPLE2, pickle.REDUCE,  # its __dict__
        _unicode(PWNED), pickle.NEWTRUE, pickle.SETITEM,
        pickle.EMPTY_DICT, pickle.STOP])


def write_torch_zip(path: Path, data_pkl: bytes) -> Path:
    """``data_pkl`` in the zip layout of ``torch.save`` (what ``torch.load`` opens)."""
    with zipfile.ZipFile(path, 'w') as z:
        z.writestr('archive/data.pkl', data_pkl)
        z.writestr('archive/byteorder', 'little')
        z.writestr('archive/version', '3\n')
    return path


@pytest.fixture(scope='module')
def walk(tmp_path_factory) -> Path:
    return write_torch_zip(tmp_path_factory.mktemp('crafted') / 'walk.pth', getattr_walk_pickle())


@pytest.fixture(autouse=True)
def _never_pwned():
    yield
    assert not hasattr(builtins, PWNED), 'the crafted pickle ran'


def test_the_crafted_pickle_runs_code_when_getattr_is_allowed(walk):
    """The control: the walk is real. Plain pickle runs it; so does torch with ``getattr`` allowed (what importing
    ``scalablevit.mm`` used to do for the whole process)."""
    pickle.loads(getattr_walk_pickle())
    assert getattr(builtins, PWNED) is True
    delattr(builtins, PWNED)
    with torch.serialization.safe_globals([getattr]):
        torch.load(walk, weights_only=True)
    assert getattr(builtins, PWNED) is True
    delattr(builtins, PWNED)


def _allowed():
    return set(torch.serialization.get_safe_globals())


def _name(g) -> str:
    return f'{getattr(g, "__module__", "")}.{getattr(g, "__qualname__", repr(g))}'


@pytest.fixture(scope='module')
def torchs_own():
    """The names torch allows by itself after ``import torch`` (builtin exceptions, traceback's summaries, ...)."""
    code = ('import torch\nfor g in torch.serialization.get_safe_globals():\n'
            '    print(f\'{getattr(g, "__module__", "")}.{getattr(g, "__qualname__", repr(g))}\')')
    return set(subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True)
               .stdout.split())


def not_torchs(torchs_own):
    """Allowed globals that neither torch nor its lazily imported modules (``torch.distributed.tensor``) add."""
    return sorted(_name(g) for g in _allowed() if _name(g) not in torchs_own and not _name(g).startswith('torch.'))


def test_nothing_is_added_to_torchs_allow_list_for_the_process(walk, torchs_own):
    assert 'builtins.getattr' not in torchs_own and len(torchs_own) > 10
    assert not_torchs(torchs_own) == []
    with pytest.raises(pickle.UnpicklingError, match='getattr'):
        torch.load(walk, weights_only=True)
    sources = [p for d in ('scalablevit', 'classification', 'detection', 'segmentation', 'tools', 'benchmarks')
               for p in (REPO / d).rglob('*.py')] + [REPO / 'hubconf.py']
    assert [str(p) for p in sources if 'add_safe_globals(' in p.read_text()] == []


def test_our_loaders_refuse_the_walk_in_one_line(walk, torchs_own):
    for load, reason in [(load_checkpoint, 'it needs the Python object getattr'),
                         (load_mm_checkpoint, "it calls getattr(function, '__self__')")]:
        with pytest.raises(CheckpointError) as e:
            load(walk)
        assert str(e.value).startswith(f'cannot read checkpoint {walk}: ') and reason in str(e.value)
        assert '\n' not in str(e.value)
    assert not_torchs(torchs_own) == []  # the load's allowances are gone after it


def test_getattr_is_served_for_history_buffer_methods_only():
    from mmengine.logging.history_buffer import HistoryBuffer
    assert history_buffer_method(HistoryBuffer, 'mean') is HistoryBuffer.mean
    for owner, name in [(HistoryBuffer, '__init__'), (HistoryBuffer, '__class__'), (getattr, '__self__'),
                        (os, 'system')]:
        with pytest.raises(pickle.UnpicklingError, match='only getattr\\(HistoryBuffer'):
            history_buffer_method(owner, name)


def test_timm_and_torch_hub_pretrained_files_refuse_the_walk(walk):
    import timm
    with pytest.raises(RuntimeError, match='weights_only=True blocked'):
        timm.create_model('scalable_vit_small', pretrained=True, pretrained_cfg_overlay=dict(file=str(walk)))
    with pytest.raises(RuntimeError, match='weights_only=True blocked'):
        torch.hub.load(str(REPO), 'scalable_vit_small', source='local', pretrained=True,
                       pretrained_cfg_overlay=dict(file=str(walk)))


def test_allowed_globals_is_reentrant_and_leaves_others_allowance_alone():
    class A:
        pass

    class B:
        pass
    before = _allowed()
    with allowed_globals([A]):
        with allowed_globals([A, B]):
            assert {A, B} <= _allowed()
        assert A in _allowed() and B not in _allowed()
    assert _allowed() == before

    with torch.serialization.safe_globals([B]):  # somebody else's allowance
        with allowed_globals([B]):
            pass
        assert B in _allowed()

    # Two threads holding the same entry: the first to leave must not take it from the other.
    inside, leave = threading.Event(), threading.Event()
    seen = []

    def hold():
        with allowed_globals([A]):
            inside.set()
            leave.wait(10)
            seen.append(A in _allowed())
    t = threading.Thread(target=hold)
    t.start()
    inside.wait(10)
    with allowed_globals([A]):
        pass
    leave.set()
    t.join()
    assert seen == [True] and _allowed() == before


def test_recorded_config_reads_literals_and_runs_nothing(tmp_path):
    marker = tmp_path / 'ran'
    text = (f"__import__('pathlib').Path({str(marker)!r}).write_text('x')\n"
            "model = dict(type='RetinaNet', backbone=dict(arch=dict(depths=[2, 2], ratio=-1.5), out=(1, 2)))\n")
    assert recorded_config(text, 'model') == dict(type='RetinaNet',
                                                  backbone=dict(arch=dict(depths=[2, 2], ratio=-1.5), out=(1, 2)))
    for bad, message in [("model = dict(backbone=__import__('os').getcwd())", 'line 1: __import__'),
                         ('model = base_model', 'base_model is not a literal'),
                         ('x = 1', 'assigns no model'), ('model = dict(', 'does not parse')]:
        with pytest.raises(ValueError, match=message.replace('(', '\\(')):
            recorded_config(bad, 'model')
    assert not marker.exists()


def test_orphaned_temporary_files_of_dead_processes_are_removed(tmp_path):
    import socket
    host = socket.gethostname()
    dead = subprocess.Popen([sys.executable, '-c', 'pass'])
    dead.wait()
    orphan = tmp_path / f'epoch_1.pth.tmp.{host}.{dead.pid}'
    live = tmp_path / f'epoch_2.pth.tmp.{host}.{os.getpid()}'  # a write in flight
    other_host = tmp_path / f'epoch_3.pth.tmp.{host}x.{dead.pid}'  # another node's, on a shared file system
    keep = tmp_path / 'epoch_0.pth'
    for p in (orphan, live, other_host, keep):
        p.write_bytes(b'x')
    assert remove_orphaned_tmp_files(str(tmp_path)) == [str(orphan)]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in (live, other_host, keep))


def test_atomic_copy_is_a_whole_copy_and_leaves_no_temporary(tmp_path):
    src, dst = tmp_path / 'checkpoint.pth', tmp_path / 'checkpoint_best.pth'
    src.write_bytes(os.urandom(1 << 16))
    dst.write_bytes(b'old')
    atomic_copy(src, dst)
    assert dst.read_bytes() == src.read_bytes()
    src.write_bytes(b'replaced')  # an in-place rewrite (atomic writes rename instead; the copy is its own file)
    assert sorted(p.name for p in tmp_path.iterdir()) == ['checkpoint.pth', 'checkpoint_best.pth']


# ---------------------------------------------------------------------------------------------------------------------
# Entry points, as a user runs them


def _run(args, cwd, env_extra=None):
    env = dict(os.environ, PYTHONUNBUFFERED='1', OMP_NUM_THREADS='1')
    env.pop('TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD', None)
    env.pop('PORT', None)
    proc = subprocess.run([sys.executable, *map(str, args)], cwd=cwd, env={**env, **(env_extra or {})},
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=600)
    return proc.returncode, proc.stdout, proc.stderr


def _refused(result, path):
    """Exit status 1 and one error line naming ``path``."""
    rc, out, err = result
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith(('WARNING', 'Warning'))]
    assert rc == 1 and 'Traceback' not in err + out, err[-4000:]
    assert len(lines) == 1 and str(path) in lines[0], err[-4000:]
    return lines[0]


@pytest.fixture(scope='module')
def retina(tmp_path_factory):
    """A real tiny RetinaNet checkpoint (one epoch on 4 images), and a copy of it with code in its recorded config
    text (``meta['cfg']`` and ``meta['config']``) that writes ``marker`` when run."""
    root = tmp_path_factory.mktemp('untrusted')
    data = root / 'data' / 'tiny_coco'
    make_tiny_coco(str(data), num_train=4, num_val=2, size=128, seed=0)
    work = root / 'work'
    rc, out, err = _run([DET / 'train.py', TINY_RETINA, '--work-dir', work, '--cfg-options',
                         f'train_dataloader.dataset.data_root={data}/', 'train_cfg.max_epochs=1', 'val_cfg=None',
                         'val_dataloader=None', 'val_evaluator=None'], root)
    assert rc == 0, (out + err)[-4000:]
    real = work / 'epoch_1.pth'
    marker = root / 'config_code_ran'
    code = f"\n__import__('pathlib').Path({str(marker)!r}).write_text('ran')\n"
    ckpt = load_mm_checkpoint(real)
    assert 'model = dict(' in ckpt['meta']['cfg']
    ckpt['meta']['cfg'] = ckpt['meta']['cfg'] + code
    ckpt['meta']['config'] = code
    ckpt['message_hub']['runtime_info']['cfg'] = code
    crafted = root / 'config_code.pth'
    torch.save(ckpt, crafted)
    return dict(root=root, data=data, real=real, crafted=crafted, marker=marker)


@pytest.mark.slow
def test_detection_entry_points_refuse_the_walk(retina, walk, tmp_path):
    root = retina['root']
    image = next((retina['data']).rglob('*.jpg'))
    runs = [
        [DET / 'test.py', TINY_RETINA, walk, '--work-dir', tmp_path / 'test'],
        [DET / 'predict.py', image, TINY_RETINA, '--weights', walk, '--out-dir', tmp_path / 'pred', '--device', 'cpu'],
        [DET / 'train.py', TINY_RETINA, '--work-dir', tmp_path / 'train', '--resume', walk],
        [REPO / 'tools' / 'convert_checkpoint.py', walk, tmp_path / 'out.pth'],
    ]
    for args in runs:
        line = _refused(_run(args, root), walk)
        assert 'getattr' in line, line
    assert not any(p.name in ('out.pth',) for p in tmp_path.iterdir())


@pytest.mark.slow
def test_segmentation_entry_points_refuse_the_walk(walk, tmp_path):
    data = make_tiny_ade(str(tmp_path / 'tiny_ade'), size=64, num_train=2, num_val=2)
    image = next(Path(data).rglob('*.jpg'))
    for args in ([SEG / 'test.py', TINY_FPN, walk, '--work-dir', tmp_path / 'test', '--cfg-options',
                  f'test_dataloader.dataset.data_root={data}'],
                 [SEG / 'predict.py', image, TINY_FPN, '--weights', walk, '--out-dir', tmp_path / 'p',
                  '--device', 'cpu']):
        assert 'getattr' in _refused(_run(args, tmp_path), walk)


@pytest.mark.slow
def test_config_code_in_a_real_checkpoint_never_runs(retina, tmp_path):
    """The crafted copy tests, predicts, resumes and converts like the real file; the marker is never written."""
    root, crafted, marker = retina['root'], retina['crafted'], retina['marker']
    data = retina['data']
    image = next(data.rglob('*.jpg'))
    val = [p for p in data.iterdir() if p.is_dir() and p.name.startswith('val')][0]
    test_opts = ['--cfg-options', f'test_dataloader.dataset.data_root={data}/',
                 f'test_evaluator.ann_file={data}/annotations/instances_{val.name}.json']
    rc, out, err = _run([DET / 'test.py', TINY_RETINA, crafted, '--work-dir', tmp_path / 'test', *test_opts], root)
    assert rc == 0 and 'coco/bbox_mAP' in out + err, (out + err)[-4000:]
    rc, out, err = _run([DET / 'predict.py', image, TINY_RETINA, '--weights', crafted, '--out-dir',
                         tmp_path / 'pred', '--device', 'cpu'], root)
    assert rc == 0 and list((tmp_path / 'pred' / 'preds').iterdir()), (out + err)[-4000:]
    rc, out, err = _run([DET / 'train.py', TINY_RETINA, '--work-dir', tmp_path / 'train', '--resume', crafted,
                         '--cfg-options', f'train_dataloader.dataset.data_root={data}/', 'train_cfg.max_epochs=2',
                         'val_cfg=None', 'val_dataloader=None', 'val_evaluator=None'], root)
    assert rc == 0 and (tmp_path / 'train' / 'epoch_2.pth').is_file(), (out + err)[-4000:]
    assert 'resumed epoch: 1' in out + err, (out + err)[-4000:]
    rc, out, err = _run([REPO / 'tools' / 'convert_checkpoint.py', crafted, tmp_path / 'backbone.pth'], root)
    assert rc == 0 and (tmp_path / 'backbone.pth').is_file(), (out + err)[-4000:]
    assert not marker.exists(), 'code from the checkpoint ran'

    # Code inside the model dict itself: convert cannot read the architecture from data, and says so.
    ckpt = load_mm_checkpoint(crafted)
    ckpt['meta']['cfg'] = ckpt['meta']['cfg'].replace(
        'model = dict(', f"model = dict(x=__import__('pathlib').Path({str(marker)!r}).write_text('ran'), ", 1)
    inside = tmp_path / 'code_in_model.pth'
    torch.save(ckpt, inside)
    line = _refused(_run([REPO / 'tools' / 'convert_checkpoint.py', inside, tmp_path / 'b2.pth'], root), inside)
    assert 'not a literal' in line and '--config' in line, line
    assert not marker.exists() and not (tmp_path / 'b2.pth').exists()


@pytest.mark.slow
def test_convert_refuses_to_overwrite_its_input(retina, tmp_path):
    src = tmp_path / 'epoch_1.pth'
    atomic_copy(retina['real'], src)
    before = src.read_bytes()
    line = _refused(_run([REPO / 'tools' / 'convert_checkpoint.py', src, src], tmp_path), src)
    assert 'is the input' in line and src.read_bytes() == before


def test_classification_entry_points_refuse_the_walk(cls, cls_dir, walk, tmp_path, capsys):
    """--resume, --finetune, --eval --resume and predict.py: exit status 1, one line naming the file."""
    from test_classification import DIGITS, NO_MIX, TINY
    predict = cls_dir('predict')
    image = tmp_path / 'x.png'
    from PIL import Image
    Image.new('RGB', (16, 16)).save(image)
    common = [*TINY, *DIGITS, *NO_MIX, '--epochs', '1', '--output_dir', str(tmp_path / 'out')]
    runs = [(cls.cli, [*common, '--resume', str(walk)]), (cls.cli, [*common, '--finetune', str(walk)]),
            (cls.cli, [*common, '--eval', '--resume', str(walk)]),
            (predict.cli, [str(image), '--checkpoint', str(walk)])]
    for cli, argv in runs:
        capsys.readouterr()
        assert cli(argv) == 1, argv
        lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(lines) == 1 and str(walk) in lines[0] and 'getattr' in lines[0], (argv, lines)
