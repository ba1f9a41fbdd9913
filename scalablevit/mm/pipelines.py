"""Data pipelines that several segmentation configs share, built from their one parameter, the scale.

A config is Python, and mmengine runs its imports: ``from scalablevit.mm.pipelines import fit_pipelines``. A
``_base_`` file is evaluated with its own variables, so a child that sets another ``crop_size`` cannot rebuild the
base's pipelines from it; configs that differ only in a scale call these instead of restating the lists.

* :func:`fit_pipelines`: the small configs' train / test pipelines (``configs/_base_/tiny_ade.py``,
  ``shapes_ade.py``): any input resized to fit the scale, random flips for training.
* :func:`ratio_resizes` / :func:`ratio_tta_pipeline`: ``--aug-test`` as mmseg 0.x did it, ``ratios`` x the test
  scale, each with and without a horizontal flip (``configs/_base_/ade20k.py``, ``tiny_ade.py``;
  :func:`scalablevit.mm.data.rescale_tta` follows a changed test scale with the same resizes).
"""
from typing import Dict, List, Sequence, Tuple

__all__ = ['fit_pipelines', 'ratio_resizes', 'ratio_tta_pipeline']


def fit_pipelines(scale: Tuple[int, int], reduce_zero_label: bool = True) -> Tuple[List[Dict], List[Dict]]:
    """(train, test) pipelines that resize any input to fit ``scale`` (keeping its ratio; the data preprocessor pads
    to the crop), training with random horizontal flips."""
    train = [
        dict(type='LoadImageFromFile'),
        dict(type='LoadAnnotations', reduce_zero_label=reduce_zero_label),
        dict(type='Resize', scale=tuple(scale), keep_ratio=True),
        dict(type='RandomFlip', prob=0.5),
        dict(type='PackSegInputs'),
    ]
    test = [
        dict(type='LoadImageFromFile'),
        dict(type='Resize', scale=tuple(scale), keep_ratio=True),
        dict(type='LoadAnnotations', reduce_zero_label=reduce_zero_label),
        dict(type='PackSegInputs'),
    ]
    return train, test


def ratio_resizes(scale: Tuple[int, int], ratios: Sequence[float]) -> List[Dict]:
    """One ``Resize`` (keeping the ratio) to ``r`` x ``scale`` for each ``r`` in ``ratios``."""
    return [dict(type='Resize', scale=(int(scale[0] * r), int(scale[1] * r)), keep_ratio=True) for r in ratios]


def ratio_tta_pipeline(scale: Tuple[int, int], ratios: Sequence[float]) -> List[Dict]:
    """mmseg's ``TestTimeAug`` over :func:`ratio_resizes` x (no flip, horizontal flip)."""
    return [
        dict(type='LoadImageFromFile', backend_args=None),
        dict(
            type='TestTimeAug',
            transforms=[
                ratio_resizes(scale, ratios),
                [dict(type='RandomFlip', prob=0., direction='horizontal'),
                 dict(type='RandomFlip', prob=1., direction='horizontal')],
                [dict(type='LoadAnnotations')],
                [dict(type='PackSegInputs')],
            ])
    ]
