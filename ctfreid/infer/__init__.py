"""Inference: encoding images with a trained model, and image galleries (indexes of person crops).

Needs the model definition, not the training loop. Names are imported lazily::

    from ctfreid.infer import load_model, encode_records
    model, info = load_model("runs/aio")
    encoded = encode_records(model, [("query.jpg", -1, -1)], height=info["height"], width=info["width"])
"""

from __future__ import annotations

import importlib

_LAZY = {
    "load_model": "ctfreid.learn.run_dir",
    "split_records": "ctfreid.data.datasets",
    "model_fingerprint": "ctfreid.learn.run_dir",
    "encode_records": "ctfreid.infer.encoder",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ctfreid.infer' has no attribute {name!r}")
