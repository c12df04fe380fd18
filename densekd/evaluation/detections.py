"""Turn torchvision detector outputs into COCO result records, and save them.

A torchvision detector in eval mode returns one dict per image::

    boxes  (D, 4)       float, xyxy in original-image pixels (after GeneralizedRCNNTransform.postprocess)
    scores (D,)         float
    labels (D,)         int64, contiguous training labels 1..K (0 is background and never returned)
    masks  (D, 1, H, W) float probabilities in [0, 1] (Mask R-CNN only)

COCO's evaluators want one record per detection, with the dataset's *original* category id
(COCO's ids run 1..90 with gaps; LVIS's 1..1203), the box as ``[x, y, width, height]`` and,
for mask AP, the mask as compressed RLE::

    {"image_id": int, "category_id": int, "bbox": [x, y, w, h], "score": float,
     "segmentation": {"size": [H, W], "counts": str}}   # only with with_masks=True

``counts`` is decoded to ``str`` so the records can go through ``json.dump`` unchanged.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Dict, List, Mapping, Sequence, Union

import numpy as np
from pycocotools import mask as mask_utils

__all__ = ["to_coco_results", "save_results"]


def _to_numpy(x: Any) -> np.ndarray:
    """A torch tensor (any device, with or without grad) or array-like as a numpy array."""
    if hasattr(x, "detach"):  # torch.Tensor, without importing torch here
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _unknown_label_error(label: int, label_to_category_id: Mapping[int, int], image_id: int) -> ValueError:
    known = sorted(int(k) for k in label_to_category_id)
    return ValueError(
        f"image {image_id}: predicted label {label} has no entry in label_to_category_id "
        f"(known labels: {known}). Build the mapping from the dataset the model was trained on; "
        "torchvision detectors predict contiguous labels 1..K"
    )


def _encode_masks(masks: np.ndarray, threshold: float, image_id: int) -> List[Dict[str, Any]]:
    """(D, 1, H, W) or (D, H, W) probabilities -> D compressed RLEs with str counts.

    A pixel belongs to the instance when its probability is ``> threshold`` (torchvision's
    reference evaluation uses ``masks > 0.5``).
    """
    if masks.ndim == 4:
        if masks.shape[1] != 1:
            raise ValueError(f"image {image_id}: masks must be (D, 1, H, W), got shape {masks.shape}")
        masks = masks[:, 0]  # (D, 1, H, W) -> (D, H, W)
    elif masks.ndim != 3:
        raise ValueError(f"image {image_id}: masks must be (D, 1, H, W) or (D, H, W), got shape {masks.shape}")
    if masks.shape[0] == 0:
        return []
    binary = np.asfortranarray((masks > threshold).transpose(1, 2, 0).astype(np.uint8))  # (H, W, D), Fortran order
    rles = mask_utils.encode(binary)
    for rle in rles:
        rle["counts"] = rle["counts"].decode("ascii")
    return rles


def to_coco_results(
    predictions: Sequence[Mapping[str, Any]],
    image_ids: Sequence[int],
    label_to_category_id: Mapping[int, int],
    with_masks: bool = False,
    mask_threshold: float = 0.5,
) -> List[Dict[str, Any]]:
    """Convert torchvision detector outputs into COCO result records.

    Args:
        predictions: one dict per image, as returned by a torchvision detector in eval mode:
            ``boxes`` (D, 4) xyxy in original-image pixels, ``scores`` (D,), ``labels`` (D,)
            contiguous 1..K, and, when ``with_masks``, ``masks`` (D, 1, H, W) probabilities.
            Torch tensors (any device) and numpy arrays are both accepted.
        image_ids: the dataset's image id for each prediction, same length as ``predictions``.
        label_to_category_id: training label -> the dataset's original category id, e.g.
            ``{1: 1, 2: 2, ..., 80: 90}`` for COCO.
        with_masks: add ``segmentation`` (compressed RLE, ``counts`` as ``str``) from ``masks``.
        mask_threshold: a mask pixel is on where its probability is ``> mask_threshold``.

    Returns:
        one record per detection, in image order then detection order: ``image_id``,
        ``category_id``, ``bbox`` ``[x, y, w, h]`` (python floats), ``score`` and, with masks,
        ``segmentation``.

    Raises:
        ValueError: mismatched lengths or shapes, a label missing from ``label_to_category_id``
            (the message lists the known labels), or ``with_masks`` without ``masks``.
    """
    if len(predictions) != len(image_ids):
        raise ValueError(
            f"got {len(predictions)} predictions but {len(image_ids)} image_ids; pass one image id per prediction"
        )
    results: List[Dict[str, Any]] = []
    for pred, image_id in zip(predictions, image_ids):
        image_id = int(image_id)
        boxes = _to_numpy(pred["boxes"]).astype(np.float64).reshape(-1, 4)  # (D, 4) xyxy
        scores = _to_numpy(pred["scores"]).astype(np.float64).reshape(-1)  # (D,)
        labels = _to_numpy(pred["labels"]).astype(np.int64).reshape(-1)  # (D,)
        if not len(boxes) == len(scores) == len(labels):
            raise ValueError(
                f"image {image_id}: boxes, scores and labels disagree on the number of detections "
                f"({len(boxes)}, {len(scores)}, {len(labels)})"
            )
        # xyxy -> xywh, (D, 4)
        xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)

        rles: List[Dict[str, Any]] = []
        if with_masks:
            if "masks" not in pred:
                raise ValueError(
                    f"image {image_id}: with_masks=True but the prediction has no 'masks' "
                    f"(keys: {sorted(pred)}); use a mask model or with_masks=False"
                )
            masks = _to_numpy(pred["masks"])
            if masks.shape[0] != len(boxes):
                raise ValueError(
                    f"image {image_id}: {masks.shape[0]} masks for {len(boxes)} boxes; they must match one to one"
                )
            rles = _encode_masks(masks, mask_threshold, image_id)

        for d in range(len(boxes)):
            label = int(labels[d])
            if label not in label_to_category_id:
                raise _unknown_label_error(label, label_to_category_id, image_id)
            record: Dict[str, Any] = {
                "image_id": image_id,
                "category_id": int(label_to_category_id[label]),
                "bbox": [float(v) for v in xywh[d]],
                "score": float(scores[d]),
            }
            if with_masks:
                record["segmentation"] = rles[d]
            results.append(record)
    return results


def save_results(results: Sequence[Mapping[str, Any]], path: Union[str, "os.PathLike[str]"]) -> None:
    """Write COCO result records to ``path`` as JSON, atomically.

    The JSON goes to a temporary file in the same directory, which then replaces ``path``
    with :func:`os.replace`; a crash mid-write never leaves a truncated results file behind.
    Missing parent directories are created.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp_path = tempfile.mkstemp(prefix=".tmp_", suffix=".json", dir=directory)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(list(results), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        raise
