"""YOLO-format detection data (Ultralytics / Darknet txt labels) converted to a COCO-format file.

The format::

    <root>/images/<split>/a.jpg         images (.bmp .jpeg .jpg .png .tif .tiff .webp; subfolders allowed)
    <root>/labels/<split>/a.txt         one label file per image, same relative path and stem
    <root>/data.yaml                    names: [cat, dog]  or  names: {0: cat, 1: dog}
                                        (nc, path, train, val keys may be there; they are not read)
  or, as Roboflow exports it, <root>/<split>/images/ and <root>/<split>/labels/;
  and instead of data.yaml, <root>/classes.txt or one <root>/*.names file: a name per line.

A label line is ``class cx cy w h``: the 0-based class index, then the box centre, width and
height divided by the image's width and height (so in [0, 1]). A line of ``class x1 y1 x2 y2
x3 y3 ...`` (a YOLO segmentation polygon, normalised the same way) becomes the box around the
polygon. Blank lines are skipped; an image without a label file, or with an empty one, has no
objects; label files without an image are not read.

Conversion (pixel boxes need the image size, read from the file header with PIL): a box
``cx cy w h`` of a W x H image becomes COCO ``[(cx - w/2) W, (cy - h/2) H, w W, h H]``; class
``i`` becomes category id ``i + 1``. Coordinates may leave [0, 1] by ``COORDINATE_TOLERANCE``
(the dataset clips such boxes to the image); a bad line (not 5 numbers, a class index not in
the names, a coordinate outside [0, 1], a width or height <= 0) raises one
:class:`~densekd.data.BadDatasetError` naming the file and line, or with ``skip_bad`` is
dropped and counted in the returned report (an unreadable image likewise, with its labels).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import yaml

from densekd.data.conversion import (
    BadRecords,
    CocoDocumentBuilder,
    ConvertedDataset,
    checked_class_names,
    finish_conversion,
)
from densekd.data.images import image_header
from densekd.data.validation import BadDatasetError, DatasetFileNotFoundError

__all__ = ["COORDINATE_TOLERANCE", "IMAGE_SUFFIXES", "yolo_class_names", "yolo_split_folders", "yolo_to_coco"]

IMAGE_SUFFIXES = (".bmp", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp")
COORDINATE_TOLERANCE = 1e-3  # normalised coordinates may leave [0, 1] by this much (rounding in exporters)
_NAME_FIX = "add data.yaml with names: [cat, dog] (class 0 first), or classes.txt with one name per line"


def _names_from_yaml(path: Path) -> List[str]:
    try:
        with path.open("rb") as handle:
            data = yaml.safe_load(handle)
    except yaml.YAMLError as error:
        raise BadDatasetError(f"{path} is not valid YAML ({str(error).splitlines()[0]}); {_NAME_FIX}.") from None
    if not isinstance(data, dict) or "names" not in data:
        raise BadDatasetError(f"{path} has no 'names'; {_NAME_FIX}.")
    names = data["names"]
    if isinstance(names, dict):
        if set(names) != set(range(len(names))):
            keys = sorted(names, key=str)
            raise BadDatasetError(f"{path}: names keys are {keys} but must be the class indices 0..{len(names) - 1}, "
                                  "each once; renumber them (or write names as a list, class 0 first).")  # fmt: skip
        names = [names[index] for index in range(len(names))]
    checked = checked_class_names(names, f"{path} names")
    if "nc" in data and data["nc"] != len(checked):
        raise BadDatasetError(f"{path} says nc: {data['nc']} but names has {len(checked)} classes; make them agree.")
    return checked


def _names_from_lines(path: Path) -> List[str]:
    lines = path.read_text(encoding="utf-8-sig").splitlines()  # -sig: files saved with a BOM (Windows editors)
    return checked_class_names([line.strip() for line in lines if line.strip()], str(path))


def yolo_class_names(root: Union[str, Path]) -> List[str]:
    """Class names in index order from ``root/data.yaml`` (``names:`` as a list or an
    ``{index: name}`` dict), else ``root/classes.txt``, else the one ``root/*.names`` file."""
    root = Path(root)
    if (root / "data.yaml").is_file():
        return _names_from_yaml(root / "data.yaml")
    if (root / "classes.txt").is_file():
        return _names_from_lines(root / "classes.txt")
    names_files = sorted(root.glob("*.names"))
    if len(names_files) == 1:
        return _names_from_lines(names_files[0])
    found = f" (found {len(names_files)} *.names files: keep one)" if names_files else ""
    raise BadDatasetError(f"{root}: no class names{found}; {_NAME_FIX}, or pass names=[...] (--class-names FILE).")


def _split_hint(root: Path, split: str) -> str:
    """What data.yaml says about ``split``, if anything: users often name the split after it."""
    try:
        data = yaml.safe_load((root / "data.yaml").read_text()) if (root / "data.yaml").is_file() else None
    except yaml.YAMLError:
        return ""
    value = data.get(split) if isinstance(data, dict) else None
    return f" (data.yaml says {split}: {value}; the split is that folder's name)" if isinstance(value, str) else ""


def yolo_split_folders(root: Union[str, Path], split: str) -> Tuple[Path, Path]:
    """``(images, labels)`` folders of ``split``: ``images/<split>`` and ``labels/<split>``, or
    ``<split>/images`` and ``<split>/labels``; :class:`DatasetFileNotFoundError` when neither is there."""
    root = Path(root)
    layouts = ((root / "images" / split, root / "labels" / split), (root / split / "images", root / split / "labels"))
    for images, labels in layouts:
        if images.is_dir():
            if not labels.is_dir():
                raise DatasetFileNotFoundError(
                    f"{labels} not found: a YOLO split needs a labels folder next to {images} (one <stem>.txt per "
                    "image); create it (empty if no image has objects) or check the root and split."
                )
            return images, labels
    raise DatasetFileNotFoundError(
        f"{root}: no images/{split}/ (nor {split}/images/) folder{_split_hint(root, split)}; a YOLO dataset has "
        f"images/<split>/ and labels/<split>/: check the dataset root and the split name."
    )


class _BadLine(Exception):
    """A label line densekd cannot read: ``kind`` groups it in the report, ``detail`` says why and the fix."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(detail)
        self.kind, self.detail = kind, detail


def _parse_line(line: str, num_classes: int) -> Tuple[int, List[float]]:
    """``(class index, [cx, cy, w, h])`` normalised, from a box or polygon line; :class:`_BadLine` otherwise."""
    try:
        numbers = [float(part) for part in line.split()]
    except ValueError:
        raise _BadLine("with a malformed line", "is not all numbers; a YOLO label line is 'class cx cy w h'") from None
    count = len(numbers)
    if count != 5 and (count < 7 or count % 2 == 0):
        raise _BadLine("with a malformed line",
                       f"has {count} number(s); a YOLO label line is 'class cx cy w h' (5 numbers: the class index, then "
                       "the box centre, width and height divided by the image size), or 'class x1 y1 x2 y2 x3 y3 ...' "
                       "for a polygon")  # fmt: skip
    if not all(math.isfinite(v) for v in numbers):
        raise _BadLine("with a non-finite number", "has a nan or inf; fix or remove the line")
    index = numbers[0]
    if not index.is_integer() or not 0 <= index < num_classes:
        raise _BadLine("with a class index out of range",
                       f"has class index {index:g}, but there are {num_classes} classes (indices 0..{num_classes - 1}); "
                       "fix the index, or add the class to the names (data.yaml / classes.txt)")  # fmt: skip
    values = numbers[1:]
    if min(values) < -COORDINATE_TOLERANCE or max(values) > 1 + COORDINATE_TOLERANCE:
        raise _BadLine("with a coordinate outside [0, 1]",
                       "has a coordinate outside [0, 1]; YOLO coordinates are divided by the image's width and height "
                       "(pixel coordinates? divide them by the image size)")  # fmt: skip
    if count == 5:
        box = values
    else:  # polygon x1 y1 x2 y2 ... -> the box around it
        xs, ys = values[0::2], values[1::2]
        box = [(min(xs) + max(xs)) / 2, (min(ys) + max(ys)) / 2, max(xs) - min(xs), max(ys) - min(ys)]
    if box[2] <= 0 or box[3] <= 0:
        raise _BadLine("with width or height <= 0", "has a box of width or height <= 0; fix or remove the line")
    return int(index), box


def _add_labels(builder: CocoDocumentBuilder, bad: BadRecords, image_id: int, label_file: Path, where: str,
                size: Tuple[int, int], num_classes: int) -> None:  # fmt: skip
    """The boxes of ``label_file`` (absent: none) added to ``image_id``; bad lines go to ``bad``."""
    if not label_file.is_file():
        return
    width, height = size
    for number, line in enumerate(label_file.read_text(encoding="utf-8-sig").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            index, (cx, cy, w, h) = _parse_line(line, num_classes)
        except _BadLine as problem:
            bad.box(problem.kind, f"{where}:{number}", f"{label_file}:{number}: {line.strip()!r} {problem.detail}.")
            continue
        builder.add_box(image_id, index, ((cx - w / 2) * width, (cy - h / 2) * height, w * width, h * height))


def yolo_to_coco(
    root: Union[str, Path],
    split: str,
    names: Optional[Sequence[str]] = None,
    skip_bad: bool = False,
    cache_dir: Union[str, Path, None] = None,
) -> ConvertedDataset:
    """Convert ``split`` of the YOLO dataset at ``root`` to a COCO-format file in the cache.

    Args:
        root: the dataset folder (see the module docstring for the layout).
        split: the folder name under ``images/`` (e.g. ``"train"``, ``"val"``).
        names: class names, class 0 first; default :func:`yolo_class_names` (data.yaml, ...).
        skip_bad: drop bad label lines and unreadable images (counted in ``report`` and logged)
            instead of raising :class:`~densekd.data.BadDatasetError`.
        cache_dir: where the JSON goes; default ``$DENSEKD_CACHE/converted`` (or
            ``~/.cache/densekd/converted``). The file is named by its content's hash.

    Returns:
        :class:`~densekd.data.conversion.ConvertedDataset`: ``annotation_file`` and ``image_dir``
        (``images/<split>``) for :class:`~densekd.data.CocoDetectionDataset`, ``categories``, ``report``.
    """
    root = Path(root)
    names = yolo_class_names(root) if names is None else checked_class_names(names, "names")
    image_dir, label_dir = yolo_split_folders(root, split)
    images = sorted(p for p in image_dir.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not images:
        raise BadDatasetError(f"{image_dir} holds no images ({', '.join(IMAGE_SUFFIXES)}); check the dataset root and split.")
    builder, bad = CocoDocumentBuilder(names), BadRecords(root)
    for path in images:
        relative = path.relative_to(image_dir)
        size = _image_size(path, bad, str(path.relative_to(root)))
        if size is None:
            continue
        image_id = builder.add_image(relative.as_posix(), *size)
        label_file = label_dir / relative.with_suffix(".txt")
        _add_labels(builder, bad, image_id, label_file, label_file.relative_to(root).as_posix(), size, len(names))
    return finish_conversion(builder, bad, data_format="yolo", split=split, image_dir=image_dir,
                             skip_bad=skip_bad, cache_dir=cache_dir)  # fmt: skip


def _image_size(path: Path, bad: BadRecords, where: str) -> Optional[Tuple[int, int]]:
    """``(width, height)`` from the header, or None with the image reported to ``bad``."""
    try:
        width, height, _ = image_header(path)
        return width, height
    except (OSError, ValueError, SyntaxError) as error:  # PIL's UnidentifiedImageError is an OSError
        bad.image("unreadable", where, f"{path} cannot be read as an image ({type(error).__name__}: {error}); "
                                       "the file is corrupt or not an image: replace or remove it.")  # fmt: skip
        return None
