"""Which category each class channel means, kept next to a checkpoint.

A detector's class channels follow its training set's label order (labels 1..K: categories
sorted by id). Loaded for another dataset with the same number of categories in another order,
the weights fit, but every class-indexed distillation term would compare the wrong classes.
``tools/train_det.py`` therefore writes ``<checkpoint>.categories.json`` next to each
checkpoint it writes (the checkpoint itself stays a plain state_dict) and refuses a teacher or
student checkpoint whose sidecar lists the categories in another order::

    {"format": 1, "categories": [{"label": 1, "id": 10, "name": "circle"}, ...]}
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence, Union

__all__ = ["CategoryOrderError", "categories_path", "check_categories", "read_categories", "write_categories"]

FORMAT = 1


class CategoryOrderError(ValueError):
    """A checkpoint's categories (from its sidecar) differ from the dataset's, or their order does."""


def categories_path(checkpoint: Union[str, Path]) -> Path:
    return Path(f"{checkpoint}.categories.json")


def write_categories(checkpoint: Union[str, Path], names: Sequence[str], ids: Optional[Sequence[int]] = None) -> Path:
    """Write the sidecar of ``checkpoint``: category ``names`` (and ``ids``) in label order."""
    ids = list(ids) if ids is not None else [None] * len(names)
    records = [{"label": label, "id": cid, "name": name} for label, (cid, name) in enumerate(zip(ids, names), start=1)]
    path = categories_path(checkpoint)
    path.write_text(json.dumps({"format": FORMAT, "categories": records}, indent=1) + "\n", encoding="utf-8")
    return path


def read_categories(checkpoint: Union[str, Path]) -> Optional[list[str]]:
    """The category names in label order from the sidecar of ``checkpoint``; None without one."""
    path = categories_path(checkpoint)
    if not path.is_file():
        return None
    try:
        records = json.loads(path.read_text(encoding="utf-8"))["categories"]
        return [str(record["name"]) for record in sorted(records, key=lambda r: int(r["label"]))]
    except (ValueError, KeyError, TypeError) as error:
        raise CategoryOrderError(
            f"{path} is not a category list ({error}); delete it (the category order then goes unchecked) "
            "or write it again."
        ) from None


def check_categories(checkpoint: Union[str, Path], names: Sequence[str]) -> bool:
    """Refuse ``checkpoint`` if its sidecar lists other categories than ``names`` (the
    dataset's, in label order) or the same in another order. Returns False when there is no
    sidecar to check against, True when the order matches."""
    stored = read_categories(checkpoint)
    if stored is None:
        return False
    names = list(names)
    if stored == names:
        return True
    sidecar = categories_path(checkpoint)
    if sorted(stored) == sorted(names):
        pairs = enumerate(zip(stored, names), start=1)
        moved = [f"label {label} is {a!r} there but {b!r} here" for label, (a, b) in pairs if a != b]
        raise CategoryOrderError(
            f"{checkpoint} was trained with the same categories in another order ({sidecar}): {'; '.join(moved[:5])}"
            f"{'; ...' if len(moved) > 5 else ''}. Its class channels would be compared with the wrong classes. "
            "Use a checkpoint trained on this dataset's label order (categories sorted by id), or reorder its "
            "class channels to this order first."
        )
    missing, extra = [n for n in names if n not in stored], [n for n in stored if n not in names]
    raise CategoryOrderError(
        f"{checkpoint} was trained on other categories ({sidecar}): {len(stored)} there, {len(names)} here; "
        f"not in the checkpoint: {missing[:8]}; not in this dataset: {extra[:8]}. Use a checkpoint trained on "
        "this dataset's categories, or distil feature terms only from a teacher built for its own classes."
    )
