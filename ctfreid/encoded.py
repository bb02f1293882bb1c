"""Encoded image sets on disk: the ``.npz`` schema shared by ``encode``, ``calibrate`` and ``evaluate``.

An encoded set holds, for ``n`` images:

- ``pids``: int64[n] person ids (-1 junk, 0 distractor, as in Market-1501);
- ``camids``: int64[n] camera ids;
- ``codes_<L>``: uint8[n, L // 8] packed binary codes, one key per code length ``L``;
- ``features`` (optional): float32[n, d] real-valued features (for the ``float`` baseline);
- ``values_<L>`` (optional): float32[n, L] ``bn(v)`` of the ``L``-bit code (Eq. 2 before the sign), the query
  side of weighted stages (``ctfreid.search.asymmetric``): the shortest length's is :attr:`EncodedSet.values`,
  the others' :attr:`EncodedSet.later_values` (``ctfreid encode`` writes every length's but the longest,
  whose ``bn(v)`` is ``features``);
- ``paths`` (optional): str[n] image paths;
- ``meta`` (optional): a 0-d string array holding a JSON object, :attr:`EncodedSet.meta`. ``ctfreid encode``
  writes ``{"encoder": encoder_record(...), "split": ...}``: the model's fingerprint
  (:func:`ctfreid.learn.run_dir.model_fingerprint`; an ONNX export carries its run's, so the torch run and
  its export count as one model, as for indexes), the flip test, the input size and the int8 scheme.
  :func:`check_same_encoder` refuses to rank sets encoded by different models or with and without the flip
  test; sets without the record (older files) are not checked.

Everything is a plain array, so the file loads with ``allow_pickle=False``.
"""

from __future__ import annotations

import json
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ctfreid._atomic import atomic_write
from ctfreid.codes import CodeSet, check_code_set
from ctfreid.errors import CtfreidError


@dataclass
class EncodedSet:
    """Codes and labels of one split (query, gallery, validation...)."""

    codes: CodeSet
    pids: np.ndarray
    camids: np.ndarray
    features: np.ndarray | None = None
    paths: np.ndarray | None = None
    meta: dict = field(default_factory=dict)  # JSON-serialisable, saved with the arrays
    values: np.ndarray | None = None  # float32[n, L1]: bn(v) of the shortest code, for a weighted stage 1
    # {L: float32[n, L]}: bn(v) of longer codes, for weighted later stages
    later_values: dict[int, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.codes = check_code_set(self.codes, "codes")
        n = next(iter(self.codes.values())).shape[0]
        self.pids = _labels(self.pids, "pids", n)
        self.camids = _labels(self.camids, "camids", n)
        if self.features is not None:
            self.features = np.asarray(self.features, dtype=np.float32)
            if self.features.ndim != 2 or self.features.shape[0] != n:
                raise CtfreidError(f"features must be float32[{n}, d], got shape {self.features.shape}")
        L1 = min(self.codes)
        if self.values is not None:
            self.values = _checked_values(self.values, n, L1, "values")
        if not isinstance(self.later_values, dict):
            raise CtfreidError(f"later_values must be a dict {{length: float32[n, length]}}, "
                               f"got {type(self.later_values).__name__}")
        for L in self.later_values:
            if L not in self.codes or L == L1:
                raise CtfreidError(f"later_values keys must be code lengths after the shortest {self.lengths[1:]}, "
                                   f"got {L!r}")
        self.later_values = {int(L): _checked_values(v, n, int(L), f"later_values[{L}]")
                             for L, v in sorted(self.later_values.items())}
        if self.paths is not None:
            self.paths = np.asarray(self.paths, dtype=str)
            if self.paths.shape != (n,):
                raise CtfreidError(f"paths must have {n} entries, got shape {self.paths.shape}")
        if not isinstance(self.meta, dict):
            raise CtfreidError(f"meta must be a dict (saved as JSON), got {type(self.meta).__name__}")

    def __len__(self) -> int:
        return int(self.pids.shape[0])

    def take(self, idx: np.ndarray) -> EncodedSet:
        """The images ``idx`` (indices or a boolean mask), every per-image array with them; ``meta`` kept."""
        pick = lambda a: None if a is None else a[idx]  # noqa: E731
        return EncodedSet(codes={L: c[idx] for L, c in self.codes.items()}, pids=self.pids[idx],
                          camids=self.camids[idx], features=pick(self.features), paths=pick(self.paths),
                          meta=dict(self.meta), values=pick(self.values),
                          later_values={L: v[idx] for L, v in self.later_values.items()})

    @property
    def lengths(self) -> list[int]:
        return sorted(self.codes)


def _checked_values(values, n: int, L: int, name: str) -> np.ndarray:
    v = np.asarray(values, dtype=np.float32)
    if v.shape != (n, L):
        raise CtfreidError(f"{name} must be float32[{n}, {L}] (bn(v) of the {L}-bit code), got shape {v.shape}")
    if not np.isfinite(v).all():
        raise CtfreidError(f"{name} must be finite (no NaN or infinity)")
    return v


def _labels(values, name: str, n: int) -> np.ndarray:
    arr = np.asarray(values)
    if arr.shape != (n,) or not np.issubdtype(arr.dtype, np.integer):
        raise CtfreidError(f"{name} must be an integer array of {n} entries, got {arr.dtype} {arr.shape}")
    return arr.astype(np.int64)


def save_encoded(path: str | os.PathLike, data: EncodedSet) -> None:
    """Write ``data`` to ``path`` (.npz, uncompressed) atomically."""
    arrays = {"pids": data.pids, "camids": data.camids}
    for length, codes in data.codes.items():
        arrays[f"codes_{length}"] = codes
    if data.features is not None:
        arrays["features"] = data.features
    if data.values is not None:
        arrays[f"values_{min(data.codes)}"] = data.values
    for L, v in data.later_values.items():
        arrays[f"values_{L}"] = v
    if data.paths is not None:
        arrays["paths"] = data.paths
    if data.meta:
        try:
            text = json.dumps(data.meta, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise CtfreidError(f"meta of {path} must be JSON-serialisable: {e}") from e
        arrays["meta"] = np.array(text)
    with atomic_write(path) as f:
        np.savez(f, **arrays)


_EXPECTED = "expected a zip of the arrays pids, camids and codes_<L>, as written by 'ctfreid encode'"


def load_encoded(path: str | os.PathLike, name: str | None = None) -> EncodedSet:
    """Read an encoded set written by ``save_encoded`` (or by any tool following the schema above).

    Raises :class:`~ctfreid.errors.CtfreidError` naming the file for anything that is not such a set: another
    kind of file (a ``.npy`` array, text), missing or misnamed arrays, and non-finite ``features`` (NaN or
    infinite values would give meaningless float-baseline metrics without an error).
    """
    path = Path(path)
    label = name or str(path)
    if not path.is_file():
        raise FileNotFoundError(f"{label}: no such file (expected an .npz with pids, camids, codes_<L>)")
    not_npz = f"{label} is not an .npz of encoded images ({_EXPECTED})"
    if not zipfile.is_zipfile(path):  # np.load would read a .npy array or try to unpickle anything else
        raise CtfreidError(not_npz)
    try:
        with np.load(path, allow_pickle=False) as z:
            keys = set(z.files)
            missing = {"pids", "camids"} - keys
            code_keys = sorted((k for k in keys if k.startswith("codes_")), key=lambda k: int(k[6:]) if k[6:].isdigit() else -1)
            if missing or not code_keys:
                raise CtfreidError(
                    f"{label}: expected arrays pids, camids and codes_<L> (e.g. codes_32), found {sorted(keys)}"
                )
            codes = {}
            for k in code_keys:
                if not k[6:].isdigit():
                    raise CtfreidError(f"{label}: array {k!r} should be named codes_<length in bits>, e.g. codes_128")
                codes[int(k[6:])] = z[k]
            features = z["features"] if "features" in keys else None
            if features is not None and np.issubdtype(features.dtype, np.number):
                bad = ~np.isfinite(features)
                if bad.any():
                    rows = int(bad.reshape(len(features), -1).any(axis=1).sum()) if features.ndim else 1
                    raise CtfreidError(
                        f"{label}: array 'features' has non-finite values (NaN or infinity) in {rows} of "
                        f"{len(features) if features.ndim else 1} rows; expected finite float features"
                    )
            meta = _read_meta(z["meta"], label) if "meta" in keys else {}
            values = {}
            for k in sorted(k for k in keys if k.startswith("values_")):
                if not k[7:].isdigit() or int(k[7:]) not in codes:
                    raise CtfreidError(f"{label}: array {k!r} should be named values_<L> for a code length L of "
                                       f"the set {sorted(codes)} (bn(v) of that code)")
                values[int(k[7:])] = z[k]
            L1 = min(codes)
            return EncodedSet(
                codes=codes,
                pids=z["pids"],
                camids=z["camids"],
                features=features,
                paths=z["paths"] if "paths" in keys else None,
                meta=meta,
                values=values.pop(L1, None),
                later_values=values,
            )
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise CtfreidError(f"{not_npz}: {e}") from e
    except ValueError as e:
        if str(e).startswith(label):
            raise
        if "pickle" in str(e):  # an object array inside the zip: not something save_encoded writes
            raise CtfreidError(f"{not_npz}: it holds an object array") from e
        raise CtfreidError(f"{label}: {e}") from e


def _read_meta(array: np.ndarray, label: str) -> dict:
    try:
        meta = json.loads(str(array[()]))
    except (ValueError, TypeError, IndexError) as e:
        raise CtfreidError(f"{label}: array 'meta' must be a JSON object, got {str(array)[:60]!r}") from e
    if not isinstance(meta, dict):
        raise CtfreidError(f"{label}: array 'meta' must be a JSON object, got {type(meta).__name__}")
    return meta


# What makes two encoded sets comparable: the fields of ``meta["encoder"]`` that must be equal, and their names.
SAME_ENCODER_FIELDS = {"fingerprint": "model fingerprint", "flip": "flip test", "input_size": "input size"}


def encoder_record(fingerprint: str, flip: bool, height: int, width: int, quantization: str | None = None,
                   model: str | None = None, runtime: str | None = None) -> dict:
    """``meta["encoder"]`` of an encoded set: who encoded it (see the module docstring)."""
    return {"fingerprint": str(fingerprint), "flip": bool(flip), "input_size": [int(height), int(width)],
            "quantization": quantization, "model": model, "runtime": runtime}


def check_same_encoder(sets: dict[str, EncodedSet]) -> list[str]:
    """Refuse (:class:`~ctfreid.errors.CtfreidError`, naming both sets and every differing field) sets, keyed by
    their label (``"--query q.npz"``), whose ``meta["encoder"]`` records differ in model fingerprint, flip test
    or input size: their distances would be meaningless. Returns notes: sets without a record (written
    before ``ctfreid encode`` kept one: not checked) and int8 vs float encoders of one model (allowed, as for
    indexes; their bits differ in a few percent)."""
    notes, recorded = [], {}
    for label, data in sets.items():
        record = data.meta.get("encoder")
        if isinstance(record, dict):
            recorded[label] = record
    lacking = [label for label in sets if label not in recorded]
    if lacking and len(sets) > 1:
        notes.append(f"note: {' and '.join(lacking)} {'has' if len(lacking) == 1 else 'have'} no record of its "
                     "encoder (an older 'ctfreid encode'): not checked for the same model and flip test")
    if len(recorded) < 2:
        return notes
    (first, ref), *others = recorded.items()

    def show(value):
        if isinstance(value, bool):
            return "on" if value else "off"
        return "x".join(map(str, value)) if isinstance(value, list) else value

    for label, record in others:
        diffs = [f"{name} {show(ref.get(key))} vs {show(record.get(key))}"
                 for key, name in SAME_ENCODER_FIELDS.items() if ref.get(key) != record.get(key)]
        if diffs:
            raise CtfreidError(f"{first} and {label} were encoded differently ({'; '.join(diffs)}): their codes are "
                               "not comparable; encode both with the same model and options")
        if ref.get("quantization") != record.get("quantization"):
            notes.append(f"note: {first} was encoded by the {ref.get('quantization') or 'float'} encoder, {label} by "
                         f"the {record.get('quantization') or 'float'} one of the same model (bits differ slightly)")
    return notes
