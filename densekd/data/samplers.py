"""Seeded, sharded, resumable samplers for detection training.

Three samplers share one contract (:class:`_EpochSampler`):

* :class:`RandomSampler` -- a seeded shuffle of ``range(num_images)`` (``torch.utils.data.DistributedSampler``'s
  shuffle and sharding plus position skipping).
* :class:`RepeatFactorSampler` -- LVIS repeat-factor sampling with stochastic rounding
  (Gupta et al. 2019; detectron2's ``RepeatFactorTrainingSampler``).
* :class:`ClassAwareSampler` -- a class uniformly, then an image of that class uniformly
  (Shen et al. 2016, "Relay Backpropagation"; mmdet's ``ClassAwareSampler``).

The contract:

* An epoch's index sequence depends only on ``(seed, epoch)``; call ``set_epoch(epoch)``
  before iterating each epoch.
* Sharding: all ranks build the same epoch sequence, pad it (by repeating its start) to
  a multiple of ``num_replicas``, and rank ``r`` takes positions ``r, r + R, r + 2R, ...``.
  Ranks are disjoint and together cover the epoch (plus the padding).
* Resuming: ``skip(n)`` makes iteration of the current epoch start after the first ``n``
  indices of THIS rank.  The engine restores "epoch e, n samples consumed by this rank"
  with ``sampler.set_epoch(e); sampler.skip(n)``; ``set_epoch`` clears the skip.  The
  sampler does not count what it yields itself, because a DataLoader pre-fetches indices
  ahead of what training has consumed; only the engine knows ``n`` (e.g. steps * batch size).
* ``len(sampler)`` is the number of indices left in the epoch for this rank.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Iterator, List, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from densekd._names import unknown_name_message
from densekd.data._checks import checked_epoch, checked_seed
from densekd.data.long_tail import repeat_factors

__all__ = ["RandomSampler", "RepeatFactorSampler", "ClassAwareSampler", "SAMPLERS", "build_sampler"]


class _EpochSampler(torch.utils.data.Sampler, ABC):
    """Epoch sequence -> padding -> rank shard -> skip; subclasses implement ``_epoch_indices``."""

    def __init__(self, seed: int, num_replicas: int, rank: int) -> None:
        seed = checked_seed(seed)
        if num_replicas < 1:
            raise ValueError(f"num_replicas must be >= 1, got {num_replicas}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in [0, num_replicas - 1] = [0, {num_replicas - 1}], got {rank}")
        self.seed = int(seed)
        self.num_replicas = int(num_replicas)
        self.rank = int(rank)
        self.epoch = 0
        self.start = 0

    def _rng(self) -> np.random.Generator:
        return np.random.default_rng((self.seed, self.epoch))

    @abstractmethod
    def _epoch_indices(self) -> np.ndarray:
        """(L,) int64: the whole epoch's sequence, identical on every rank."""

    @abstractmethod
    def _epoch_size(self) -> int:
        """L, or its expectation when L is random."""

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch to iterate and clear any :meth:`skip`."""
        self.epoch = checked_epoch(epoch)
        self.start = 0

    def skip(self, num_samples: int) -> None:
        """Start this epoch's iteration after the first ``num_samples`` indices of this rank."""
        if num_samples < 0:
            raise ValueError(f"num_samples must be >= 0, got {num_samples}")
        self.start = int(num_samples)

    def shard(self, indices: np.ndarray) -> np.ndarray:
        """(L,) epoch sequence -> (ceil(L / R),) this rank's share (padded by wrapping around)."""
        if self.num_replicas == 1 or len(indices) == 0:
            return indices
        per_rank = math.ceil(len(indices) / self.num_replicas)
        padding = per_rank * self.num_replicas - len(indices)
        padded = np.concatenate([indices, np.resize(indices, padding)])  # np.resize repeats from the start
        return padded[self.rank :: self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        indices = self.shard(self._epoch_indices())[self.start :]
        return iter(indices.tolist())

    def __len__(self) -> int:
        per_rank = math.ceil(self._epoch_size() / self.num_replicas)
        return max(per_rank - self.start, 0)


class RandomSampler(_EpochSampler):
    """A seeded permutation of ``range(num_images)`` per epoch (``shuffle=False``: in order).

    Shape: yields ``ceil(num_images / num_replicas)`` indices per rank and epoch.
    """

    def __init__(self, num_images: int, seed: int = 0, shuffle: bool = True, num_replicas: int = 1, rank: int = 0):
        super().__init__(seed, num_replicas, rank)
        if num_images < 1:
            raise ValueError(f"num_images must be >= 1, got {num_images}; the dataset is empty")
        self.num_images = int(num_images)
        self.shuffle = shuffle

    def _epoch_indices(self) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.num_images)
        return self._rng().permutation(self.num_images)

    def _epoch_size(self) -> int:
        return self.num_images


class RepeatFactorSampler(_EpochSampler):
    """Repeat-factor sampling with stochastic rounding (Gupta et al. 2019, LVIS).

    Each epoch, image ``i`` with factor ``r_i`` appears ``floor(r_i) + Bernoulli(frac(r_i))``
    times (so ``r_i`` times on average), in a shuffled order.

    Args:
        repeat_factors: ``(num_images,)`` factors >= 0, e.g. from :func:`densekd.data.long_tail.repeat_factors`.
        seed, shuffle, num_replicas, rank: see the module docstring.

    ``len(sampler)`` is the EXPECTED per-rank epoch size ``ceil(sum(r) / num_replicas)``
    (minus any skip); the actual epoch varies by a few indices around it, which is fine
    for a DataLoader (its length is only used for progress and scheduling estimates).
    """

    def __init__(
        self,
        repeat_factors: Tensor,
        seed: int = 0,
        shuffle: bool = True,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        super().__init__(seed, num_replicas, rank)
        factors = torch.as_tensor(repeat_factors, dtype=torch.float64)
        if factors.dim() != 1 or factors.numel() == 0:
            raise ValueError(f"repeat_factors must be a non-empty 1-D (num_images,) tensor, got shape {tuple(factors.shape)}")
        if not (torch.isfinite(factors).all() and (factors >= 0).all()):
            raise ValueError("repeat_factors must be finite and >= 0 (use densekd.data.long_tail.repeat_factors)")
        self.repeat_factors = factors.numpy()  # (num_images,) float64
        self.shuffle = shuffle
        self._floor = np.floor(self.repeat_factors).astype(np.int64)
        self._frac = self.repeat_factors - self._floor

    def _epoch_indices(self) -> np.ndarray:
        rng = self._rng()
        repeats = self._floor + (rng.random(len(self._frac)) < self._frac)  # (num_images,)
        indices = np.repeat(np.arange(len(repeats)), repeats)  # (L,)
        return rng.permutation(indices) if self.shuffle else indices

    def _epoch_size(self) -> float:
        return float(self.repeat_factors.sum())


class ClassAwareSampler(_EpochSampler):
    """Class-aware sampling: a class uniformly, then an image containing it uniformly.

    Shen et al. 2016, "Relay Backpropagation for Effective Learning of Deep Convolutional
    Neural Networks"; as mmdet's ``ClassAwareSampler``.  Departure: mmdet walks per-class
    shuffled queues (each class yields its images in a round-robin); here both choices are
    i.i.d. draws, which has the same marginals.  Images without labels are never drawn;
    classes without images are never picked.

    Args:
        image_labels: per image, its labels (any integers; duplicates are fine).
        num_samples: epoch size; default the number of images.
        seed, num_replicas, rank: see the module docstring.
    """

    def __init__(
        self,
        image_labels: Sequence[Sequence[int]],
        num_samples: Optional[int] = None,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        super().__init__(seed, num_replicas, rank)
        per_class: dict = {}
        for index, labels in enumerate(image_labels):
            for label in set(int(x) for x in labels):
                per_class.setdefault(label, []).append(index)
        if not per_class:
            raise ValueError("no image has a label; class-aware sampling needs annotated images")
        self.classes: List[int] = sorted(per_class)
        self.class_images: List[np.ndarray] = [np.asarray(per_class[c], dtype=np.int64) for c in self.classes]
        self.num_images = len(image_labels)
        self.num_samples = self.num_images if num_samples is None else int(num_samples)
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")

    def _epoch_indices(self) -> np.ndarray:
        rng = self._rng()
        class_choice = rng.integers(len(self.classes), size=self.num_samples)  # (L,)
        within = rng.random(self.num_samples)  # (L,) uniform position inside the class's image list
        sizes = np.array([len(images) for images in self.class_images])
        positions = np.minimum((within * sizes[class_choice]).astype(np.int64), sizes[class_choice] - 1)
        return np.array([self.class_images[c][p] for c, p in zip(class_choice, positions)], dtype=np.int64)

    def _epoch_size(self) -> int:
        return self.num_samples


SAMPLERS = ("random", "repeat_factor", "class_aware")


def build_sampler(
    kind: str,
    dataset,
    seed: int = 0,
    num_replicas: int = 1,
    rank: int = 0,
    rfs_threshold: float = 0.001,
) -> _EpochSampler:
    """A training sampler by name: one of :data:`SAMPLERS`.

    Args:
        kind: ``"random"``, ``"repeat_factor"`` (LVIS RFS with ``rfs_threshold``) or ``"class_aware"``.
        dataset: a :class:`~densekd.data.coco.CocoDetectionDataset` (``image_labels()``,
            ``num_classes``, labels 1..K); for a wrapped dataset pass the inner one
            (e.g. ``MixedDetectionDataset.dataset``).
        seed, num_replicas, rank: see the module docstring.
        rfs_threshold: LVIS's ``t``: classes in fewer than this fraction of images are repeated.
    """
    if kind not in SAMPLERS:
        raise ValueError(unknown_name_message("sampler", kind, SAMPLERS))
    if kind == "random":
        return RandomSampler(len(dataset), seed=seed, num_replicas=num_replicas, rank=rank)
    if not hasattr(dataset, "image_labels") or not hasattr(dataset, "num_classes"):
        raise TypeError(
            f"sampler {kind!r} needs a dataset with image_labels() and num_classes (CocoDetectionDataset); "
            f"got {type(dataset).__name__}. For a wrapper such as MixedDetectionDataset pass its .dataset"
        )
    labels = dataset.image_labels()
    if kind == "repeat_factor":
        factors = repeat_factors(labels, dataset.num_classes, threshold=rfs_threshold, first_label=1)
        return RepeatFactorSampler(factors, seed=seed, num_replicas=num_replicas, rank=rank)
    return ClassAwareSampler(labels, seed=seed, num_replicas=num_replicas, rank=rank)
