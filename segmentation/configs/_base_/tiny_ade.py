# What the two tiny configs share (as detection/configs/_base_/tiny_*.py): the tiny ADE-layout data set of
# tools/make_tiny_ade.py (data/tiny_ade/ADEChallengeData2016, relative to the working directory), pipelines that
# resize any input to fit 64x64, --aug-test at 0.5-1.75 x the test scale, one-image loaders, 40 iterations with a
# checkpoint and a validation at the end, and the small ScalableViT. For trying the scripts on CPU in seconds.
_base_ = ['mmseg::_base_/datasets/ade20k.py', './scalablevit_runtime.py', 'mmseg::_base_/schedules/schedule_80k.py']
from scalablevit.mm.pipelines import fit_pipelines, ratio_tta_pipeline  # noqa: E402  (after _base_, see ade20k.py)

data_root = 'data/tiny_ade/ADEChallengeData2016'
crop_size = (64, 64)
max_iters = 40
# 4 stages, 0.65M parameters in the backbone.
tiny_arch = dict(
    embed_dims=(16, 32, 64, 128), num_heads=(1, 2, 4, 8), depths=(2, 2, 2, 2),
    sr_ratios=(8, 4, 2, 1), c_ratios=(1.25, 1.25, 1.25, 1))
tiny_backbone = dict(_delete_=True, type='ScalableViTBackbone', arch=tiny_arch, out_indices=(0, 1, 2, 3),
                     drop_path_rate=0.0, init_cfg=None)

train_pipeline, test_pipeline = fit_pipelines(crop_size)  # any input fits the crop (padded to it)
img_ratios = [0.5, 0.75, 1.0, 1.25, 1.5, 1.75]
tta_pipeline = ratio_tta_pipeline(crop_size, img_ratios)
train_dataloader = dict(
    batch_size=2, num_workers=0, persistent_workers=False,
    dataset=dict(data_root=data_root, pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=1, num_workers=0, persistent_workers=False,
    dataset=dict(data_root=data_root, pipeline=test_pipeline))
test_dataloader = val_dataloader

train_cfg = dict(type='ResumableIterBasedTrainLoop', max_iters=max_iters, val_interval=max_iters)
default_hooks = dict(logger=dict(interval=10), checkpoint=dict(interval=max_iters))
auto_scale_lr = dict(enable=False, base_batch_size=16)
randomness = dict(seed=0)
