"""int8 encoders: static quantisation of an ONNX export with calibration images (onnxruntime, no torch).

The convolutions of the backbone, where nearly all of the encoder's time goes, run in int8: unsigned 8-bit
activations and signed per-output-channel weights in 7 bits, in onnxruntime's QDQ format, with activation
ranges calibrated (min/max) on real images of the deployment's domain. 7-bit weights (onnxruntime's
``reduce_range``) keep the model exact on CPUs without int8 dot-product instructions (VNNI): there
onnxruntime multiplies uint8 by int8 with ``vpmaddubsw``, whose 16-bit pair sums saturate with 8-bit
weights. On an AMD EPYC Zen 2 (AVX2 only), 8-bit weights flipped 9 % of a random-weight MobileNetV2's
code bits against the float export, 7-bit weights 2.3 % (``tests/test_onnx.py``). The code heads (``FC_k`` and
``bn(v_k)``, Sec. 3.2, Eq. 1) stay float32: they are cheap, and the sign of Eq. 2 is taken of their
outputs, so rounding there would flip bits near zero. Dynamic quantisation (weights only, activation
ranges computed per call) was measured slower than float32 on this CPU (``benchmarks/README.md``).

The result is an encoder like any other export: the same metadata (the run's fingerprint, so indexes built
with the float encoder accept its queries), plus ``quantization``. Its codes differ from the float
encoder's in a small share of bits; ``ctfreid export --int8 --check`` reports how many.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ctfreid._atomic import atomic_write
from ctfreid.errors import CtfreidError
from ctfreid.infer.onnx_encoder import INPUT_NAME, PREFIX, OnnxEncoder

QUANTIZED_OPS = ("Conv", "Clip", "Relu", "Add", "MaxPool")  # the backbone, up to its global pooling
# The first convolutions stay float: on the CUHK03 MobileNetV2 model, quantising them (the stem and the first
# inverted residual, whose depthwise activations have outlier channels) flipped 13-17 % of the code bits;
# keeping 4 float flipped 4-5 % (docs/results-cuhk03.md). They run at the highest resolution but are few.
FLOAT_FIRST_CONVS = 4
CALIBRATION_BATCH = 16
# calibration name -> onnxruntime.quantization.CalibrationMethod member
CALIBRATION_METHODS = {"minmax": "MinMax", "percentile": "Percentile", "entropy": "Entropy"}


def quantize_onnx(src: str | os.PathLike, out: str | os.PathLike, images: Sequence[Any],
                  op_types: Sequence[str] = QUANTIZED_OPS, calibration: str = "minmax",
                  float_first_convs: int = FLOAT_FIRST_CONVS) -> dict:
    """Write the int8 version of the ONNX encoder ``src`` to ``out`` (atomically), with activation ranges
    calibrated on ``images`` (PIL images or paths; a few hundred of the deployment's domain). Returns the
    ``quantization`` metadata entry. ``float_first_convs``: how many of the graph's first convolutions stay
    float32; ``calibration``: how activation ranges are set (``minmax``, ``percentile``, ``entropy``)."""
    import onnx
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if calibration not in CALIBRATION_METHODS:
        raise CtfreidError(f"calibration must be one of {', '.join(CALIBRATION_METHODS)}, got {calibration!r}")
    if len(images) == 0:
        raise CtfreidError("int8 calibration needs at least one image, got none")
    encoder = OnnxEncoder(src)
    if encoder.info.get("quantization"):
        raise CtfreidError(f"{src} is already quantised ({encoder.info['quantization']['scheme']})")

    class Batches(CalibrationDataReader):
        def __init__(self) -> None:
            self.starts = iter(range(0, len(images), CALIBRATION_BATCH))

        def get_next(self) -> dict | None:
            start = next(self.starts, None)
            if start is None:
                return None
            return {INPUT_NAME: encoder.preprocess(images[start:start + CALIBRATION_BATCH])}

    entry = {"scheme": "static QDQ: uint8 activations, int8 per-channel weights in 7 bits", "ops": list(op_types),
             "calibration_images": len(images), "calibration": calibration, "float_first_convs": float_first_convs}
    with tempfile.TemporaryDirectory(prefix="ctfreid-int8-") as tmp:
        pre, quant = Path(tmp) / "pre.onnx", Path(tmp) / "int8.onnx"
        quant_pre_process(str(src), str(pre))  # shape inference + graph optimisation, as quantize_static wants
        convs = [n.name for n in onnx.load(str(pre)).graph.node if n.op_type == "Conv"]
        quantize_static(str(pre), str(quant), Batches(), quant_format=QuantFormat.QDQ, per_channel=True,
                        reduce_range=True,  # 7-bit weights: no saturation without VNNI (see above)
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        op_types_to_quantize=list(op_types),
                        nodes_to_exclude=convs[:float_first_convs],
                        calibrate_method=getattr(CalibrationMethod, CALIBRATION_METHODS[calibration]))
        proto = onnx.load(str(quant))
    props = {**encoder.session.get_modelmeta().custom_metadata_map, PREFIX + "quantization": json.dumps(entry)}
    del proto.metadata_props[:]
    onnx.helper.set_model_props(proto, props)
    proto.producer_name = "ctfreid export --int8"
    with atomic_write(out, "wb") as f:
        f.write(proto.SerializeToString())
    return entry
