"""Semantic-segmentation datasets for torchvision segmentation models (FCN, DeepLabV3, LRASPP).

Both datasets return what those models train on, one sample at a time::

    image  float32 (3, H, W)   normalized by the ``transforms`` (see segmentation_transforms)
    mask   int64   (H, W)      0 = background, 1..K = foreground classes, 255 = ignore

and :func:`collate_segmentation` stacks a batch into ``(N, 3, H, W)`` / ``(N, H, W)``.

* :class:`SemanticSegmentationDataset` renders COCO-format *instance* annotations (polygons
  or RLE, e.g. COCO, LVIS or densekd's embedded synthetic set) into semantic masks with
  pycocotools' ``annToMask``.
* :class:`MaskFolderDataset` reads a folder of images and a folder of mask PNGs whose pixel
  values are the class indices.

Without ``transforms`` a sample is the image scaled to [0, 1] (not normalized) and the mask
at the file's resolution; torchvision's segmentation models have no internal transform, so
training needs :func:`~densekd.data.segmentation_transforms.build_segmentation_transforms`.
"""

from __future__ import annotations

import contextlib
import io
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image
from pycocotools.coco import COCO
from torch import Tensor

__all__ = [
    "IGNORE_INDEX",
    "IMAGE_EXTENSIONS",
    "VOC_COCO_CATEGORY_NAMES",
    "MaskFolderDataset",
    "SemanticSegmentationDataset",
    "collate_segmentation",
]

IGNORE_INDEX = 255

# The 20 Pascal VOC classes by their COCO category names, in VOC label order (1..20; 0 is
# background): the convention of torchvision's segmentation reference scripts
# (references/segmentation/coco_utils.py, COCO ids [5, 2, 16, 9, 44, 6, 3, 17, 62, 21, 67, 18,
# 19, 4, 1, 64, 20, 63, 7, 72]) and of its "COCO_WITH_VOC_LABELS_V1" weights, whose 21 output
# channels follow this order. Every other COCO category becomes background.
VOC_COCO_CATEGORY_NAMES: Tuple[str, ...] = (
    "airplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "dining table", "dog", "horse", "motorcycle", "person", "potted plant", "sheep", "couch",
    "train", "tv",
)  # fmt: skip

IMAGE_EXTENSIONS: Tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")

# (image uint8 (H, W, 3), mask uint8 (H, W), key) -> (image (3, H', W'), mask int64 (H', W'));
# ``key`` identifies the sample for seeded augmentation.
Transform = Callable[[np.ndarray, np.ndarray, int], Tuple[Tensor, Tensor]]


def _load_rgb(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.array(image.convert("RGB"), dtype=np.uint8)  # (H, W, 3)


def _to_tensors(image: np.ndarray, mask: np.ndarray) -> Tuple[Tensor, Tensor]:
    """uint8 (H, W, 3) and (H, W) -> float32 (3, H, W) in [0, 1] and int64 (H, W)."""
    image_tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255.0)  # (H, W, 3) -> (3, H, W)
    return image_tensor, torch.from_numpy(np.ascontiguousarray(mask)).long()


class _SegmentationStatistics(ABC):
    """Per-class statistics the long-tail tools read (samplers, class weights, frequency groups).

    Subclasses set ``num_classes`` and ``categories`` and implement ``_label_pixels(index)``:
    ``{label: pixel count}`` of the labels 0..K (background included) in sample ``index``.
    Computed once, on first use.
    """

    num_classes: int
    categories: List[str]
    _stats: Optional[Tuple[List[List[int]], List[int], List[int]]] = None

    @abstractmethod
    def _label_pixels(self, index: int) -> Dict[int, int]:
        """``{label: pixel count}`` of the labels 0..K in sample ``index``."""

    def _statistics(self) -> Tuple[List[List[int]], List[int], List[int]]:
        if self._stats is None:
            labels, image_counts, pixel_counts = [], [0] * (self.num_classes + 1), [0] * (self.num_classes + 1)
            for index in range(len(self)):  # type: ignore[arg-type]
                pixels = {label: n for label, n in self._label_pixels(index).items() if n > 0}
                labels.append(sorted(label for label in pixels if label > 0))
                for label, n in pixels.items():
                    image_counts[label] += 1
                    pixel_counts[label] += n
            self._stats = (labels, image_counts, pixel_counts)
        return self._stats

    def image_labels(self) -> List[List[int]]:
        """Sorted distinct labels (1..K) per sample, index-aligned; for repeat-factor and class-aware sampling."""
        return self._statistics()[0]

    @property
    def image_counts(self) -> List[int]:
        """(K,) number of samples containing each foreground class, in label order (LVIS frequency groups)."""
        return self._statistics()[1][1:]

    @property
    def pixel_counts(self) -> List[int]:
        """(K,) pixels of each foreground class over the dataset (at file resolution), in label order."""
        return self._statistics()[2][1:]

    @property
    def channel_image_counts(self) -> List[int]:
        """(K + 1,) :attr:`image_counts` per model output channel: background (0) first."""
        return self._statistics()[1]

    @property
    def channel_pixel_counts(self) -> List[int]:
        """(K + 1,) :attr:`pixel_counts` per model output channel: background (0) first; what
        per-class weights of segmentation terms are computed from."""
        return self._statistics()[2]


class SemanticSegmentationDataset(_SegmentationStatistics, torch.utils.data.Dataset):
    """COCO-format instance annotations rendered to semantic masks.

    Rendering (per image, at the file's resolution):

    1. everything starts as background (0); annotations of categories outside ``categories``
       stay background (as in torchvision's segmentation reference);
    2. crowd regions (``iscrowd=1``) of the chosen categories are painted ``ignore_index``: their
       pixels are uncertain and count neither in the loss nor in the metrics;
    3. non-crowd instances are painted with their label, larger areas first, so where two
       instances overlap the smaller one (usually the one in front) keeps its pixels; equal
       areas keep file order, the later annotation on top. Instances also paint over crowd
       regions: a labelled instance is certain.

    torchvision's reference scripts differ on overlaps: they take the larger category id and
    mark pixels covered by two or more instances as ignore. The two agree wherever instances
    do not overlap, as in densekd's synthetic dataset (visible masks, no overlaps).

    Args:
        image_dir: folder holding the images named by each image's ``file_name``.
        annotation_file: COCO/LVIS-format JSON with ``segmentation`` (polygons or RLE).
        transforms: ``(image uint8 (H, W, 3), mask uint8 (H, W), key) -> (image, mask)``
            tensors, e.g. :func:`~densekd.data.segmentation_transforms.build_segmentation_transforms`;
            ``key`` is the image id.
        categories: the categories to segment, in label order (label = position + 1): category
            ids (int), names (str), or ``"voc"`` for :data:`VOC_COCO_CATEGORY_NAMES`. Default:
            every category, labels in sorted id order (as :class:`~densekd.data.CocoDetectionDataset`).
        ignore_index: the mask value of crowd regions.

    Attributes:
        num_classes: K foreground classes (a model has K + 1 output channels: background too).
        categories: category names in label order (``categories[label - 1]``).
        label_to_category_id / category_id_to_label: the mapping.
        frequency_groups: LVIS 'r' / 'c' / 'f' per class when every category has ``frequency``.
        image_counts / pixel_counts / image_labels(): from the rendered masks (computed once,
            on first use, without loading images); channel_image_counts / channel_pixel_counts
            the same with background first.
    """

    def __init__(
        self,
        image_dir: Union[str, Path],
        annotation_file: Union[str, Path],
        transforms: Optional[Transform] = None,
        categories: Union[None, str, Sequence[Union[int, str]]] = None,
        ignore_index: int = IGNORE_INDEX,
    ) -> None:
        self.image_dir = Path(image_dir)
        self.annotation_file = Path(annotation_file)
        if not self.image_dir.is_dir():
            raise FileNotFoundError(f"image folder not found: {self.image_dir}")
        if not self.annotation_file.is_file():
            raise FileNotFoundError(f"annotation file not found: {self.annotation_file}")
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
            self.coco = COCO(str(self.annotation_file))
        self.transforms = transforms
        self.ignore_index = int(ignore_index)
        chosen = self._resolve_categories(categories)
        if len(chosen) >= self.ignore_index:
            raise ValueError(f"{len(chosen)} categories do not fit below ignore_index {self.ignore_index}.")
        self.label_to_category_id: Dict[int, int] = {label: cid for label, cid in enumerate(chosen, start=1)}
        self.category_id_to_label: Dict[int, int] = {cid: label for label, cid in self.label_to_category_id.items()}
        self.categories: List[str] = [self.coco.cats[cid]["name"] for cid in chosen]
        self.num_classes = len(chosen)
        frequencies = [self.coco.cats[cid].get("frequency") for cid in chosen]
        self.frequency_groups: Optional[List[str]] = frequencies if chosen and None not in frequencies else None
        self.image_ids: List[int] = sorted(self.coco.imgs)

    def _resolve_categories(self, categories: Union[None, str, Sequence[Union[int, str]]]) -> List[int]:
        available = sorted(self.coco.cats)
        if categories is None:
            return available
        if categories == "voc":
            categories = VOC_COCO_CATEGORY_NAMES
        elif isinstance(categories, str):
            raise ValueError(f"categories must be 'voc' or a list of category ids or names, got {categories!r}")
        by_name = {self.coco.cats[cid]["name"]: cid for cid in available}
        chosen, unknown = [], []
        for category in categories:
            cid = by_name.get(category) if isinstance(category, str) else category
            if cid not in self.coco.cats:
                unknown.append(category)
            else:
                chosen.append(int(cid))
        if unknown:
            names = ", ".join(sorted(by_name)[:30])
            raise ValueError(
                f"categories {unknown} are not in {self.annotation_file}; its categories are ids {available[:30]} "
                f"named {names}{' ...' if len(available) > 30 else ''}"
            )
        if len(set(chosen)) != len(chosen):
            raise ValueError(f"categories name a category twice: {list(categories)}")
        return chosen

    def _annotations(self, image_id: int) -> List[dict]:
        """Annotations of the chosen categories, in file order."""
        return [a for a in self.coco.imgToAnns.get(image_id, []) if a["category_id"] in self.category_id_to_label]

    def render_mask(self, image_id: int) -> np.ndarray:
        """uint8 (H, W) semantic mask of one image (see the class docstring for the rules)."""
        info = self.coco.imgs[image_id]
        mask = np.zeros((int(info["height"]), int(info["width"])), dtype=np.uint8)
        annotations = self._annotations(image_id)
        for annotation in annotations:
            if annotation.get("iscrowd", 0):
                mask[self._instance_mask(annotation, mask.shape) > 0] = self.ignore_index
        instances = [a for a in annotations if not a.get("iscrowd", 0)]
        # sorted() is stable: equal areas keep file order, so the later one paints last (on top)
        for annotation in sorted(instances, key=lambda a: -float(a.get("area", 0.0))):
            mask[self._instance_mask(annotation, mask.shape) > 0] = self.category_id_to_label[annotation["category_id"]]
        return mask

    def _instance_mask(self, annotation: dict, shape: Tuple[int, int]) -> np.ndarray:
        if not annotation.get("segmentation"):
            raise ValueError(
                f"annotation {annotation.get('id')} of image {annotation['image_id']} has no segmentation; "
                "semantic masks need polygon or RLE masks (box-only files cannot be used)"
            )
        instance = self.coco.annToMask(annotation)  # (H, W) uint8
        if instance.shape != shape:
            raise ValueError(
                f"annotation {annotation.get('id')} of image {annotation['image_id']} is {instance.shape[0]}x"
                f"{instance.shape[1]} (HxW) but the image record says {shape[0]}x{shape[1]}; fix the file"
            )
        return instance

    def _label_pixels(self, index: int) -> Dict[int, int]:
        values, counts = np.unique(self.render_mask(self.image_ids[index]), return_counts=True)
        return {int(v): int(n) for v, n in zip(values, counts) if v <= self.num_classes}

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, index: int) -> Tuple[Tensor, Tensor]:
        image_id = self.image_ids[index]
        path = self.image_dir / self.coco.imgs[image_id]["file_name"]
        if not path.is_file():
            raise FileNotFoundError(f"image {image_id} not found at {path}; check image_dir")
        image = _load_rgb(path)
        mask = self.render_mask(image_id)
        if image.shape[:2] != mask.shape:
            raise ValueError(
                f"image {image_id} ({path.name}) is {image.shape[0]}x{image.shape[1]} (HxW) but the annotation "
                f"file says {mask.shape[0]}x{mask.shape[1]}; fix the file's height/width"
            )
        if self.transforms is not None:
            return self.transforms(image, mask, image_id)
        return _to_tensors(image, mask)


class MaskFolderDataset(_SegmentationStatistics, torch.utils.data.Dataset):
    """Images and their class-index masks, paired by file stem.

    ``image_dir/<stem>.<png|jpg|...>`` pairs with ``mask_dir/<stem>.png``; each mask is a
    single-channel PNG (mode L or P) of the image's size whose pixel values are class
    indices: 0 = background, 1..K the classes of ``class_names`` in order, ``ignore_index``
    (255) = not labelled. Construction checks the pairing (unpaired files are an error
    listing them); loading a sample checks the size and the values.

    Args:
        image_dir, mask_dir: the two folders (they may be the same folder only if the images
            are not PNGs).
        class_names: names of the K foreground classes, in label order.
        transforms: as in :class:`SemanticSegmentationDataset`; ``key`` is the sample index.
        ignore_index: the mask value of unlabelled pixels.
    """

    def __init__(
        self,
        image_dir: Union[str, Path],
        mask_dir: Union[str, Path],
        class_names: Sequence[str],
        transforms: Optional[Transform] = None,
        ignore_index: int = IGNORE_INDEX,
    ) -> None:
        self.image_dir, self.mask_dir = Path(image_dir), Path(mask_dir)
        for folder in (self.image_dir, self.mask_dir):
            if not folder.is_dir():
                raise FileNotFoundError(f"folder not found: {folder}")
        if not class_names:
            raise ValueError("class_names is empty; name the K foreground classes (mask values 1..K)")
        self.categories = [str(name) for name in class_names]
        self.num_classes = len(self.categories)
        self.ignore_index = int(ignore_index)
        if self.num_classes >= self.ignore_index:
            raise ValueError(f"{self.num_classes} classes do not fit below ignore_index {self.ignore_index}.")
        self.transforms = transforms
        self.frequency_groups: Optional[List[str]] = None
        images = self._by_stem(self.image_dir, IMAGE_EXTENSIONS)
        masks = self._by_stem(self.mask_dir, (".png",))
        if self.image_dir == self.mask_dir:
            images = {stem: path for stem, path in images.items() if path.suffix.lower() != ".png"}
        lonely_images, lonely_masks = sorted(set(images) - set(masks)), sorted(set(masks) - set(images))
        if lonely_images or lonely_masks:
            raise ValueError(
                f"images and masks must pair by file stem: {len(lonely_images)} image(s) in {self.image_dir} have no "
                f"<stem>.png in {self.mask_dir} (e.g. {[images[s].name for s in lonely_images[:5]]}), and "
                f"{len(lonely_masks)} mask(s) have no image (e.g. {[masks[s].name for s in lonely_masks[:5]]})"
            )
        if not images:
            raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {self.image_dir}")
        self.stems: List[str] = sorted(images)
        self.image_paths = [images[stem] for stem in self.stems]
        self.mask_paths = [masks[stem] for stem in self.stems]

    @staticmethod
    def _by_stem(folder: Path, extensions: Tuple[str, ...]) -> Dict[str, Path]:
        found: Dict[str, Path] = {}
        for path in sorted(folder.iterdir()):
            if path.is_file() and path.suffix.lower() in extensions:
                if path.stem in found:
                    raise ValueError(f"two files share the stem {path.stem!r} in {folder}: {found[path.stem].name}, {path.name}")
                found[path.stem] = path
        return found

    def load_mask(self, index: int) -> np.ndarray:
        """uint8 (H, W) class indices of sample ``index``, checked: 0..K or ``ignore_index``."""
        path = self.mask_paths[index]
        with Image.open(path) as mask_image:
            if mask_image.mode not in ("L", "P", "I", "I;16"):
                raise ValueError(
                    f"mask {path} has mode {mask_image.mode}; masks must be single-channel PNGs (mode L or P) "
                    "whose pixel values are class indices"
                )
            mask = np.array(mask_image)
        invalid = np.unique(mask[(mask > self.num_classes) & (mask != self.ignore_index)])
        if invalid.size:
            raise ValueError(
                f"mask {path} holds values {invalid[:10].tolist()} outside 0..{self.num_classes} (background and "
                f"the {self.num_classes} classes) and {self.ignore_index} (ignore); check class_names or the mask"
            )
        return mask.astype(np.uint8)

    def _label_pixels(self, index: int) -> Dict[int, int]:
        values, counts = np.unique(self.load_mask(index), return_counts=True)
        return {int(v): int(n) for v, n in zip(values, counts) if v <= self.num_classes}

    def __len__(self) -> int:
        return len(self.stems)

    def __getitem__(self, index: int) -> Tuple[Tensor, Tensor]:
        image = _load_rgb(self.image_paths[index])
        mask = self.load_mask(index)
        if image.shape[:2] != mask.shape:
            raise ValueError(
                f"{self.image_paths[index].name} is {image.shape[0]}x{image.shape[1]} (HxW) but its mask "
                f"{self.mask_paths[index].name} is {mask.shape[0]}x{mask.shape[1]}; a mask must have its image's size"
            )
        if self.transforms is not None:
            return self.transforms(image, mask, index)
        return _to_tensors(image, mask)


def collate_segmentation(batch: Sequence[Tuple[Tensor, Tensor]]) -> Tuple[Tensor, Tensor]:
    """``[(image (3, H, W), mask (H, W)), ...]`` -> ``(images (N, 3, H, W), masks (N, H, W))``.

    Every sample must have the same size: resize them with the transforms first.
    """
    sizes = {tuple(image.shape[-2:]) for image, _ in batch}
    if len(sizes) > 1:
        raise ValueError(
            f"a batch holds images of different sizes {sorted(sizes)}; give the dataset transforms that "
            "resize to one size (build_segmentation_transforms(image_size=...))"
        )
    images = torch.stack([image for image, _ in batch])  # (N, 3, H, W)
    masks = torch.stack([mask for _, mask in batch])  # (N, H, W)
    return images, masks
