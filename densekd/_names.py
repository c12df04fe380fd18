"""One wording for 'unknown name' errors across densekd (losses/ keeps its own, being standalone)."""
from __future__ import annotations

import difflib
from typing import Sequence


def unknown_name_message(what: str, name: object, valid: Sequence[str]) -> str:
    """'unknown <what> <name>; valid names: ... Did you mean ...?'"""
    message = f"unknown {what} {name!r}; valid names: {', '.join(sorted(valid))}"
    close = difflib.get_close_matches(str(name), list(valid), n=1)
    if close:
        message += f". Did you mean {close[0]!r}?"
    return message


def did_you_mean(name: str, valid: Sequence[str]) -> str:
    """' Did you mean X?' for the closest valid name, or ''."""
    close = difflib.get_close_matches(name, list(valid), n=1)
    return f" Did you mean {close[0]!r}?" if close else ""
