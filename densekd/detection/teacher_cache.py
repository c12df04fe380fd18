"""Offline distillation: the teachers' outputs computed once per training image, stored on
disk and read back by image id, so a distillation step costs little more than a plain one::

    distiller = Distiller(student, teacher, terms)
    caches = teacher_caches_for(distiller, train_set, root=Path("cache/teacher_outputs"))
    distiller.use_teacher_cache(caches)          # the teachers no longer run
    loss_dict = distiller(images, targets)       # targets[i]["image_id"] selects the cached rows

What is stored. Per teacher, one folder ``<root>/<key>`` holds one ``.npy`` file per output
(memory-mapped when read), each with one row per image of the dataset in dataset order,
and ``manifest.json`` (the key's inputs, the image ids, the batch geometry, the files with
their byte sizes, the build time). Only what the terms need is stored
(:func:`densekd.detection.pairs.teacher_needs`), and of the features only the levels the feature terms
pair with::

    features.<level>.npy      (num_images, C, H_l, W_l)
    cls_logits.npy            (num_images, HWA, K)
    box_regression.npy        (num_images, HWA, 4)
    centerness.npy            (num_images, HWA)
    anchor_class_logits.npy   (num_images, HWA, K + 1)   SSD
    anchor_box_regression.npy (num_images, HWA, 4)       SSD
    rpn_objectness.npy        (num_images, HWA)
    rpn_box_regression.npy    (num_images, HWA, 4)

Values are float16 by default (half the bytes; the kd losses move by about 1e-3 relative)
or float32 (the same kd losses as online distillation, up to the last bits of batched
convolutions; tested bitwise-close on CPU. On CUDA, TF32 convolutions and cuDNN's choice of
algorithm per batch size can make the cached and the online outputs differ at TF32
precision). A float16 overflow (|value| > 65504) is refused, naming the output.

No top-k logits. The cacheable logit losses are Bernoulli KD on sigmoid heads
(``binary_kd``, ``focal_binary_kd``), which sum over every class channel, each its own
Bernoulli: dropping channels drops terms of the loss, so a top-k cache cannot give the same
value. Softmax KL needs the full partition function too: SSD's per-anchor logits are stored
whole (all K + 1 channels); RoI logits are not cacheable anyway, see below.

The key. A SHA-256 of everything that determines the stored values: the teacher's class and
weights (every parameter and buffer), its normalization, the student's input transform
(``min_size``, ``max_size``, mean/std, ``size_divisible``, ``fixed_size``: the teacher sees
the student's resized batch), the dataset's images (id, file name, byte size and
modification time of every file) and its transform, the stored outputs and levels, the dtype
and the format version. Change any of them and the key, hence the folder, changes: a stale
cache is never read. :func:`teacher_caches_for` reuses a folder across students and seeds
whenever the key matches.

Atomic writes. A cache is written into a hidden temporary folder next to its final place,
flushed, and renamed into place in one step; a build that fails or is killed leaves no
folder under the key. A folder under the key whose manifest is missing or whose files do
not have the sizes the manifest lists is not used: it is removed and built again.

What cannot be cached (refused with the setting and the fix):

* augmentation (random flip, scale or colour jitter, MixUp, CutMix): the student sees a
  different image every epoch. Horizontal flips are not replayed either: a trained CNN is
  not mirror-symmetric, so the teacher's outputs on a flipped image are not the mirrored
  outputs on the original, and replaying them would be inexact;
* RoI-level outputs (``roi_class_logits``, ``roi_box_regression``, ``roi_features``,
  ``mask_logits``, ``keypoint_logits``): the teacher's RoI heads run on the proposals the student sampled in
  this step, which change as the student trains and are drawn at random;
* the teacher's detections (terms on ``detections``): not stored;
* self-distillation (EMA or snapshot teacher): the teacher changes during training;
* ``teacher_geometry="own"`` and multi-scale students (``min_size`` with several values):
  the geometry is not fixed per image.

Batch geometry. Per-anchor outputs and features depend on the padded batch the teacher
sees. The cache requires every image of the dataset to reach the student at one size (so
every batch has the same padded shape and each image's outputs do not depend on its batch
companions) and checks every training batch against it.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor, nn

from ..core.outputs import DETECTIONS, FEATURES, KEYPOINT_OUTPUTS, MASK_OUTPUTS, PER_ANCHOR_OUTPUTS, ROI_OUTPUTS, DenseOutputs
from ..data.coco import CocoDetectionDataset, collate_detection
from ..data.mixing import MixedDetectionDataset
from ..data.transforms import DetectionTransform

FORMAT_VERSION = 1
DTYPES = {"float16": np.float16, "float32": np.float32}
MANIFEST = "manifest.json"
_UNCACHEABLE_OUTPUTS = ROI_OUTPUTS | MASK_OUTPUTS | KEYPOINT_OUTPUTS


class IncompleteCacheError(RuntimeError):
    """A cache folder whose manifest or files are missing or truncated."""


@dataclass(frozen=True)
class CachePlan:
    """What one teacher's cache must hold for a distiller."""

    outputs: tuple[str, ...]  # per-anchor outputs (cls_logits, ...), sorted
    levels: tuple[str, ...]  # the teacher's feature levels, sorted; empty without feature terms


# --- what can be cached --------------------------------------------------------------------
def offline_blockers(distiller: nn.Module) -> list[str]:
    """Every setting of ``distiller`` that rules out a teacher-output cache, with its fix."""
    blockers = []
    roi_terms = [t for t in distiller.terms if t.on in _UNCACHEABLE_OUTPUTS]
    if roi_terms:
        names = ", ".join(f"{t.name!r} (on {t.on})" for t in roi_terms)
        blockers.append(
            f"RoI-level terms {names}: the teacher's RoI heads run on the proposals the student sampled "
            "in this step, which change as the student trains and are drawn at random, so they cannot be "
            "computed ahead of time. Drop these terms or distill online."
        )
    detection_terms = [t for t in distiller.terms if t.on == DETECTIONS]
    if detection_terms:
        names = ", ".join(repr(t.name) for t in detection_terms)
        blockers.append(
            f"terms on the teacher's detections {names}: the cache stores per-anchor outputs and features, not "
            "post-processed detections. Drop these terms or distill online."
        )
    if distiller.self_distillation_mode is not None:
        blockers.append(
            f"self-distillation ({distiller.self_distillation_mode}): the teacher is a moving copy of the "
            "student and changes during training. Distill online."
        )
    if distiller.teacher_geometry != "student":
        blockers.append(
            f"teacher_geometry={distiller.teacher_geometry!r}: the cache stores outputs on the student's "
            "resized batch. Use teacher_geometry='student' or distill online."
        )
    min_size = tuple(distiller.student_adapter.model.transform.min_size)
    if len(min_size) > 1:
        blockers.append(
            f"the student's transform draws a random min_size from {min_size} every batch (multi-scale "
            "training), so the geometry the teacher sees is not fixed per image. Build the student with one "
            "min_size or distill online."
        )
    return blockers


def check_offline(distiller: nn.Module) -> None:
    """Raise a ValueError listing every setting that rules out a teacher-output cache."""
    blockers = offline_blockers(distiller)
    if blockers:
        raise ValueError("Cannot distill from a teacher-output cache:\n  - " + "\n  - ".join(blockers))


def check_replayable(dataset: Any) -> None:
    """Refuse a dataset whose images are not the same every time they are loaded."""
    if isinstance(dataset, MixedDetectionDataset):
        raise ValueError(
            f"Cannot cache teacher outputs over a MixedDetectionDataset (MixUp p={dataset.mixup_prob}, "
            f"CutMix p={dataset.cutmix_prob}): every epoch mixes each image with a new random partner, so the "
            "teacher's input is never the same twice. Set augment.mixup_prob=0 and augment.cutmix_prob=0 "
            "(pass the unwrapped dataset), or distill online."
        )
    if not isinstance(dataset, CocoDetectionDataset):
        raise TypeError(
            f"A teacher-output cache is keyed by image ids and files; it needs a CocoDetectionDataset, "
            f"got {type(dataset).__name__}."
        )
    transform = dataset.transforms
    if transform is None:
        return
    if not isinstance(transform, DetectionTransform):
        raise ValueError(
            f"Cannot cache teacher outputs over a dataset with a custom transforms callable ({transform!r}): "
            "densekd cannot tell whether it gives the same image every time. Use transforms=None (or a "
            "DetectionTransform without augmentation), or distill online."
        )
    active = [
        f"{name}={value}" for name, value in
        (("hflip", transform.hflip), ("scale_jitter", transform.scale_jitter), ("color_jitter", transform.color_jitter))
        if value > 0
    ]  # fmt: skip
    if active:
        raise ValueError(
            f"Cannot cache teacher outputs over random augmentation ({', '.join(active)} at strength "
            f"{transform.strength}): the student sees a different image every epoch. Flips are not replayed "
            "either: a CNN teacher is not mirror-symmetric, so mirrored outputs would be inexact. Set "
            f"{', '.join(a.split('=')[0] for a in active)} to 0, or distill online."
        )


def cache_plan(distiller: nn.Module, index: int) -> CachePlan:
    """The outputs and feature levels teacher ``index`` must provide to ``distiller``."""
    outputs = tuple(sorted(set(distiller._teacher_needs) & PER_ANCHOR_OUTPUTS))
    levels = {teacher_level for pairs in distiller.level_pairs.values() for _, teacher_level in pairs[index]}
    return CachePlan(outputs, tuple(sorted(levels)))


# --- the key ---------------------------------------------------------------------------------
def _sha256(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def weights_hash(model: nn.Module) -> str:
    """SHA-256 of every parameter and buffer of ``model`` (names, dtypes, shapes, bytes)."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _transform_settings(model: nn.Module) -> dict[str, Any]:
    transform = model.transform
    return {
        "min_size": list(transform.min_size),
        "max_size": transform.max_size,
        "image_mean": list(transform.image_mean),
        "image_std": list(transform.image_std),
        "size_divisible": transform.size_divisible,
        "fixed_size": None if transform.fixed_size is None else list(transform.fixed_size),
    }


def _teacher_identity(distiller: nn.Module, index: int) -> dict[str, Any]:
    """The part of the key a cache can re-check against a distiller without the dataset."""
    adapter = distiller.teacher_adapters[index]
    mean, std = adapter.image_mean_std
    plan = cache_plan(distiller, index)
    return {
        "teacher": {"class": type(adapter.model).__name__, "weights": weights_hash(adapter.model), "mean": mean, "std": std},
        "student_transform": _transform_settings(distiller.student_adapter.model),
        "outputs": list(plan.outputs),
        "levels": list(plan.levels),
    }


def _images_fingerprint(dataset: CocoDetectionDataset) -> str:
    digest = hashlib.sha256()
    for image_id in dataset.image_ids:
        file_name = dataset.coco.imgs[image_id]["file_name"]
        stat = (dataset.image_dir / file_name).stat()
        digest.update(f"{image_id}:{file_name}:{stat.st_size}:{stat.st_mtime_ns};".encode())
    return digest.hexdigest()


def cache_key(distiller: nn.Module, index: int, dataset: CocoDetectionDataset, dtype: str) -> tuple[str, dict[str, Any]]:
    """(key, the payload it hashes) of teacher ``index``'s outputs over ``dataset``."""
    payload = {
        "format": FORMAT_VERSION,
        **_teacher_identity(distiller, index),
        # check_replayable lets through only transforms that leave the image as it is
        "data": {"images": _images_fingerprint(dataset), "num_images": len(dataset), "transform": "identity"},
        "dtype": dtype,
    }
    return _sha256(payload)[:20], payload


# --- the cache ---------------------------------------------------------------------------------
class TeacherOutputCache:
    """One teacher's outputs over a dataset, read from ``folder`` (memory-mapped).

    Attributes: ``key``, ``dtype`` ("float16"/"float32"), ``outputs`` and ``levels`` stored,
    ``image_size`` and ``batch_shape`` (H, W) every image was seen at, ``size_bytes`` on disk,
    ``build_seconds``, ``num_images``; ``built`` is True when this process built it.
    """

    def __init__(self, folder: Union[str, Path]):
        self.folder = Path(folder)
        manifest_path = self.folder / MANIFEST
        if not manifest_path.is_file():
            raise IncompleteCacheError(f"{self.folder} has no {MANIFEST}: an interrupted or foreign folder.")
        try:
            manifest = json.loads(manifest_path.read_text())
        except json.JSONDecodeError as error:
            raise IncompleteCacheError(f"{manifest_path} is not valid JSON ({error}).") from None
        if manifest.get("format") != FORMAT_VERSION:
            raise IncompleteCacheError(f"{self.folder} has format {manifest.get('format')}, expected {FORMAT_VERSION}.")
        for file_name, size in manifest["files"].items():
            path = self.folder / file_name
            actual = path.stat().st_size if path.is_file() else None
            if actual != size:
                raise IncompleteCacheError(f"{path} has {actual} bytes, the manifest says {size}: the folder is incomplete.")
        self.manifest = manifest
        self.key: str = manifest["key"]
        self.dtype: str = manifest["payload"]["dtype"]
        self.outputs: tuple[str, ...] = tuple(manifest["payload"]["outputs"])
        self.levels: tuple[str, ...] = tuple(manifest["payload"]["levels"])
        self.image_size: tuple[int, int] = tuple(manifest["image_size"])
        self.batch_shape: tuple[int, int] = tuple(manifest["batch_shape"])
        self.build_seconds: float = manifest["build_seconds"]
        self.size_bytes: int = sum(manifest["files"].values()) + manifest_path.stat().st_size
        self.num_images = len(manifest["image_ids"])
        self.built = False
        self._rows = {int(image_id): row for row, image_id in enumerate(manifest["image_ids"])}
        self._arrays = {name: np.load(self.folder / f"{name}.npy", mmap_mode="r") for name in self._array_names()}

    def _array_names(self) -> list[str]:
        return [f"{FEATURES}.{level}" for level in self.levels] + list(self.outputs)

    def __repr__(self) -> str:
        return (
            f"TeacherOutputCache({self.folder}, {self.num_images} images, {self.dtype}, outputs={list(self.outputs)}, "
            f"levels={list(self.levels)}, {self.size_bytes} bytes)"
        )

    # --- use ----------------------------------------------------------------------------
    def check_serves(self, distiller: nn.Module, index: int) -> None:
        """Refuse to stand in for teacher ``index`` of ``distiller`` unless it was built for that
        teacher's weights, the student's input transform and (at least) the outputs and levels
        its terms need."""
        check_offline(distiller)
        wanted = _teacher_identity(distiller, index)
        stored = self.manifest["payload"]
        problems = []
        if wanted["teacher"] != stored["teacher"]:
            problems.append("it was built from another teacher (weights, class or normalization differ)")
        if wanted["student_transform"] != stored["student_transform"]:
            problems.append(
                f"the student's input transform differs (cache {stored['student_transform']}, "
                f"student {wanted['student_transform']})"
            )
        missing = sorted(set(wanted["outputs"]) - set(self.outputs)) + [
            f"features level {level!r}" for level in sorted(set(wanted["levels"]) - set(self.levels))
        ]
        if missing:
            problems.append(f"it lacks {', '.join(missing)}")
        if problems:
            raise ValueError(
                f"The teacher-output cache {self.folder} cannot stand in for teacher {index}: {'; '.join(problems)}. "
                "Build it for this distiller with teacher_caches_for()."
            )

    def outputs_for(self, image_ids: Sequence[int], student: DenseOutputs) -> DenseOutputs:
        """The teacher's outputs for a batch of images, as float32 on the student's device,
        in the batch order (``student`` gives the geometry to check and the device)."""
        wrong = [tuple(size) for size in student.image_sizes if tuple(size) != self.image_size]
        if wrong or tuple(student.batch_shape) != self.batch_shape:
            raise RuntimeError(
                f"The student's batch (images {[tuple(s) for s in student.image_sizes]}, padded to "
                f"{tuple(student.batch_shape)}) does not have the geometry the teacher-output cache was built "
                f"with (every image {self.image_size}, padded to {self.batch_shape}). Feed the training images "
                "unaugmented at the size the cache was built with, or distill online."
            )
        missing = [image_id for image_id in image_ids if int(image_id) not in self._rows]
        if missing:
            raise KeyError(
                f"Image ids {missing[:8]} are not in the teacher-output cache {self.folder} ({self.num_images} "
                "images); it covers the dataset it was built over. Build it over the training set."
            )
        rows = [self._rows[int(image_id)] for image_id in image_ids]
        device = next(iter(student.features.values())).device

        def read(name: str) -> Tensor:
            values = np.ascontiguousarray(self._arrays[name][rows])  # (N, ...) in batch order
            return torch.from_numpy(values).to(device=device, dtype=torch.float32)

        outputs = DenseOutputs(image_sizes=list(student.image_sizes), batch_shape=tuple(student.batch_shape))
        outputs.features = {level: read(f"{FEATURES}.{level}") for level in self.levels}
        for name in self.outputs:
            setattr(outputs, name, read(name))
        return outputs


# --- building -----------------------------------------------------------------------------------
def _per_image_arrays(outputs: DenseOutputs, plan: CachePlan) -> dict[str, Tensor]:
    arrays = {f"{FEATURES}.{level}": outputs.features[level] for level in plan.levels}  # (N, C, H_l, W_l)
    arrays.update({name: getattr(outputs, name) for name in plan.outputs})  # (N, HWA, ...)
    return arrays


def _fsync(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


@torch.no_grad()
def _write(distiller: nn.Module, index: int, dataset: CocoDetectionDataset, folder: Path,
           dtype: str, batch_size: int, payload: dict[str, Any], key: str) -> None:  # fmt: skip
    """Run teacher ``index`` over ``dataset`` and write the arrays and manifest into ``folder``."""
    started = time.perf_counter()
    plan = cache_plan(distiller, index)
    device = next(distiller.teachers[index].parameters()).device
    # The student's own resize/normalize/pad (eval mode: no random scale, no RNG draws).
    transform = copy.deepcopy(distiller.student_adapter.model.transform).eval()
    image_ids: list[int] = []
    files: dict[str, np.memmap] = {}
    geometry: Optional[tuple[tuple[int, int], tuple[int, int]]] = None
    for start in range(0, len(dataset), batch_size):
        images, targets = collate_detection([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        batch, _ = transform([image.to(device) for image in images])
        ids = [int(t["image_id"]) for t in targets]
        sizes = {tuple(size) for size in batch.image_sizes}
        if geometry is None:
            geometry = (tuple(batch.image_sizes[0]), tuple(batch.tensors.shape[-2:]))
        if sizes != {geometry[0]}:
            odd = [i for i, size in zip(ids, batch.image_sizes) if tuple(size) != geometry[0]]
            raise ValueError(
                f"Images {odd[:8]} reach the student at {sorted(sizes - {geometry[0]})} (H, W), image "
                f"{image_ids[0] if image_ids else ids[0]} at {geometry[0]}: a teacher-output cache needs every "
                "image at one size, because per-anchor outputs and features depend on the padded batch. Resize "
                "the dataset to one size, or distill online."
            )
        # The online code path itself (teacher_geometry "student", checked): same inputs, same needs.
        no_rois = DenseOutputs(image_sizes=[tuple(s) for s in batch.image_sizes], batch_shape=geometry[1])
        outputs = distiller._run_teacher(index, images, batch, no_rois)
        for name, values in _per_image_arrays(outputs, plan).items():
            stored = values.to(torch.float16 if dtype == "float16" else torch.float32)
            if not torch.isfinite(stored).all() and torch.isfinite(values).all():
                raise ValueError(
                    f"The teacher's {name} exceed the float16 range (|value| > 65504) on images {ids}; "
                    "build the cache with dtype float32."
                )
            if name not in files:
                shape = (len(dataset), *values.shape[1:])
                files[name] = np.lib.format.open_memmap(folder / f"{name}.npy", mode="w+", dtype=DTYPES[dtype], shape=shape)
            files[name][start : start + len(ids)] = stored.cpu().numpy()
        image_ids += ids
    for array in files.values():
        array.flush()
    files.clear()  # closes the memory maps
    sizes = {}
    for path in sorted(folder.glob("*.npy")):
        _fsync(path)
        sizes[path.name] = path.stat().st_size
    manifest = {
        "format": FORMAT_VERSION,
        "key": key,
        "payload": payload,
        "image_ids": image_ids,
        "image_size": list(geometry[0]),
        "batch_shape": list(geometry[1]),
        "files": sizes,
        "build_seconds": time.perf_counter() - started,
    }
    (folder / MANIFEST).write_text(json.dumps(manifest))
    _fsync(folder / MANIFEST)


def build_teacher_cache(
    distiller: nn.Module,
    index: int,
    dataset: CocoDetectionDataset,
    root: Union[str, Path],
    dtype: str = "float16",
    batch_size: int = 8,
) -> TeacherOutputCache:
    """Run teacher ``index`` of ``distiller`` once over ``dataset`` and store what its terms need
    under ``root/<key>`` (written atomically). An existing complete folder under the key is
    reused; an incomplete one is replaced."""
    if dtype not in DTYPES:
        raise ValueError(f"Teacher-cache dtype must be one of {sorted(DTYPES)}, got {dtype!r}.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    check_offline(distiller)
    check_replayable(dataset)
    if len(dataset) == 0:
        raise ValueError("Cannot build a teacher-output cache over an empty dataset.")
    key, payload = cache_key(distiller, index, dataset, dtype)
    root = Path(root)
    final = root / key
    if final.exists():
        try:
            return TeacherOutputCache(final)
        except IncompleteCacheError:
            shutil.rmtree(final)
    root.mkdir(parents=True, exist_ok=True)
    temporary = root / f".{key}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    temporary.mkdir()
    try:
        _write(distiller, index, dataset, temporary, dtype, batch_size, payload, key)
        try:
            os.rename(temporary, final)  # atomic: the folder appears complete or not at all
        except OSError:
            if not (final / MANIFEST).is_file():
                raise
            shutil.rmtree(temporary)  # another process finished the same cache first
            return TeacherOutputCache(final)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    descriptor = os.open(root, os.O_RDONLY)
    try:
        os.fsync(descriptor)  # make the rename durable
    finally:
        os.close(descriptor)
    cache = TeacherOutputCache(final)
    cache.built = True
    return cache


def teacher_caches_for(
    distiller: nn.Module,
    dataset: CocoDetectionDataset,
    root: Union[str, Path],
    dtype: str = "float16",
    batch_size: int = 8,
) -> list[TeacherOutputCache]:
    """One cache per teacher of ``distiller`` over ``dataset``: reused from ``root`` when its key
    matches, built otherwise. Pass the result to ``distiller.use_teacher_cache``."""
    return [build_teacher_cache(distiller, i, dataset, root, dtype, batch_size) for i in range(len(distiller.teachers))]
