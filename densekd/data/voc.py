"""Pascal VOC-format detection data (one XML per image) converted to a COCO-format file.

The format::

    <root>/ImageSets/Main/<split>.txt   the split: one image id per line (e.g. 000005)
    <root>/Annotations/<id>.xml         <annotation>
                                          <filename>000005.jpg</filename>
                                          <size><width>500</width><height>375</height></size>
                                          <object>                       one per box
                                            <name>chair</name>
                                            <difficult>0</difficult>     optional; 1 = hard to see
                                            <bndbox><xmin>263</xmin><ymin>211</ymin>
                                                    <xmax>324</xmax><ymax>339</ymax></bndbox>
                                          </object> ...
    <root>/JPEGImages/<filename>        the image (else JPEGImages/<id>.jpg, as torchvision reads it)

Boxes are 1-based, inclusive pixel indices: ``xmin=1, xmax=W`` covers a W-pixel-wide image.
They become COCO ``[x, y, w, h]`` with ``x = xmin - 1``, ``y = ymin - 1``, ``w = xmax - xmin + 1``,
``h = ymax - ymin + 1``: detectron2's convention (``load_voc_instances`` subtracts 1 from xmin and
ymin, keeps xmax and ymax) and the VOC devkit's box area ``(xmax - xmin + 1) (ymax - ymin + 1)``.
``difficult`` boxes become ``iscrowd: 1``, so COCO evaluation ignores them (as VOC's does) and
:class:`~densekd.data.CocoDetectionDataset` leaves them out of training targets.

Classes: ``names`` when given, else the sorted names found in the training split
(``names_split``); class ``i`` becomes category id ``i + 1``. A bad record (an id whose XML is
missing or unparsable, an XML without <size>, an image that is missing or whose size differs
from <size>, an object without <name> or <bndbox>, of a class not in the names, or with
xmax < xmin) raises one :class:`~densekd.data.BadDatasetError` naming the file and record,
or with ``skip_bad`` is dropped and counted in the returned report.
"""
from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

from densekd.data.conversion import (
    BadRecords,
    CocoDocumentBuilder,
    ConvertedDataset,
    checked_class_names,
    finish_conversion,
)
from densekd.data.images import image_header
from densekd.data.validation import BadDatasetError, DatasetFileNotFoundError

__all__ = ["voc_class_names", "voc_to_coco"]

_COORDINATES = ("xmin", "ymin", "xmax", "ymax")


@dataclass
class _VocObject:
    name: str
    box: Tuple[float, float, float, float]  # COCO x, y, w, h (pixels)
    difficult: bool
    where: str  # "Annotations/<id>.xml object <k>" for the report
    message: str  # "<xml path>: object <k> (<name>)" for error messages


@dataclass
class _VocImage:
    file_name: str  # relative to JPEGImages
    width: int
    height: int
    objects: List[_VocObject] = field(default_factory=list)


def _split_ids(root: Path, split: str) -> List[Tuple[int, str]]:
    """``[(line number, image id), ...]`` of ``ImageSets/Main/<split>.txt`` (first word of each non-blank line)."""
    path = root / "ImageSets" / "Main" / f"{split}.txt"
    if not path.is_file():
        folder = path.parent
        splits = sorted(p.stem for p in folder.glob("*.txt") if "_" not in p.stem) if folder.is_dir() else []
        available = f"splits there: {', '.join(splits)}" if splits else f"no split files in {folder}"
        raise DatasetFileNotFoundError(f"VOC split file not found: {path} ({available}); check the dataset root and split.")
    lines = path.read_text(encoding="utf-8-sig").splitlines()
    return [(number, line.split()[0]) for number, line in enumerate(lines, start=1) if line.strip()]


def _pixel_count(element: Optional[ET.Element], tag: str) -> Optional[int]:
    """The positive integer in ``element/<tag>`` (``"500"`` or ``"500.0"``), else None."""
    try:
        value = float((element.findtext(tag) or "").strip()) if element is not None else float("nan")
    except ValueError:
        return None
    return int(value) if value.is_integer() and value > 0 else None


def _image_candidates(image_id: str, tree: ET.Element) -> List[str]:
    """Names the image may have in JPEGImages, in order: the XML's <filename>, then ``<id>.jpg``."""
    names = [(tree.findtext("filename") or "").strip(), f"{image_id}.jpg"]
    return [name for index, name in enumerate(names) if name and name not in names[:index]]


def _checked_image_file(
    root: Path, image_id: str, tree: ET.Element, size: Tuple[int, int], where: str, bad: BadRecords
) -> Optional[str]:
    """The image's name in JPEGImages when the file is there, readable and of the XML's <size>
    ``(width, height)``; else None with the problem reported to ``bad``."""
    xml = root / where
    candidates = _image_candidates(image_id, tree)
    file_name = next((name for name in candidates if (root / "JPEGImages" / name).is_file()), None)
    if file_name is None:
        tried = " nor ".join(f"JPEGImages/{name}" for name in candidates)
        bad.image("without an image", where, f"{xml}: its image is missing (no {tried} in {root}); "
                                             "add the image or fix <filename>.")  # fmt: skip
        return None
    path = root / "JPEGImages" / file_name
    try:
        actual = image_header(path)[:2]
    except (OSError, ValueError, SyntaxError) as error:  # PIL's UnidentifiedImageError is an OSError
        bad.image("with an unreadable image", where,
                  f"{path} cannot be read as an image ({type(error).__name__}: {error}); replace or remove it.")  # fmt: skip
        return None
    if actual != size:
        bad.image("whose size differs from <size>", where,
                  f"{xml} says <size> {size[0]}x{size[1]} (width x height) but {path} is {actual[0]}x{actual[1]}; "
                  "fix <size> (the boxes are in the image's pixels).")  # fmt: skip
        return None
    return file_name


def _read_object(element: ET.Element, number: int, where: str, xml: Path, bad: BadRecords) -> Optional[_VocObject]:
    """The object's class name, COCO box and difficult flag, or None with the problem reported to ``bad``."""
    name = (element.findtext("name") or "").strip()
    where, said = f"{where} object {number}", f"{xml}: object {number}" + (f" ({name})" if name else "")
    if not name:
        bad.box("without a <name>", where, f"{said} has no <name>; add the class name or remove the object.")
        return None
    box = element.find("bndbox")
    try:
        xmin, ymin, xmax, ymax = (float((box.findtext(tag) or "").strip()) for tag in _COORDINATES)
    except (AttributeError, ValueError):  # no <bndbox>, or a coordinate missing or not a number
        bad.box("without a usable <bndbox>", where,
                f"{said} has no <bndbox> with numbers <xmin>, <ymin>, <xmax>, <ymax>; fix or remove the object.")  # fmt: skip
        return None
    if xmax < xmin or ymax < ymin:
        coordinates = f"xmin {xmin:g}, ymin {ymin:g}, xmax {xmax:g}, ymax {ymax:g}"
        bad.box("with xmax < xmin or ymax < ymin", where, f"{said} has {coordinates}: a corner is swapped; fix it.")
        return None
    difficult = (element.findtext("difficult") or "0").strip().lower() in ("1", "true")
    box = (xmin - 1, ymin - 1, xmax - xmin + 1, ymax - ymin + 1)  # 1-based inclusive -> COCO xywh
    return _VocObject(name, box, difficult, where, said)


def _read_image(root: Path, image_id: str, listed_at: str, bad: BadRecords) -> Optional[_VocImage]:
    """The image record of ``Annotations/<image_id>.xml`` with its objects, or None with the problem
    reported to ``bad``; ``listed_at`` is the split file and line that named the id."""
    xml = root / "Annotations" / f"{image_id}.xml"
    where = f"Annotations/{image_id}.xml"
    if not xml.is_file():
        bad.image("without an XML", where, f"{listed_at}: image id {image_id!r} has no annotation file {xml}; "
                                           "add the XML or remove the id from the split file.")  # fmt: skip
        return None
    try:
        tree = ET.parse(xml).getroot()
    except ET.ParseError as error:
        bad.image("with an unreadable XML", where, f"{xml} is not valid XML ({error}); fix or replace the file.")
        return None
    size = tree.find("size")
    width, height = _pixel_count(size, "width"), _pixel_count(size, "height")
    if width is None or height is None:
        bad.image("without a <size>", where,
                  f"{xml} has no <size> with positive integer <width> and <height>; add the image's size in pixels, "
                  "e.g. <size><width>500</width><height>375</height></size>.")  # fmt: skip
        return None
    file_name = _checked_image_file(root, image_id, tree, (width, height), where, bad)
    if file_name is None:
        return None
    image = _VocImage(file_name, width, height)
    for number, element in enumerate(tree.findall("object"), start=1):
        found = _read_object(element, number, where, xml, bad)
        if found is not None:
            image.objects.append(found)
    return image


def _read_split(root: Path, split: str, bad: BadRecords) -> List[_VocImage]:
    """Every good image of ``split`` in split-file order; an id listed twice counts once (reported)."""
    images, seen = [], set()
    split_file = root / "ImageSets" / "Main" / f"{split}.txt"
    for number, image_id in _split_ids(root, split):
        listed_at = f"{split_file}:{number}"
        if image_id in seen:
            bad.image("listed twice", f"{split_file.name}:{number}",
                      f"{listed_at}: image id {image_id!r} is listed again; remove the repeated line.")  # fmt: skip
            continue
        seen.add(image_id)
        image = _read_image(root, image_id, listed_at, bad)
        if image is not None:
            images.append(image)
    if not images and not bad.first_message:
        raise BadDatasetError(f"{split_file} lists no images; add one image id per line.")
    return images


def voc_class_names(root: Union[str, Path], split: str = "train") -> List[str]:
    """The sorted distinct object names in ``split``'s XML files (its readable objects)."""
    root = Path(root)
    return _found_names(root, split, _read_split(root, split, BadRecords(root)))


def _found_names(root: Path, split: str, images: List[_VocImage]) -> List[str]:
    names = sorted({found.name for image in images for found in image.objects})
    if not names:
        raise BadDatasetError(f"{root}: split {split!r} has no objects to take class names from; "
                              "pass names=[...] (--class-names FILE).")  # fmt: skip
    return names


def voc_to_coco(
    root: Union[str, Path],
    split: str,
    names: Optional[Sequence[str]] = None,
    names_split: str = "train",
    skip_bad: bool = False,
    cache_dir: Union[str, Path, None] = None,
) -> ConvertedDataset:
    """Convert ``split`` of the VOC dataset at ``root`` to a COCO-format file in the cache.

    Args:
        root: the dataset folder, e.g. ``VOCdevkit/VOC2007`` (see the module docstring).
        split: a file name of ``ImageSets/Main`` without ``.txt`` (e.g. ``"trainval"``, ``"test"``).
        names: class names, class 0 first (category id 1); default: the sorted names found in
            ``names_split`` (:func:`voc_class_names`), so every split gets the training split's ids.
        names_split: the split whose names are the default classes (the training split).
        skip_bad: drop bad images and objects (counted in ``report`` and logged) instead of
            raising :class:`~densekd.data.BadDatasetError`.
        cache_dir: where the JSON goes; default ``$DENSEKD_CACHE/converted`` (or
            ``~/.cache/densekd/converted``). The file is named by its content's hash.

    Returns:
        :class:`~densekd.data.conversion.ConvertedDataset`: ``annotation_file`` and ``image_dir``
        (``JPEGImages``) for :class:`~densekd.data.CocoDetectionDataset`, ``categories``, ``report``.
    """
    root = Path(root)
    bad = BadRecords(root)
    images = _read_split(root, split, bad)
    if names is not None:
        names = checked_class_names(names, "names")
    elif names_split == split:
        names = _found_names(root, split, images)
    else:
        names = voc_class_names(root, names_split)
    builder, index = CocoDocumentBuilder(names), {name: i for i, name in enumerate(names)}
    for image in images:
        image_id = builder.add_image(image.file_name, image.width, image.height)
        for found in image.objects:
            if found.name not in index:
                shown = ", ".join(names[:10]) + (", ..." if len(names) > 10 else "")
                bad.box("of a class not in the names", found.where,
                        f"{found.message}: class {found.name!r} is not one of the {len(names)} class names ({shown}); "
                        "fix the name, or add the class to names (--class-names FILE).")  # fmt: skip
                continue
            builder.add_box(image_id, index[found.name], found.box, iscrowd=found.difficult)
    return finish_conversion(builder, bad, data_format="voc", split=split, image_dir=root / "JPEGImages",
                             skip_bad=skip_bad, cache_dir=cache_dir)  # fmt: skip
