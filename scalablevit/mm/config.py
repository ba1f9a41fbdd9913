"""Reading a detection / segmentation config for this machine, and building what it describes.

* :func:`read_config`: the file and ``--cfg-options``, as written;
* :func:`load_config`: the file, ``--cfg-options``, the work dir (``<task>/work_dirs/<config name>`` by default,
  whatever the current directory), adapted to the device;
* :func:`adapt_cfg_to_device`: the same config runs on CPU without edits (gloo, DDP without device ids, SyncBN over
  gloo); nothing changes on CUDA;
* :func:`build_model`: the config's model on the CPU, without its pretrained backbone (the one way every command
  that only needs the network builds it: FLOPs, checkpoint checks);
* :func:`build_runner`: mmengine's ``Runner`` (or the config's ``runner_type``), on CPU after the gloo process
  group of a ``torchrun`` launch (:func:`init_process_group`).
"""
import copy
import os.path as osp
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist
from mmengine.config import Config

from ..errors import UserError

__all__ = ['adapt_cfg_to_device', 'build_model', 'build_runner', 'init_process_group', 'load_config', 'read_config']


def read_config(path: str, cfg_options: Optional[dict] = None) -> Config:
    """The config at ``path`` (Python, run as it is read: a trusted input) with ``cfg_options`` merged."""
    if not osp.isfile(path):
        raise UserError(f'config file not found: {path}')
    cfg = Config.fromfile(path)
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    return cfg


def load_config(path: str, task_dir: Optional[str] = None, cfg_options: Optional[dict] = None,
                work_dir: Optional[str] = None, launcher: str = 'none') -> Config:
    """The config at ``path`` with ``cfg_options`` merged and its work dir and launcher set, adapted to the device."""
    cfg = read_config(path, cfg_options)
    cfg.launcher = launcher
    if work_dir is not None:
        cfg.work_dir = work_dir
    elif cfg.get('work_dir', None) is None and task_dir is not None:
        cfg.work_dir = osp.join(task_dir, 'work_dirs', osp.splitext(osp.basename(path))[0])
    return adapt_cfg_to_device(cfg)


def adapt_cfg_to_device(cfg: Config, device: Optional[str] = None) -> Config:
    """Make a GPU config run on CPU when there is no GPU; does nothing on CUDA.

    gloo instead of NCCL, DDP without device ids, and ``SyncBN`` -> ``SyncBNCPU`` (:mod:`scalablevit.mm.compat`:
    the same statistics over all processes, through gloo), so that every process keeps the same BN running
    statistics and validation during training equals testing the saved checkpoint.
    """
    device = device or ('cuda' if torch.cuda.is_available() else 'cpu')
    if device != 'cpu':
        return cfg
    cfg.setdefault('env_cfg', {}).setdefault('dist_cfg', {})['backend'] = 'gloo'
    cfg.model_wrapper_cfg = dict(
        type='MMDistributedDataParallel', device_ids=None, broadcast_buffers=False,
        find_unused_parameters=cfg.get('find_unused_parameters', False))

    def sync_bn_cpu(node):
        if isinstance(node, dict):
            if node.get('type') == 'SyncBN':
                node['type'] = 'SyncBNCPU'
            for v in node.values():
                sync_bn_cpu(v)
        elif isinstance(node, (list, tuple)):
            for v in node:
                sync_bn_cpu(v)

    sync_bn_cpu(cfg.model)
    return cfg


def build_model(cfg: Config, task) -> torch.nn.Module:
    """The config's model on the CPU, its backbone without pretrained weights, SyncBN as BN."""
    from mmengine.registry import init_default_scope

    task.register_all_modules()
    init_default_scope(task.scope)
    cfg = adapt_cfg_to_device(copy.deepcopy(cfg), 'cpu')
    if cfg.model.get('backbone') is not None:
        cfg.model.backbone.init_cfg = None
    return task.registry('MODELS').build(cfg.model)


def init_process_group(cfg: Config) -> None:
    """The gloo process group of a ``--launcher pytorch`` run without a GPU, from torchrun's environment.

    mmengine's PyTorch launcher always calls ``torch.cuda.set_device``; its ``Runner`` skips its own ``init_dist``
    when a process group exists, so one set up here makes ``torchrun`` work on CPU. On CUDA mmengine does it (NCCL).
    """
    if cfg.get('launcher', 'none') != 'pytorch' or torch.cuda.is_available() or dist.is_initialized():
        return
    timeout = cfg.get('env_cfg', {}).get('dist_cfg', {}).get('timeout')
    dist.init_process_group(backend='gloo', **({} if timeout is None else dict(timeout=timedelta(seconds=timeout))))


def build_runner(cfg: Config):
    """mmengine's ``Runner`` for ``cfg``, or the registered ``runner_type`` it names (the process group first,
    :func:`init_process_group`)."""
    from mmengine.runner import Runner
    init_process_group(cfg)
    if 'runner_type' in cfg:
        from mmengine.registry import RUNNERS
        return RUNNERS.build(cfg)
    return Runner.from_cfg(cfg)
