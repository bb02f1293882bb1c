"""Argument types the ``ctfreid`` sub-commands share: bad values are refused while parsing, before any work."""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0 (e.g. DTO's beta)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text}")
    return value


def output_file(text: str) -> str:
    """argparse type: a file path that can be written, checked before any work starts (an output that
    is a folder, in a missing or read-only folder, is found now, not after hours of encoding)."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a directory, expected a file path")
    if os.path.basename(text) in ("", ".", ".."):  # "out/g.npz/": Path() would drop the "/" and write out/g.npz
        raise argparse.ArgumentTypeError(f"{text} ends in a separator, '.' or '..', expected a file path")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise argparse.ArgumentTypeError(f"cannot write {text}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise argparse.ArgumentTypeError(f"cannot write {text}: permission denied")
    return text


def not_an_input(out: str | None, option: str, inputs: dict[str, str | None]) -> None:
    """Refuse an output that is one of the command's input files, the same path or a link to it (``--json
    q.npz`` with ``--query q.npz``, ``--out`` onto the model being read): the input would be replaced."""
    from ctfreid.errors import CtfreidError

    for name, path in inputs.items():
        if out and path and os.path.realpath(out) == os.path.realpath(path):
            raise CtfreidError(f"{option} {out} is the {name} file {path}: writing there would destroy the {name} "
                               "file; choose another output file")


def seed(text: str) -> int:
    """argparse type: a random seed, an integer in [0, 2**32) (NumPy's seeds; a negative one is refused)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"expected an integer in [0, 2**32), got {value}")
    return value
