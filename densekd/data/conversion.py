"""What the YOLO and Pascal VOC readers share: building the COCO document, collecting bad
records, and writing the result into the cache.

A reader (:mod:`densekd.data.yolo`, :mod:`densekd.data.voc`) walks one split, adds images and
boxes to a :class:`CocoDocumentBuilder`, and reports bad records to a :class:`BadRecords`.
:func:`finish_conversion` then raises the first problem (one line: file, line or record, fix)
or, with ``skip_bad``, keeps the good records and logs what was dropped; it writes the document
to ``<cache>/converted/<format>-<split>-<hash>.json``, where the hash is that of the document
itself, so an unchanged dataset maps to the same file (written once, atomically) and a changed
one to a new file. Everything downstream (:func:`~densekd.data.validation.validate_coco_file`,
:class:`~densekd.data.coco.CocoDetectionDataset`, COCO/LVIS evaluation) reads that file as any
COCO-format file.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

from densekd._cache import cache_root
from densekd.data.validation import BadDatasetError, DatasetReport, RecordId

__all__ = ["ConvertedDataset", "default_conversion_cache", "checked_class_names"]

_LOGGER = logging.getLogger(__name__)


@dataclass(frozen=True)
class ConvertedDataset:
    """One split of a YOLO or VOC dataset as a COCO-format file.

    Attributes:
        annotation_file: the COCO-format JSON; pass it with ``image_dir`` to
            :class:`~densekd.data.CocoDetectionDataset` (or ``--train-ann`` / ``--train-images``).
        image_dir: the folder that the records' ``file_name`` are relative to.
        categories: class names in category-id order: class ``i`` (0-based, as the source
            numbers them) is category id ``i + 1``. Pass them as ``names`` when converting
            another split so that both splits share the ids.
        report: what ``skip_bad`` dropped, per kind of problem, with examples such as
            ``labels/train/a.txt:3``; ``report.clean`` when nothing was dropped.
    """

    annotation_file: Path
    image_dir: Path
    categories: List[str]
    report: DatasetReport


def default_conversion_cache() -> Path:
    """``$DENSEKD_CACHE/converted`` if ``DENSEKD_CACHE`` is set, else ``~/.cache/densekd/converted``."""
    return cache_root() / "converted"


def checked_class_names(names: Any, source: str) -> List[str]:
    """``names`` as a list of distinct non-empty strings (integers become strings), or a one-line
    :class:`BadDatasetError` naming ``source`` (where the names came from) and the fix."""
    if isinstance(names, (str, bytes)) or not isinstance(names, Sequence) or not names:
        raise BadDatasetError(f"{source}: the class names must be a non-empty list (class 0 first), got {names!r}.")
    checked = []
    for index, name in enumerate(names):
        if type(name) is int:
            name = str(name)
        if not isinstance(name, str) or not name.strip():
            raise BadDatasetError(
                f"{source}: class name {index} is {name!r}; every class needs a non-empty name (in YAML, quote names "
                "such as 'yes', 'no', 'on', 'off' or 'null', which YAML reads as booleans or null)."
            )
        checked.append(name.strip())
    repeated = sorted({name for name in checked if checked.count(name) > 1})
    if repeated:
        raise BadDatasetError(f"{source}: class name(s) {', '.join(map(repr, repeated))} appear more than once; "
                              "give each class its own name.")  # fmt: skip
    return checked


class BadRecords:
    """Bad images and boxes met while converting one split, by kind; the first message is kept.

    ``where`` identifies the record in the report (e.g. ``labels/train/a.txt:3``); ``message``
    is one line that names the file and the record, then the fix.
    """

    def __init__(self, source: Path) -> None:
        self.source = source
        self.images: Dict[str, List[RecordId]] = defaultdict(list)
        self.boxes: Dict[str, List[RecordId]] = defaultdict(list)
        self.first_message: Optional[str] = None

    def image(self, kind: str, where: str, message: str) -> None:
        self.images[kind].append(where)
        self.first_message = self.first_message or message

    def box(self, kind: str, where: str, message: str) -> None:
        self.boxes[kind].append(where)
        self.first_message = self.first_message or message

    def report(self, images_kept: int, boxes_kept: int) -> DatasetReport:
        return DatasetReport(self.source, images_kept, boxes_kept, dict(self.images), dict(self.boxes))


class CocoDocumentBuilder:
    """A COCO-format document grown one image and one box at a time.

    Image ids are 1, 2, ... in the order images are added, annotation ids likewise; class
    ``i`` of ``names`` is category id ``i + 1``. Boxes are COCO ``[x, y, width, height]`` in pixels.
    """

    def __init__(self, names: Sequence[str]) -> None:
        self.categories = [{"id": index + 1, "name": name} for index, name in enumerate(names)]
        self.images: List[Dict[str, Any]] = []
        self.annotations: List[Dict[str, Any]] = []

    def add_image(self, file_name: str, width: int, height: int) -> int:
        image_id = len(self.images) + 1
        self.images.append({"id": image_id, "file_name": file_name, "width": width, "height": height})
        return image_id

    def add_box(self, image_id: int, class_index: int, box: Sequence[float], iscrowd: bool = False) -> None:
        x, y, w, h = (float(v) for v in box)
        self.annotations.append({
            "id": len(self.annotations) + 1, "image_id": image_id, "category_id": class_index + 1,
            "bbox": [x, y, w, h], "area": w * h, "iscrowd": int(iscrowd),
        })  # fmt: skip

    def document(self, info: Dict[str, str]) -> Dict[str, Any]:
        return {"info": info, "images": self.images, "annotations": self.annotations, "categories": self.categories}


def _write_once(document: Dict[str, Any], folder: Path, stem: str) -> Path:
    """``folder/<stem>-<hash>.json`` holding ``document``, written (temp file, fsync, os.replace)
    only when absent: the name is the content's hash, so an existing file already holds it."""
    payload = json.dumps(document, sort_keys=True, separators=(",", ":")).encode("utf-8")
    path = folder / f"{stem}-{hashlib.sha256(payload).hexdigest()[:16]}.json"
    if path.is_file():
        return path  # same content: keep the file (and its mtime, which the teacher cache keys on)
    folder.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(payload)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def finish_conversion(
    builder: CocoDocumentBuilder,
    bad: BadRecords,
    *,
    data_format: str,
    split: str,
    image_dir: Path,
    skip_bad: bool,
    cache_dir: Union[str, Path, None],
) -> ConvertedDataset:
    """Raise the first bad record (unless ``skip_bad``), else write the document and return it.

    With ``skip_bad``, what was dropped reaches the user twice: as a logged warning (the
    report's summary, as :class:`~densekd.data.CocoDetectionDataset` logs its own) and as
    ``ConvertedDataset.report``.
    """
    report = bad.report(len(builder.images), len(builder.annotations))
    if bad.first_message is not None and not skip_bad:
        raise BadDatasetError(
            f"{bad.first_message} Alternatively, pass skip_bad=True (--skip-bad) to drop bad records (here "
            f"{report.num_dropped_images} image(s) and {report.num_dropped_annotations} box(es)) and report them."
        )
    if not report.clean:
        _LOGGER.warning(report.summary())
    folder = default_conversion_cache() if cache_dir is None else Path(cache_dir).expanduser()
    info = {"description": f"{data_format} split {split!r} of {bad.source}, converted by densekd", "format": data_format}
    safe_split = re.sub(r"[^A-Za-z0-9_.-]", "_", split)
    path = _write_once(builder.document(info), folder, f"{data_format}-{safe_split}")
    return ConvertedDataset(path, image_dir, [c["name"] for c in builder.categories], report)
