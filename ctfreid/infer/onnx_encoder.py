"""The ONNX encoder written by ``ctfreid export`` on onnxruntime: the same codes as the torch run, without torch.

The graph maps normalised images ``images: float32[batch, 3, H, W]`` to ``bn_<L>: float32[batch, L]``, the
BN-normalised projections ``bn(v_L)`` of every code length (Sec. 3.2, Eq. 1); the codes are their signs
(Eq. 2) and ``features`` is ``bn(v_1)`` of the longest length, as in :func:`ctfreid.infer.encoder.encode_records`.
Preprocessing is :mod:`ctfreid.infer.preprocess` (Pillow + NumPy). The file's ``metadata_props`` carry the
run's fingerprint, the code lengths, input size, normalisation, flip test and DTO thresholds (keys in
:data:`META_KEYS`). This module imports no torch.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ctfreid.data.datasets import Record, read_image
from ctfreid.encoded import EncodedSet
from ctfreid.errors import CtfreidError
from ctfreid.infer.encoder import _check_batch_size, encoded_from_bn
from ctfreid.infer.preprocess import preprocess_batch

FORMAT_VERSION = 1
INPUT_NAME = "images"
PREFIX = "ctfreid."
# metadata_props written by ctfreid.infer.export (values are JSON)
META_KEYS = ("format_version", "fingerprint", "lengths", "height", "width", "mean", "std", "flip", "thresholds",
             "weighted_stage1", "backbone", "source", "data_root", "val", "exporter", "opset", "quantization")
NOT_ENCODER = "expected an .onnx file written by 'ctfreid export'"


def output_name(length: int) -> str:
    return f"bn_{int(length)}"


def read_metadata(custom: dict[str, str]) -> dict[str, Any]:
    """``metadata_props`` of an export -> ``{key: value}`` (JSON-decoded, prefix removed)."""
    return {k[len(PREFIX):]: json.loads(v) for k, v in custom.items() if k.startswith(PREFIX)}


def _providers(device: str) -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    if device in ("cuda", "auto") or device.startswith("cuda:"):
        if "CUDAExecutionProvider" in available:
            return ["CUDAExecutionProvider", "CPUExecutionProvider"]
        if device != "auto":
            raise CtfreidError(f"device {device!r}: onnxruntime has no CUDA provider here (available: "
                               f"{', '.join(available)}); use --device cpu or install onnxruntime-gpu")
        return ["CPUExecutionProvider"]
    if device != "cpu":
        raise CtfreidError(f"device must be cpu, cuda or auto, got {device!r}")
    return ["CPUExecutionProvider"]


class OnnxEncoder:
    """An ONNX export of ``ctfreid export`` as an :class:`ctfreid.infer.encoder.Encoder` on onnxruntime."""

    def __init__(self, path: str | os.PathLike, device: str = "cpu", flip: bool | None = None,
                 threads: int | None = None) -> None:
        import onnxruntime as ort

        file = Path(path)
        if not file.is_file():
            raise FileNotFoundError(f"encoder {file} does not exist ({NOT_ENCODER})")
        options = ort.SessionOptions()
        options.log_severity_level = 3  # onnxruntime's own warnings would repeat our one-line error
        if threads is not None:
            if not isinstance(threads, int) or threads < 1:
                raise CtfreidError(f"threads must be a positive integer, got {threads!r}")
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(str(file), options, providers=_providers(device))
            meta = read_metadata(self.session.get_modelmeta().custom_metadata_map)
        except CtfreidError:
            raise
        except Exception as e:  # onnxruntime's errors are multi-line protobuf / graph dumps
            first = (str(e).strip().splitlines() or [type(e).__name__])[0].replace(str(file), "it")
            raise CtfreidError(f"{file} is not a ctfreid encoder: {NOT_ENCODER} (onnxruntime: {first[:90]})") from None
        version = meta.get("format_version")
        if version is None:
            raise CtfreidError(f"{file} is not a ctfreid encoder: {NOT_ENCODER} (it has no ctfreid metadata)")
        if version != FORMAT_VERSION:
            raise CtfreidError(f"{file} is a ctfreid encoder of format {version}, this ctfreid reads format "
                               f"{FORMAT_VERSION}: export it again with this version")
        try:
            self.lengths: list[int] = sorted(int(x) for x in meta["lengths"])
            self.height: int = int(meta["height"])
            self.width: int = int(meta["width"])
            self.fingerprint: str = str(meta["fingerprint"])
            mean, std = [float(x) for x in meta["mean"]], [float(x) for x in meta["std"]]
            graph_flip = bool(meta["flip"])
            thr = meta.get("thresholds")
            weighted = meta.get("weighted_stage1")  # {"thresholds", "weights"} of a weighted stage 1, or None
        except (KeyError, TypeError, ValueError) as e:
            raise CtfreidError(f"{file} has incomplete ctfreid metadata ({e}): {NOT_ENCODER}") from None
        inputs = {i.name: i.shape for i in self.session.get_inputs()}
        outputs = {o.name for o in self.session.get_outputs()}
        missing = [output_name(length) for length in self.lengths if output_name(length) not in outputs]
        if INPUT_NAME not in inputs or missing:
            raise CtfreidError(f"{file} lacks the input {INPUT_NAME!r} or the outputs {missing}: {NOT_ENCODER}")
        if flip is False and graph_flip:
            raise CtfreidError(f"{file} was exported with --flip (the flip test is in its graph): export the run "
                               "again without --flip to encode without it")
        # flip=True on a graph without it: the mirror is run here and averaged before the sign, as torch does
        self._mirror = bool(flip) and not graph_flip
        self.flip: bool = graph_flip or self._mirror
        self.thresholds: dict[int, int] | None = {int(k): int(v) for k, v in thr.items()} if thr else None
        self.weighted = None
        if weighted:
            from ctfreid.search.asymmetric import WeightedFit, Weighting

            try:
                thresholds = {int(k): int(v) for k, v in weighted["thresholds"].items()}
                self.weighted = WeightedFit(thresholds, Weighting.from_dict(weighted["weights"],
                                                                            f"{file}: weighted_stage1 weights"))
            except (KeyError, TypeError, ValueError, AttributeError) as e:
                raise CtfreidError(f"{file} has malformed ctfreid metadata 'weighted_stage1' ({e})") from None
        self.thresholds_source: str = str(file)
        self._outputs = [output_name(length) for length in self.lengths]
        self.mean, self.std = mean, std
        # model_config / file / mean / std as in load_model's info, so the image-index helpers read both alike
        self.info: dict = {**meta, "file": str(file), "runtime": "onnxruntime", "mean": tuple(mean),
                           "model_config": {"lengths": sorted(self.lengths, reverse=True), "backbone": meta.get("backbone")},
                           "std": tuple(std), "graph_flip": graph_flip, "providers": self.session.get_providers(),
                           "input_shape": inputs[INPUT_NAME]}

    def run_bn(self, x: np.ndarray) -> dict[int, np.ndarray]:
        """Normalised images float32 ``[B, 3, H, W]`` -> ``{L: bn(v_L)}`` (flip test included if set)."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        outs = self.session.run(self._outputs, {INPUT_NAME: x})
        bn = dict(zip(self.lengths, outs))
        if self._mirror:
            mirrored = self.session.run(self._outputs, {INPUT_NAME: np.ascontiguousarray(x[..., ::-1])})
            bn = {length: (bn[length] + m) * np.float32(0.5) for length, m in zip(self.lengths, mirrored)}
        return bn

    def preprocess(self, images: Sequence[Any]) -> np.ndarray:
        return preprocess_batch(images, self.height, self.width, self.mean, self.std)

    def _encode(self, images: Sequence[Any], batch_size: int) -> dict[int, np.ndarray]:
        parts: dict[int, list[np.ndarray]] = {length: [] for length in self.lengths}
        for i in range(0, len(images), batch_size):
            for length, values in self.run_bn(self.preprocess(images[i:i + batch_size])).items():
                parts[length].append(values)
        return {length: np.concatenate(p) for length, p in parts.items()}

    def encode_images(self, images: Sequence[Any], batch_size: int = 32) -> EncodedSet:
        """Codes (Eq. 2) and features of decoded images (converted to RGB); pids / camids -1, no paths."""
        _check_batch_size(batch_size)
        if len(images) == 0:
            raise CtfreidError("no images to encode (empty list of images)")
        return encoded_from_bn(self._encode(images, batch_size))

    def encode_records(self, records: Sequence[Record], batch_size: int = 32, progress: bool = False) -> EncodedSet:
        """Codes and features of ``(path, pid, camid)`` records read from disk (errors name the file)."""
        from tqdm import tqdm

        _check_batch_size(batch_size)
        if not records:
            raise CtfreidError("no images to encode (empty list of records)")
        parts: dict[int, list[np.ndarray]] = {length: [] for length in self.lengths}
        with tqdm(total=len(records), desc="encoding", unit="img", disable=not progress, dynamic_ncols=True) as bar:
            for i in range(0, len(records), batch_size):
                chunk = [read_image(path) for path, _, _ in records[i:i + batch_size]]
                for length, values in self._encode(chunk, batch_size).items():
                    parts[length].append(values)
                bar.update(len(chunk))
        return encoded_from_bn({length: np.concatenate(p) for length, p in parts.items()}, records)
