# What every ScalableViT detector config shares: mmdet's runtime, the one entry point of this repository's code
# (the backbone, the preemption hook and resumable loops, the torch 2.14 / CPU / atomic-file patches), the
# preemption hook, and ScalableViT-S as the backbone of the four-stage detectors.
_base_ = 'mmdet::_base_/default_runtime.py'

custom_imports = dict(imports=['scalablevit.mm'], allow_failed_imports=False)
# SIGTERM / SIGUSR1: a checkpoint at the next iteration, then exit status 75 (README, "Preemption and requeueing")
custom_hooks = [dict(type='PreemptionHook')]

# ImageNet-1K weights: the released file or classification/'s checkpoint (see README, "Pretrained weights").
pretrained = 'pretrained/scalable_vit_small.pth'
scalablevit_s = dict(
    _delete_=True,
    type='ScalableViTBackbone',
    arch='s',
    out_indices=(0, 1, 2, 3),
    drop_path_rate=0.2,
    frozen_stages=-1,
    with_cp=False,
    init_cfg=dict(type='Pretrained', checkpoint=pretrained))
