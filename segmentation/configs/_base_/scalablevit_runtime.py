# What every ScalableViT segmentation config shares: mmseg's runtime, the one entry point of this repository's code
# (the backbone, the preemption hook and resumable loops, the torch 2.14 / CPU / atomic-file patches), the
# preemption hook, and ScalableViT-S as the backbone. The iteration-based schedules' loop is set by each config as
# ResumableIterBasedTrainLoop (mmengine forbids a key in two sibling _base_ files).
_base_ = 'mmseg::_base_/default_runtime.py'

custom_imports = dict(imports=['scalablevit.mm'], allow_failed_imports=False)
# SIGTERM / SIGUSR1: a checkpoint at the next iteration, then exit status 75 (README, "Preemption and requeueing")
custom_hooks = [dict(type='PreemptionHook')]

# ImageNet-1K weights, relative to the working directory (segmentation/): the released file or classification/'s
# checkpoint (README, "Pretrained weights"); train from scratch with --no-pretrained.
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
