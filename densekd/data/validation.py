"""Checks a COCO-format annotation file (and the images it names) before training touches it.

:func:`validate_coco_file` reads the JSON and checks every record; problems that would
otherwise surface as a crash deep inside torch, pycocotools or albumentations become one
clear :class:`BadDatasetError` naming the file, the record and the fix.

Two kinds of problem:

* **structural** (always an error): the file is missing or not JSON, the top level is not an
  object, ``images`` / ``annotations`` / ``categories`` is missing or not a list, ``categories``
  is empty, a category has no integer id or name, or two categories share an id (classes
  define the model).
* **bad records** (an error, or dropped with ``skip_bad=True``):

  - images: not an object, no integer ``id``, an id shared by several images (all of them
    are dropped: their annotations cannot be attributed), no ``file_name``, missing on disk,
    unreadable header (corrupt or not an image), float pixels, or ``width`` / ``height``
    different from the file's;
  - annotations (a bad image drops its annotations too): not an object, no integer ``id``,
    an id already used by an earlier annotation, unknown ``image_id`` or ``category_id``,
    ``bbox`` not 4 numbers, not finite, width or height <= 0, or entirely outside the image;
    with masks, a polygon of fewer than 3 points or an odd number of coordinates, an RLE
    whose ``size`` is not the image's [height, width], or no segmentation at all (non-crowd).

Boxes partly outside their image are not errors: the dataset clips them to the image and
the :class:`DatasetReport` counts them. Images are checked up front by opening the file
header only (PIL reads lazily), which is cheap; a file whose pixels fail to decode later is
reported by the dataset with its path and image id.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

from densekd.data.images import UnsupportedImageModeError, image_header

__all__ = ["BadDatasetError", "DatasetFileNotFoundError", "DatasetReport", "validate_coco_file"]

_EXAMPLES = 5  # ids listed per kind of problem in summaries
RecordId = Union[int, str]  # the record's id, or "images[3]" for a record without a usable id


class BadDatasetError(ValueError):
    """A dataset file or record densekd cannot train on; the message names it and the fix."""


class DatasetFileNotFoundError(BadDatasetError, FileNotFoundError):
    """A file or folder the dataset needs does not exist."""


@dataclass
class DatasetReport:
    """What validation dropped (with ``skip_bad``) and clipped, per kind of problem.

    ``dropped_images`` / ``dropped_annotations`` map a problem (e.g. ``"missing on disk"``)
    to the ids of the records dropped for it; ``clipped_boxes`` lists the non-crowd
    annotations whose box was partly outside its image and is clipped to it in targets.
    """

    annotation_file: Path
    images_kept: int = 0
    annotations_kept: int = 0
    dropped_images: Dict[str, List[RecordId]] = field(default_factory=dict)
    dropped_annotations: Dict[str, List[RecordId]] = field(default_factory=dict)
    clipped_boxes: List[int] = field(default_factory=list)

    @property
    def num_dropped_images(self) -> int:
        return sum(len(ids) for ids in self.dropped_images.values())

    @property
    def num_dropped_annotations(self) -> int:
        return sum(len(ids) for ids in self.dropped_annotations.values())

    @property
    def num_clipped_boxes(self) -> int:
        return len(self.clipped_boxes)

    @property
    def clean(self) -> bool:
        """Nothing dropped and nothing clipped."""
        return not (self.dropped_images or self.dropped_annotations or self.clipped_boxes)

    def summary(self) -> str:
        """A few readable lines: counts per problem with example ids."""
        images_total = self.images_kept + self.num_dropped_images
        annotations_total = self.annotations_kept + self.num_dropped_annotations
        parts = []
        if self.dropped_images or self.dropped_annotations:
            parts.append(
                f"skip_bad dropped {self.num_dropped_images} of {images_total} images and "
                f"{self.num_dropped_annotations} of {annotations_total} annotations"
            )
        if self.clipped_boxes:
            parts.append(f"{self.num_clipped_boxes} box(es) partly outside their image are clipped to it")
        lines = [f"{self.annotation_file}: {'; '.join(parts) or 'no problems'}."]
        for title, groups in (("dropped images", self.dropped_images), ("dropped annotations", self.dropped_annotations)):
            if groups:
                lines.append(f"  {title}:")
                lines += [f"    {len(ids)} {kind} ({_examples(ids)})" for kind, ids in groups.items()]
        if self.clipped_boxes:
            lines.append(f"  clipped boxes: {self.num_clipped_boxes} (annotation {_examples(self.clipped_boxes)})")
        return "\n".join(lines)

    __str__ = summary


def _examples(ids: List[RecordId]) -> str:
    shown = ", ".join(str(i) for i in ids[:_EXAMPLES])
    return f"ids {shown}" + (", ..." if len(ids) > _EXAMPLES else "")


def _is_int(value: Any) -> bool:
    return type(value) is int  # JSON integers; excludes bool (an int subclass)


def _is_number(value: Any) -> bool:
    return type(value) in (int, float)


def read_annotation_document(annotation_file: Path) -> Dict[str, Any]:
    """The file's JSON object, with ``images`` / ``annotations`` / ``categories`` lists checked."""
    if not annotation_file.is_file():
        raise DatasetFileNotFoundError(f"annotation file not found: {annotation_file}; check the path.")
    try:
        with annotation_file.open("rb") as handle:
            document = json.load(handle)
    except json.JSONDecodeError as error:
        raise BadDatasetError(
            f"{annotation_file} is not valid JSON ({error.msg} at line {error.lineno}, column {error.colno}); "
            "a COCO annotation file is one JSON object: check that the file is complete (not truncated) "
            "and is the annotation file, not an image or a config."
        ) from None
    except UnicodeDecodeError:
        raise BadDatasetError(
            f"{annotation_file} is not valid JSON (not UTF-8 text); pass the COCO annotation .json file."
        ) from None
    if not isinstance(document, dict):
        raise BadDatasetError(
            f"{annotation_file}: the top level is a JSON {type(document).__name__}, but a COCO annotation file is "
            "an object with 'images', 'annotations' and 'categories' lists."
        )
    for key in ("images", "annotations", "categories"):
        if key not in document:
            raise BadDatasetError(
                f"{annotation_file}: no {key!r} list; a COCO annotation file needs 'images', 'annotations' and "
                "'categories' (write \"annotations\": [] for images without objects)."
            )
        if not isinstance(document[key], list):
            raise BadDatasetError(
                f"{annotation_file}: {key!r} must be a list of objects, got a JSON {type(document[key]).__name__}."
            )
    return document


def _check_categories(annotation_file: Path, categories: List[Any]) -> None:
    """Categories define the classes: any problem is fatal (skip_bad cannot guess the classes)."""
    if not categories:
        raise BadDatasetError(
            f"{annotation_file}: 'categories' is empty, so there is no class to train or evaluate; list the classes, "
            'e.g. "categories": [{"id": 1, "name": "cat"}, ...] (categories define the classes, so skip_bad cannot fix this).'
        )
    seen = set()
    for index, category in enumerate(categories):
        where = f"{annotation_file}: categories[{index}]"
        if not isinstance(category, dict) or not _is_int(category.get("id")):
            raise BadDatasetError(f"{where} has no integer 'id'; give every category an integer id and a name.")
        if not isinstance(category.get("name"), str):
            raise BadDatasetError(f"{where} (category {category['id']}) has no 'name'; give every category a name.")
        if category["id"] in seen:
            raise BadDatasetError(
                f"{annotation_file}: category id {category['id']} is used by more than one category; "
                "give each category its own id (categories define the classes, so skip_bad cannot fix this)."
            )
        seen.add(category["id"])


class _Validator:
    """Walks the records once, collecting bad ones by kind; the first problem's message is kept."""

    def __init__(self, annotation_file: Path, image_dir: Path, with_masks: bool) -> None:
        self.annotation_file = annotation_file
        self.image_dir = image_dir
        self.with_masks = with_masks
        self.bad_images: Dict[str, List[RecordId]] = defaultdict(list)
        self.bad_annotations: Dict[str, List[RecordId]] = defaultdict(list)
        self.first_message: Optional[str] = None
        self.clipped: List[int] = []

    def _bad(self, groups: Dict[str, List[RecordId]], kind: str, record: RecordId, message: Optional[str]) -> None:
        groups[kind].append(record)
        if self.first_message is None and message is not None:
            self.first_message = f"{self.annotation_file}: {message}"

    # ---------------------------------------------------------------- images
    def images(self, records: List[Any]) -> Tuple[List[dict], Dict[int, Tuple[int, int]]]:
        """Good image records and ``{image_id: (width, height)}`` read from their file headers."""
        counts: Dict[int, int] = defaultdict(int)
        for record in records:
            if isinstance(record, dict) and _is_int(record.get("id")):
                counts[record["id"]] += 1
        kept, sizes = [], {}
        for index, record in enumerate(records):
            size = self._image(index, record, counts)
            if size is not None:
                kept.append(record)
                sizes[record["id"]] = size
        return kept, sizes

    def _image(self, index: int, record: Any, counts: Dict[int, int]) -> Optional[Tuple[int, int]]:
        def bad(kind: str, rid: RecordId, message: str) -> None:
            self._bad(self.bad_images, kind, rid, message)

        if not isinstance(record, dict):
            return bad("not an object", f"images[{index}]", f"images[{index}] is not a JSON object; remove it.")
        image_id = record.get("id")
        if not _is_int(image_id):
            return bad("without an integer id", f"images[{index}]",
                       f"images[{index}] ({record.get('file_name')}) has id {image_id!r}; give it an integer id.")  # fmt: skip
        if counts[image_id] > 1:
            return bad("with a duplicate id", image_id,
                       f"image id {image_id} is used by {counts[image_id]} images; give each image its own id "
                       "(annotations name images by id, so they cannot be attributed).")  # fmt: skip
        file_name = record.get("file_name")
        if not isinstance(file_name, str) or not file_name:
            return bad("without a file_name", image_id, f"image {image_id} has no 'file_name'; add the image's file name.")
        path = self.image_dir / file_name
        try:
            width, height, _ = image_header(path)
        except FileNotFoundError:
            return bad("missing on disk", image_id,
                       f"image {image_id} not found at {path}; check the image folder (image_dir, --train-images / "
                       "--val-images) and the record's file_name.")  # fmt: skip
        except UnsupportedImageModeError as error:
            return bad("with an unsupported pixel mode", image_id,
                       f"image {image_id} at {path} has {error}; convert it to an 8- or 16-bit image.")  # fmt: skip
        except (OSError, ValueError, SyntaxError) as error:  # PIL's UnidentifiedImageError is an OSError
            return bad("unreadable", image_id,
                       f"image {image_id} at {path} cannot be read as an image ({type(error).__name__}: {error}); "
                       "the file is corrupt or not an image: replace it.")  # fmt: skip
        stated = (record.get("width", width), record.get("height", height))
        if stated != (width, height):
            return bad("whose size differs from the file", image_id,
                       f"image {image_id} at {path} is {width}x{height} (width x height) but the annotation file says "
                       f"{stated[0]}x{stated[1]}; fix the record's width/height (boxes are in the file's pixels).")  # fmt: skip
        record.setdefault("width", width)  # absent sizes come from the header (masks need them)
        record.setdefault("height", height)
        return width, height

    # ---------------------------------------------------------------- annotations
    def annotations(
        self, records: List[Any], all_image_ids: set, sizes: Dict[int, Tuple[int, int]], category_ids: set
    ) -> List[dict]:
        kept, seen_ids = [], set()
        for index, record in enumerate(records):
            if self._annotation(index, record, seen_ids, all_image_ids, sizes, category_ids):
                kept.append(record)
        return kept

    def _annotation(self, index, record, seen_ids, all_image_ids, sizes, category_ids) -> bool:
        def bad(kind: str, rid: RecordId, message: Optional[str]) -> bool:
            self._bad(self.bad_annotations, kind, rid, message)
            return False

        if not isinstance(record, dict):
            return bad("not an object", f"annotations[{index}]", f"annotations[{index}] is not a JSON object; remove it.")
        ann_id = record.get("id")
        if not _is_int(ann_id):
            return bad("without an integer id", f"annotations[{index}]",
                       f"annotations[{index}] has id {ann_id!r}; give every annotation an integer id.")  # fmt: skip
        if ann_id in seen_ids:
            return bad("with a duplicate id", ann_id,
                       f"annotation id {ann_id} is used by more than one annotation (again at annotations[{index}]); "
                       "give each annotation its own id.")  # fmt: skip
        seen_ids.add(ann_id)
        image_id = record.get("image_id")
        if not _is_int(image_id) or image_id not in sizes:
            if _is_int(image_id) and image_id in all_image_ids:
                return bad("of a dropped image", ann_id, None)  # the image's own problem was reported
            return bad("of an unknown image", ann_id,
                       f"annotation {ann_id} refers to image_id {image_id!r}, which is not in 'images'; "
                       "fix its image_id or add the image.")  # fmt: skip
        where = f"annotation {ann_id} (image {image_id})"
        category_id = record.get("category_id")
        if not _is_int(category_id) or category_id not in category_ids:
            known = sorted(category_ids)
            shown = ", ".join(map(str, known[:10])) + (", ..." if len(known) > 10 else "")
            return bad("of an unknown category", ann_id,
                       f"{where} has category_id {category_id!r}, which is not in 'categories' "
                       f"(ids {shown}); fix its category_id or add the category.")  # fmt: skip
        box = record.get("bbox")
        if not isinstance(box, list) or len(box) != 4 or not all(_is_number(v) for v in box):
            return bad("with a malformed bbox", ann_id,
                       f"{where} has bbox {box!r}; a bbox is [x, y, width, height]: 4 numbers.")  # fmt: skip
        x, y, w, h = box
        if not all(math.isfinite(v) for v in box):
            return bad("with a non-finite bbox", ann_id, f"{where} has a non-finite bbox {box}; fix or remove it.")
        if w <= 0 or h <= 0:
            return bad("with width or height <= 0", ann_id,
                       f"{where} has bbox {box} with width or height <= 0; fix or remove it.")  # fmt: skip
        width, height = sizes[image_id]
        if x >= width or y >= height or x + w <= 0 or y + h <= 0:
            return bad("entirely outside the image", ann_id,
                       f"{where} has bbox {box} entirely outside its {width}x{height} (width x height) image; "
                       "fix or remove it.")  # fmt: skip
        if self.with_masks:
            problem = self._segmentation_problem(record, width, height)
            if problem is not None:
                kind, detail = problem
                return bad(kind, ann_id, f"{where} {detail}")
        if not record.get("iscrowd", 0) and (x < 0 or y < 0 or x + w > width or y + h > height):
            self.clipped.append(ann_id)
        return True

    @staticmethod
    def _segmentation_problem(record: dict, width: int, height: int) -> Optional[Tuple[str, str]]:
        """``(kind, detail)`` of a segmentation that cannot become a (H, W) mask, or None."""
        segmentation = record.get("segmentation")
        if not segmentation:
            if record.get("iscrowd", 0):
                return None  # crowd regions never reach training targets
            return ("without a segmentation",
                    "has no segmentation; add one, or use with_masks=False for box-only annotation files.")  # fmt: skip
        if isinstance(segmentation, list):
            for number, polygon in enumerate(segmentation):
                if not isinstance(polygon, list) or len(polygon) < 6 or len(polygon) % 2:
                    count = len(polygon) if isinstance(polygon, list) else type(polygon).__name__
                    return ("with a malformed polygon",
                            f"has polygon {number} with {count} coordinates; a polygon is a flat list of x, y pairs "
                            "with at least 3 points (6 numbers): fix or remove it.")  # fmt: skip
            return None
        if isinstance(segmentation, dict):
            if "counts" not in segmentation or list(segmentation.get("size", ())) != [height, width]:
                return ("with an RLE size that differs from the image",
                        f"has an RLE mask of size {segmentation.get('size')!r} (and counts: {'counts' in segmentation}) "
                        f"but its image is [height, width] = [{height}, {width}]; re-encode the mask at the image's size.")  # fmt: skip
            return None
        return ("with a malformed segmentation",
                f"has a segmentation of type {type(segmentation).__name__}; use polygons (a list of lists) or RLE.")  # fmt: skip


def validate_coco_file(
    annotation_file: Union[str, Path], image_dir: Union[str, Path], with_masks: bool = False, skip_bad: bool = False
) -> Tuple[Dict[str, Any], DatasetReport]:
    """Read and check a COCO-format file against the images in ``image_dir``.

    Returns the document with only good records (the same lists when nothing was dropped;
    image records without ``width`` / ``height`` get them from their file) and a
    :class:`DatasetReport`. Without ``skip_bad`` the first bad record raises
    :class:`BadDatasetError`; structural problems always raise.
    """
    annotation_file, image_dir = Path(annotation_file), Path(image_dir)
    document = read_annotation_document(annotation_file)
    categories = document["categories"]
    _check_categories(annotation_file, categories)

    validator = _Validator(annotation_file, image_dir, with_masks)
    images, sizes = validator.images(document["images"])
    all_image_ids = {r.get("id") for r in document["images"] if isinstance(r, dict) and _is_int(r.get("id"))}
    annotations = validator.annotations(document["annotations"], all_image_ids, sizes, {c["id"] for c in categories})

    report = DatasetReport(
        annotation_file, len(images), len(annotations),
        dict(validator.bad_images), dict(validator.bad_annotations), validator.clipped,
    )  # fmt: skip
    if validator.first_message is not None and not skip_bad:
        raise BadDatasetError(
            f"{validator.first_message} Alternatively, pass skip_bad=True (--skip-bad, or data.skip_bad: true) "
            f"to drop bad records (here {report.num_dropped_images} image(s) and {report.num_dropped_annotations} "
            "annotation(s), those of bad images included) and report them."
        )
    cleaned = {**document, "images": images, "annotations": annotations}
    return cleaned, report
