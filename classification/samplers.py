"""Samplers: repeated augmentation for training (DeiT's ``RASampler``) and exact sharding for ``--dist-eval``."""
import math
from typing import Iterator, Sized

import torch
from torch.utils.data import Sampler


class RASampler(Sampler[int]):
    """Repeated augmentation (Hoffer et al., 2020; as in DeiT): each image appears ``num_repeats`` times per epoch,
    the repeats spread over the processes so they see different augmentations of it.

    Every process draws ``floor(len(dataset) // 256 * 256 / num_replicas)`` indices per epoch, so an epoch costs
    about as many steps as without repetition. Shuffling is seeded by ``seed + epoch`` (call ``set_epoch``).
    """

    def __init__(self, dataset: Sized, num_replicas: int, rank: int, shuffle: bool = True, num_repeats: int = 3,
                 seed: int = 0):
        if num_repeats < 1:
            raise ValueError('num_repeats must be at least 1')
        self.dataset = dataset
        self.num_replicas = num_replicas
        self.rank = rank
        self.shuffle = shuffle
        self.num_repeats = num_repeats
        self.seed = seed
        self.epoch = 0
        self.num_samples = int(math.ceil(len(dataset) * num_repeats / num_replicas))
        self.total_size = self.num_samples * num_replicas
        per_replica = len(dataset) // 256 * 256 // num_replicas
        self.num_selected_samples = per_replica if per_replica > 0 else len(dataset) // num_replicas

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + self.epoch)
            indices = torch.randperm(len(self.dataset), generator=g).tolist()
        else:
            indices = list(range(len(self.dataset)))
        indices = [i for i in indices for _ in range(self.num_repeats)]
        indices += indices[:self.total_size - len(indices)]  # pad to a multiple of num_replicas
        indices = indices[self.rank:self.total_size:self.num_replicas]
        return iter(indices[:self.num_selected_samples])

    def __len__(self) -> int:
        return self.num_selected_samples

    def set_epoch(self, epoch: int):
        self.epoch = epoch


class ShardedEvalSampler(Sampler[int]):
    """Every ``num_replicas``-th index from ``rank``, without padding: the shards cover the set exactly once, so
    summed counts give the true accuracy and image count (``DistributedSampler`` pads with repeats)."""

    def __init__(self, dataset: Sized, num_replicas: int, rank: int):
        self.indices = list(range(rank, len(dataset), num_replicas))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)
