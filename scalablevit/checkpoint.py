"""Reading checkpoints and reporting the ones that do not fit, the same way everywhere.

Every loader of the project (timm ``pretrained=True``, ``classification/main.py --resume/--finetune``, the
mmengine backbone's ``init_cfg``, ``detection|segmentation/test.py``, ``tools/convert_checkpoint.py``) reads files
with :func:`load_checkpoint` and compares weights with :func:`check_state_dict`, so a user meets one message for
one problem:

    checkpoint ckpt.pth does not fit ScalableViT: 2 missing (head.3.bias, head.3.weight); 1 unexpected (fc.bias);
    1 of another shape (patch_embeds.0.proj.weight: checkpoint (96, 3, 7, 7) vs model (64, 3, 7, 7))

Nothing is ever half-loaded: a mismatch raises before any tensor is copied.

A checkpoint is data. :func:`load_checkpoint` is ``torch.load(weights_only=True)``: tensors, containers and numbers,
plus the few classes a caller names for that load only (:func:`allowed_globals`; nothing is allowed for the whole
process). The config text a checkpoint may record is read with :func:`recorded_config`, which parses literals and
runs nothing.

Writing is atomic everywhere too (:func:`atomic_write`, :func:`save_checkpoint`): a temporary file in the same folder,
flushed and fsynced, then renamed over the final name, so a kill or a full disk never leaves a truncated file under a
checkpoint's name, and a write that fails says how much room it needed and that the previous file is intact.
"""
import argparse
import ast
import contextlib
import errno
import io
import os
import re
import shutil
import socket
import threading
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from .errors import UserError

__all__ = ['CheckpointError', 'CheckpointMismatchError', 'DiskWriteError', 'allowed_globals', 'atomic_copy',
           'atomic_write', 'check_state_dict', 'checkpoint_files', 'describe_mismatch', 'load_checkpoint',
           'load_state_dict_strict', 'recorded_config', 'remove_orphaned_tmp_files', 'save_checkpoint',
           'tensor_bytes', 'write_failure']

_SHOWN = 5  # keys listed per kind before "... (N in all)"


class CheckpointError(UserError, ValueError):
    """A checkpoint file that is missing, unreadable or not a dict of weights."""


class CheckpointMismatchError(CheckpointError):
    """Weights whose names or shapes do not fit the model; the message lists them."""


_allowed_lock = threading.Lock()
_allowed_contexts: Dict[Any, Tuple[int, Any]] = {}  # global -> (contexts holding it, torch's context that added it)


@contextlib.contextmanager
def allowed_globals(safe_globals: Iterable[Any]):
    """Allow ``safe_globals`` in ``torch.load(weights_only=True)`` while inside, and only then.

    Entries are classes or functions, or ``(callable, 'module.name')`` pairs that stand for that name in a pickle
    (torch's form: a pickled ``builtins.getattr`` can be served by a function that allows less). Re-entrant and
    thread-safe: nested or concurrent contexts share an entry, which goes when the last of them ends; an entry
    allowed before (by code outside this module) stays allowed.
    """
    held = []
    with _allowed_lock:
        for g in dict.fromkeys(safe_globals):
            if g in _allowed_contexts:
                count, ctx = _allowed_contexts[g]
                _allowed_contexts[g] = (count + 1, ctx)
            elif g in torch.serialization.get_safe_globals():
                continue  # someone else's: leave it as it is
            else:
                ctx = torch.serialization.safe_globals([g])
                ctx.__enter__()
                _allowed_contexts[g] = (1, ctx)
            held.append(g)
    try:
        yield
    finally:
        with _allowed_lock:
            for g in held:
                count, ctx = _allowed_contexts[g]
                if count > 1:
                    _allowed_contexts[g] = (count - 1, ctx)
                else:
                    del _allowed_contexts[g]
                    ctx.__exit__(None, None, None)


def load_checkpoint(path: Union[str, os.PathLike], safe_globals: Sequence[Any] = (), mmap: bool = False
                    ) -> Dict[str, Any]:
    """``torch.load(path, weights_only=True)`` on the CPU, with one-line errors naming the file.

    ``argparse.Namespace`` is allowed for this load: DeiT-style files, the released ScalableViT weights among them,
    keep their command line in ``args``. ``safe_globals`` allows more for this load only (:func:`allowed_globals`;
    mmengine's checkpoints need a few, see ``scalablevit.mm.checkpoint``). ``mmap``: map the tensors instead of
    reading them (cheap for a look at the structure).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f'checkpoint not found: {path}')
    try:
        with allowed_globals([argparse.Namespace, *safe_globals]):
            checkpoint = torch.load(path, map_location='cpu', weights_only=True, mmap=mmap)
    except Exception as e:  # noqa: BLE001  (unpickling raises many types; report them uniformly)
        raise CheckpointError(f'cannot read checkpoint {path}: {_reason(e)}') from e
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f'checkpoint {path} holds a {type(checkpoint).__name__}, expected a dict of weights')
    return checkpoint


def _reason(e: Exception) -> str:
    """The useful line of a ``torch.load`` error (the weights-only unpickler buries it in advice)."""
    text = str(e)
    m = re.search(r'Unsupported global: GLOBAL (\S+)', text)
    if m:
        return (f'it needs the Python object {m.group(1)}, which a weights-only load refuses '
                f'(save a state dict instead, or convert the file with tools/convert_checkpoint.py)')
    m = re.search(r'WeightsUnpickler error:\s*(.*?)\s*(?:Check the documentation|$)', text, re.S)
    if m and m.group(1) and 'Unsupported operand' not in m.group(1):
        return f'a weights-only load refuses it: {" ".join(m.group(1).split()).rstrip(".")}'
    if 'WeightsUnpickler error' in text or 'invalid load key' in text or isinstance(e, EOFError):
        return 'not a PyTorch checkpoint (or a truncated one)'
    first = (text.strip().splitlines() or [''])[0]
    return f'{type(e).__name__}: {first}'


def _matches(key: str, patterns: Iterable[str]) -> bool:
    """``key`` equals a pattern, or starts with one that ends with a dot (a module prefix such as ``'head.'``)."""
    return any(key == p or (p.endswith('.') and key.startswith(p)) for p in patterns)


def _listing(keys: List[str]) -> str:
    keys = sorted(keys)
    shown = ', '.join(keys[:_SHOWN])
    return f'{shown}, ... ({len(keys)} in all)' if len(keys) > _SHOWN else shown


def describe_mismatch(
        own: Mapping[str, torch.Tensor],
        state_dict: Mapping[str, torch.Tensor],
        allow_missing: Iterable[str] = (),
        allow_unexpected: Iterable[str] = (),
) -> Optional[str]:
    """What keeps ``state_dict`` from loading into a model whose state dict is ``own``; ``None`` if it fits.

    ``allow_missing`` / ``allow_unexpected``: keys, or module prefixes ending with ``'.'``, that may be absent from
    the checkpoint / present only in it.
    """
    allow_missing, allow_unexpected = tuple(allow_missing), tuple(allow_unexpected)
    missing = [k for k in own if k not in state_dict and not _matches(k, allow_missing)]
    unexpected = [k for k in state_dict if k not in own and not _matches(k, allow_unexpected)]
    shape = [f'{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}'
             for k in own if k in state_dict and tuple(state_dict[k].shape) != tuple(own[k].shape)]
    parts = []
    if missing:
        parts.append(f'{len(missing)} missing ({_listing(missing)})')
    if unexpected:
        parts.append(f'{len(unexpected)} unexpected ({_listing(unexpected)})')
    if shape:
        parts.append(f'{len(shape)} of another shape ({_listing(shape)})')
    return '; '.join(parts) or None


def check_state_dict(
        model: Union[nn.Module, Mapping[str, torch.Tensor]],
        state_dict: Mapping[str, torch.Tensor],
        source: str,
        allow_missing: Iterable[str] = (),
        allow_unexpected: Iterable[str] = (),
        hint: str = '',
) -> None:
    """Raise :class:`CheckpointMismatchError` (one line) unless ``state_dict`` fits ``model`` (a module or its
    state dict). ``source`` names the checkpoint in the message; ``hint`` is appended (e.g. what to check)."""
    own = model.state_dict() if isinstance(model, nn.Module) else model
    problem = describe_mismatch(own, state_dict, allow_missing, allow_unexpected)
    if problem:
        what = type(model).__name__ if isinstance(model, nn.Module) else 'the model'
        raise CheckpointMismatchError(f'checkpoint {source} does not fit {what}: {problem}'
                                      + (f'; {hint}' if hint else ''))


def load_state_dict_strict(
        model: nn.Module,
        state_dict: Mapping[str, torch.Tensor],
        source: str,
        allow_missing: Iterable[str] = (),
        hint: str = '',
):
    """:func:`check_state_dict`, then ``model.load_state_dict``; keys allowed to be missing keep their values."""
    allow_missing = tuple(allow_missing)
    check_state_dict(model, state_dict, source, allow_missing=allow_missing, hint=hint)
    return model.load_state_dict(state_dict, strict=not allow_missing)


class _Literal(ast.NodeVisitor):
    """Evaluates the literal part of Python: constants, lists, tuples, sets, dicts, ``dict(key=...)``, unary +/-.
    Anything else (a name, an attribute, another call, an operator) raises ``ValueError`` naming it and its line."""

    def visit(self, node):
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, (ast.List, ast.Tuple, ast.Set)):
            items = [self.visit(e) for e in node.elts]
            return {ast.List: list, ast.Tuple: tuple, ast.Set: set}[type(node)](items)
        if isinstance(node, ast.Dict) and None not in node.keys:
            return {self.visit(k): self.visit(v) for k, v in zip(node.keys, node.values)}
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == 'dict'
                and not node.args and all(k.arg is not None for k in node.keywords)):
            return {k.arg: self.visit(k.value) for k in node.keywords}
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            value = self.visit(node.operand)
            if isinstance(value, (int, float, complex)) and not isinstance(value, bool):
                return -value if isinstance(node.op, ast.USub) else value
        raise ValueError(f'line {getattr(node, "lineno", "?")}: {ast.unparse(node)[:80]} is not a literal')


def recorded_config(text: str, name: str) -> Any:
    """The value assigned to ``name`` in the config text a checkpoint records (mmengine's ``meta['cfg']``, a
    ``Config.pretty_text``), read without running any of it.

    Only the last top-level ``name = ...`` is evaluated, and only as literals (:class:`_Literal`); the rest of the
    text may hold anything, since it is never run. ``ValueError`` (one line) if the text does not parse, has no
    such assignment, or assigns it something other than literals.
    """
    try:
        tree = ast.parse(text, mode='exec')
    except SyntaxError as e:
        raise ValueError(f'the text does not parse as Python (line {e.lineno}: {e.msg})') from None
    values = [node.value for node in tree.body if isinstance(node, ast.Assign) and len(node.targets) == 1
              and isinstance(node.targets[0], ast.Name) and node.targets[0].id == name]
    if not values:
        raise ValueError(f'it assigns no {name}')
    return _Literal().visit(values[-1])


# ---------------------------------------------------------------------------------------------------------------------
# Writing


class DiskWriteError(UserError, OSError):
    """A file that could not be written (disk full, quota, permissions); whatever stood under its name is intact."""


def tensor_bytes(value: Any) -> int:
    """Bytes of the tensors inside ``value`` (what a checkpoint of it needs on disk, give or take a few KB)."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(tensor_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(tensor_bytes(v) for v in value)
    return 0


def checkpoint_files(folder: str) -> List[str]:
    """The ``*.pth`` files of ``folder``, newest first (written atomically, so the modification time is when each
    was complete); none if the folder cannot be read."""
    def mtime(path: str) -> float:
        try:
            return os.path.getmtime(path)
        except OSError:  # removed meanwhile
            return -1.0
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    paths = [os.path.join(folder, n) for n in names if n.endswith('.pth') and os.path.isfile(os.path.join(folder, n))]
    return sorted(paths, key=lambda p: (mtime(p), p), reverse=True)


def _newest_checkpoint(folder: str, besides: str) -> Optional[str]:
    return next((p for p in checkpoint_files(folder) if os.path.basename(p) != os.path.basename(besides)), None)


def write_failure(path: str, need: int, error: BaseException, advice: str = 'free some space and resume') -> str:
    """The one line for a write of ``need`` bytes to ``path`` that failed with ``error``: the folder, the bytes
    needed and free when the disk is full, which earlier file is intact, and (disk full) ``advice``."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isfile(path):
        previous = f'the previous {os.path.basename(path)} is intact'
    else:
        newest = _newest_checkpoint(folder, path) if path.endswith('.pth') else None
        previous = (f'nothing was written under {os.path.basename(path)}; the newest checkpoint, '
                    f'{os.path.basename(newest)}, is intact' if newest else 'nothing was written')
    try:
        free: Optional[int] = shutil.disk_usage(folder).free
    except OSError:
        free = None
    no_space = isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)
    if no_space or (free is not None and free < need):
        have = f', {free / 2 ** 20:.1f} MB free' if free is not None else ''
        return f'disk full: writing {path} needs about {need / 2 ** 20:.1f} MB{have} in {folder}; {previous}; {advice}'
    reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return f'cannot write {path}: {reason}; {previous}'


_TMP_MARK = '.tmp.'


def _tmp_name(path: str) -> str:
    """``<path>.tmp.<host>.<pid>``: where :func:`atomic_write` writes before the rename."""
    return f'{path}{_TMP_MARK}{socket.gethostname()}.{os.getpid()}'


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_orphaned_tmp_files(folder: str) -> List[str]:
    """Remove the temporary files that interrupted :func:`atomic_write` calls left in ``folder`` (a kill between
    the write and the rename); returns their paths. Only files of this host whose process is gone are touched: on
    a shared file system another node's writes are in flight under the same names."""
    host = socket.gethostname()
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        base, mark, owner = name.rpartition(_TMP_MARK)
        owner_host, _, pid = owner.rpartition('.')
        if not (base and mark and owner_host == host and pid.isdigit()) or _pid_alive(int(pid)):
            continue
        try:
            os.remove(os.path.join(folder, name))
            removed.append(os.path.join(folder, name))
        except OSError:
            pass
    return removed


def _fsync(path: str) -> None:
    """Flush ``path`` (a file, or a folder: the renames in it) to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_folder(folder: str) -> None:
    """Make a rename in ``folder`` durable, where the file system can (some refuse to fsync a folder)."""
    try:
        _fsync(folder)
    except OSError:
        pass


@contextlib.contextmanager
def _replacing(path: str, need: int, advice: str):
    """Yields the temporary path to fill; on a normal exit it replaces ``path`` (fsynced file and folder); on a
    failure it is removed and a :class:`DiskWriteError` with :func:`write_failure`'s line is raised. Orphans of
    earlier interrupted writes into the folder are removed first."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = _tmp_name(path)
    try:
        os.makedirs(folder, exist_ok=True)
        remove_orphaned_tmp_files(folder)
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch's writer reports ENOSPC as RuntimeError('... iostream error')
        raise DiskWriteError(write_failure(path, need, e, advice)) from e
    finally:
        if os.path.lexists(tmp):
            os.remove(tmp)
    _fsync_folder(folder)


def atomic_write(path: Union[str, os.PathLike], data: Union[bytes, str, Callable[[io.BufferedWriter], None]],
                 need: Optional[int] = None, advice: str = 'free some space and resume') -> None:
    """Write ``data`` (bytes, text, or a function that writes into a binary file) to ``path`` atomically.

    The data goes to ``<path>.tmp.<host>.<pid>`` in the same folder, is flushed and fsynced, then renamed over
    ``path``: a reader sees the old file or the whole new one, never a part. The folder is created if needed, and
    the temporary files of earlier writes into it that were killed before their rename are removed. A failure
    removes the temporary file and raises :class:`DiskWriteError` with :func:`write_failure`'s line (``advice``:
    what to do when the disk is full).
    """
    path = os.fspath(path)
    if need is None:
        need = len(data) if isinstance(data, (bytes, str)) else 0
    with _replacing(path, need, advice) as tmp:
        with open(tmp, 'wb') as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode() if isinstance(data, str) else data)


def atomic_copy(src: Union[str, os.PathLike], dst: Union[str, os.PathLike],
                advice: str = 'free some space and resume') -> None:
    """``dst`` becomes a copy of ``src``, atomically and durably: a hard link where the file system has them (no
    second write; a later atomic replace of ``src`` leaves the link on the old file), else a byte copy; either is
    fsynced and renamed like :func:`atomic_write`."""
    src, dst = os.fspath(src), os.fspath(dst)
    with _replacing(dst, os.path.getsize(src), advice) as tmp:
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)


def save_checkpoint(state: Dict[str, Any], path: Union[str, os.PathLike],
                    advice: str = 'free some space and resume') -> None:
    """``torch.save(state, path)`` through :func:`atomic_write`."""
    atomic_write(path, lambda f: torch.save(state, f), need=tensor_bytes(state), advice=advice)
