"""COCO / LVIS-format detection and instance-segmentation dataset for torchvision detectors.

:class:`CocoDetectionDataset` reads images plus a COCO-format annotation file and
returns what torchvision's detection models take in training::

    image   float32 tensor (3, H, W), values in [0, 1]
    target  {"boxes":    float32 (M, 4)  xyxy, pixels
             "labels":   int64   (M,)    contiguous 1..K (0 is background)
             "image_id": int             the file's image id
             "area":     float32 (M,)    the annotation's "area"
             "iscrowd":  int64   (M,)    always 0 (crowd annotations are dropped)
             "masks":    uint8   (M, H, W)   only with with_masks=True}

Category ids in the file may be non-contiguous (COCO uses 1..90 with gaps); they
are mapped to labels 1..K in sorted id order.  Crowd annotations stay in the
file for evaluation but never reach training targets.

The file and the images it names are checked at construction
(:mod:`densekd.data.validation`): a bad record raises :class:`BadDatasetError`
naming it, or is dropped with ``skip_bad=True`` and counted in ``dataset.report``.
"""

from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from pycocotools.coco import COCO
from torch import Tensor

from densekd.data.images import decode_rgb
from densekd.data.long_tail import lvis_frequency_of_counts
from densekd.data.validation import BadDatasetError, DatasetFileNotFoundError, DatasetReport, validate_coco_file

__all__ = ["CocoDetectionDataset", "collate_detection"]

NumpyTarget = Dict[str, Any]
Transform = Callable[[np.ndarray, NumpyTarget], Tuple[np.ndarray, NumpyTarget]]

_PER_INSTANCE_KEYS = ("boxes", "labels", "area", "iscrowd", "masks")


_LOGGER = logging.getLogger(__name__)
_LOGGED_REPORTS: set = set()  # summaries already logged: a dataset built once per phase reports once


def _coco_quietly(document: Dict[str, Any]) -> COCO:
    """A COCO index over an already-validated document (pycocotools prints progress; keep it quiet)."""
    coco = COCO()
    coco.dataset = document
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _log_once(report: DatasetReport) -> None:
    summary = report.summary()
    if not report.clean and summary not in _LOGGED_REPORTS:
        _LOGGED_REPORTS.add(summary)
        _LOGGER.warning(summary)


def _keep_instances(target: NumpyTarget, keep: np.ndarray) -> NumpyTarget:
    """Index every per-instance array of ``target`` by the boolean ``keep`` (M,)."""
    return {k: (np.asarray(v)[keep] if k in _PER_INSTANCE_KEYS else v) for k, v in target.items()}


def _valid_boxes(boxes: np.ndarray) -> np.ndarray:
    """(M,) bool: boxes (M, 4) xyxy with positive width and height."""
    return (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])


class CocoDetectionDataset(torch.utils.data.Dataset):
    """Images + COCO / LVIS annotations -> ``(image, target)`` for torchvision detectors.

    Args:
        image_dir: folder holding the images named by each image's ``file_name``.
        annotation_file: COCO-format JSON (LVIS fields are read when present).
        transforms: optional ``(image, target) -> (image, target)`` callable applied to
            numpy data before conversion to tensors.  ``image`` is uint8 (H, W, 3) RGB;
            ``target`` has ``boxes`` float32 (M, 4) xyxy pixels, ``labels`` int64 (M,),
            ``area`` float32 (M,), ``iscrowd`` int64 (M,), ``image_id`` int and, with
            masks, ``masks`` uint8 (M, H, W).  It must return the same format (it may
            drop instances, as long as every per-instance array drops the same ones).
        with_masks: also return instance masks (decoded from polygons or RLE).
        category_ids: keep only these category ids (labels follow their sorted order);
            annotations of other categories are ignored.  Default: all categories.
        skip_bad: drop bad records (a bad image with its annotations, a bad annotation
            alone) instead of raising :class:`BadDatasetError`; ``report`` says what went.

    Attributes:
        num_classes: K, foreground classes (torchvision's ``num_classes`` is K + 1).
        categories: category names in label order (``categories[label - 1]``).
        label_to_category_id / category_id_to_label: the contiguous mapping.
        image_counts / annotation_counts: per class, in label order, from non-crowd
            annotations: images containing the class / its annotations.
        frequency_groups: LVIS 'r' / 'c' / 'f' per class in label order when every
            category carries ``frequency``, else None.
        coco: the underlying ``pycocotools.coco.COCO`` (for evaluation), good records only.
        report: :class:`~densekd.data.validation.DatasetReport`: records dropped per problem
            (``skip_bad``) and boxes clipped to their image; logged once when not empty.

    Raises:
        BadDatasetError: (a ``ValueError``) the file is not a usable COCO file, or a record
            is bad and ``skip_bad`` is False; ``DatasetFileNotFoundError`` (also a
            ``FileNotFoundError``) when the folder or the file is missing.
    """

    def __init__(
        self,
        image_dir: Union[str, Path],
        annotation_file: Union[str, Path],
        transforms: Optional[Transform] = None,
        with_masks: bool = False,
        category_ids: Optional[Sequence[int]] = None,
        skip_bad: bool = False,
    ) -> None:
        self.image_dir = Path(image_dir)
        self.annotation_file = Path(annotation_file)
        if not self.image_dir.is_dir():
            raise DatasetFileNotFoundError(f"image folder not found: {self.image_dir}; check the path.")
        self.transforms = transforms
        self.with_masks = with_masks
        document, self.report = validate_coco_file(self.annotation_file, self.image_dir, with_masks, skip_bad)
        _log_once(self.report)
        self.coco = _coco_quietly(document)

        available = sorted(self.coco.cats)
        if category_ids is None:
            chosen = available
        else:
            unknown = sorted(set(category_ids) - set(available))
            if unknown:
                raise ValueError(
                    f"category_ids {unknown} are not in {self.annotation_file}; available ids: {available}"
                )
            chosen = sorted(set(category_ids))
        self.label_to_category_id: Dict[int, int] = {label: cid for label, cid in enumerate(chosen, start=1)}
        self.category_id_to_label: Dict[int, int] = {cid: label for label, cid in self.label_to_category_id.items()}
        self.categories: List[str] = [self.coco.cats[cid]["name"] for cid in chosen]
        self.num_classes = len(chosen)
        frequencies = [self.coco.cats[cid].get("frequency") for cid in chosen]
        self.frequency_groups: Optional[List[str]] = (
            frequencies if chosen and all(f is not None for f in frequencies) else None
        )

        self.image_ids: List[int] = sorted(self.coco.imgs)
        self.image_counts: List[int] = [0] * self.num_classes
        self.annotation_counts: List[int] = [0] * self.num_classes
        for image_id in self.image_ids:
            labels = [self.category_id_to_label[a["category_id"]] for a in self._training_annotations(image_id)]
            for label in labels:
                self.annotation_counts[label - 1] += 1
            for label in set(labels):
                self.image_counts[label - 1] += 1

    def lvis_frequencies(self) -> Dict[int, str]:
        """Category id -> LVIS group ``'r'`` / ``'c'`` / ``'f'``, for evaluating APr / APc / APf.

        The file's ``frequency`` when every category carries one (LVIS files), else derived from
        this split's image counts (:func:`~densekd.data.long_tail.lvis_frequency`): call it on
        the *training* split, as LVIS defines the groups; :attr:`frequency_source` says which.
        """
        groups = self.frequency_groups or lvis_frequency_of_counts(self.image_counts)
        return {self.label_to_category_id[label]: group for label, group in enumerate(groups, start=1)}

    @property
    def frequency_source(self) -> str:
        """Where :meth:`lvis_frequencies` comes from: the file, or this split's image counts."""
        return "the annotation file" if self.frequency_groups else f"the image counts of {self.annotation_file.name}"

    # ------------------------------------------------------------------ annotations
    def _training_annotations(self, image_id: int) -> List[dict]:
        """Non-crowd annotations of the chosen categories, in file order."""
        return [
            a
            for a in self.coco.imgToAnns.get(image_id, [])
            if not a.get("iscrowd", 0) and a["category_id"] in self.category_id_to_label
        ]

    def image_labels(self) -> List[List[int]]:
        """Sorted distinct labels per image (index-aligned with the dataset), without loading images.

        Counts the annotations that reach training targets (non-crowd; validation keeps
        only boxes with positive width and height); feed it to repeat-factor sampling.
        """
        return [
            sorted({self.category_id_to_label[a["category_id"]] for a in self._training_annotations(image_id)})
            for image_id in self.image_ids
        ]

    def _numpy_target(self, image_id: int, height: int, width: int) -> NumpyTarget:
        annotations = self._training_annotations(image_id)
        boxes = np.array([a["bbox"] for a in annotations], dtype=np.float32).reshape(-1, 4)  # (M, 4) xywh
        boxes[:, 2:] += boxes[:, :2]  # -> xyxy
        boxes[:, 0::2] = boxes[:, 0::2].clip(0, width)
        boxes[:, 1::2] = boxes[:, 1::2].clip(0, height)
        target: NumpyTarget = {
            "boxes": boxes,
            "labels": np.array([self.category_id_to_label[a["category_id"]] for a in annotations], dtype=np.int64),
            "image_id": int(image_id),
            "area": np.array([a.get("area", 0.0) for a in annotations], dtype=np.float32),
            "iscrowd": np.zeros(len(annotations), dtype=np.int64),
        }
        if self.with_masks:
            target["masks"] = self._masks(image_id, annotations, height, width)
        return _keep_instances(target, _valid_boxes(boxes))

    def _masks(self, image_id: int, annotations: List[dict], height: int, width: int) -> np.ndarray:
        """uint8 (M, H, W) from polygons or RLE (validation checked sizes and polygon lengths)."""
        masks = np.zeros((len(annotations), height, width), dtype=np.uint8)
        for i, a in enumerate(annotations):
            masks[i] = self.coco.annToMask(a)
        return masks

    # ------------------------------------------------------------------ Dataset API
    def __len__(self) -> int:
        return len(self.image_ids)

    def image_path(self, image_id: int) -> Path:
        return self.image_dir / self.coco.imgs[image_id]["file_name"]

    def _load_image(self, image_id: int) -> np.ndarray:
        """uint8 (H, W, 3) RGB; a file that fails to decode names its path and image id (also
        from a DataLoader worker, which re-raises the message in the main process)."""
        path = self.image_path(image_id)
        try:
            return decode_rgb(path)
        except FileNotFoundError:
            raise DatasetFileNotFoundError(
                f"image {image_id} not found at {path} (it was there when the dataset was built); check image_dir."
            ) from None
        except Exception as error:  # PIL raises OSError, ValueError, SyntaxError, ... on corrupt files
            raise BadDatasetError(
                f"image {image_id} at {path} (listed in {self.annotation_file}) could not be decoded "
                f"({type(error).__name__}: {error}); the file is corrupt or truncated: replace it, or remove "
                "the image from the annotation file."
            ) from error

    def __getitem__(self, index: int) -> Tuple[Tensor, Dict[str, Any]]:
        image_id = self.image_ids[index]
        image = self._load_image(image_id)
        try:
            target = self._numpy_target(image_id, image.shape[0], image.shape[1])
            if self.transforms is not None:
                image, target = self.transforms(image, target)
                target = _keep_instances(target, _valid_boxes(np.asarray(target["boxes"]).reshape(-1, 4)))
            return self._to_tensors(image, target)
        except Exception as error:
            # Keep the type (a transform bug stays one) but say which image it was; notes are
            # part of the traceback text a DataLoader worker sends back (Python >= 3.11).
            if hasattr(error, "add_note"):
                error.add_note(f"while loading image {image_id} at {self.image_path(image_id)}")
            raise

    @staticmethod
    def _to_tensors(image: np.ndarray, target: NumpyTarget) -> Tuple[Tensor, Dict[str, Any]]:
        height, width = image.shape[:2]
        image_tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255.0)  # (3, H, W)
        out: Dict[str, Any] = {
            "boxes": torch.as_tensor(np.asarray(target["boxes"]), dtype=torch.float32).reshape(-1, 4),
            "labels": torch.as_tensor(np.asarray(target["labels"]), dtype=torch.int64).reshape(-1),
            "image_id": int(target["image_id"]),
            "area": torch.as_tensor(np.asarray(target["area"]), dtype=torch.float32).reshape(-1),
            "iscrowd": torch.as_tensor(np.asarray(target["iscrowd"]), dtype=torch.int64).reshape(-1),
        }
        if "masks" in target:
            masks = np.asarray(target["masks"], dtype=np.uint8)
            out["masks"] = torch.from_numpy(np.ascontiguousarray(masks)).reshape(-1, height, width)
        return image_tensor, out


def collate_detection(batch: Sequence[Tuple[Tensor, Dict[str, Any]]]) -> Tuple[List[Tensor], List[Dict[str, Any]]]:
    """``[(image, target), ...]`` -> ``([image, ...], [target, ...])``, the torchvision detector input."""
    images = [image for image, _ in batch]
    targets = [target for _, target in batch]
    return images, targets
