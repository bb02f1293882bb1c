"""The All-in-One (AiO) model (Sec. 3.2, Eqs. 1-2, Fig. 2): backbone -> v0 -> code pyramid -> BN -> codes.

``v0 = F(x)`` is the globally average-pooled backbone output. The code pyramid (Eq. 1) computes
``v_1 = FC_1(v0)`` and ``v_k = FC_k(v_{k-1})`` for the lengths ``l_1 > l_2 > ... > l_N`` (longest first);
with ``pyramid=False`` (the Table 5 "separate models" ablation) every head reads v0: ``v_k = FC_k(v0)``.
Each code has its own BatchNorm1d; Eq. 2 gives ``b_k = sgn(bn(v_k))`` at inference and ``tanh(bn(v_k))``
is the differentiable relaxation used in training (end of Sec. 3.2). A bias-free classifier per code maps
the (relaxed) code to identity logits for the cross-entropy and probability-distillation losses.

The backbone is split into stages. The first ``frozen_stages`` stages form ``model.stem``: frozen
(``requires_grad=False``) and always in eval mode, so a training loop may cache their outputs. The rest,
plus global average pooling, form ``model.body``. Stages:

- ResNet-18/50: [conv1, bn1, relu, maxpool, layer1], [layer2], [layer3], [layer4] (4 stages).
- MobileNetV2 (split at the stride boundaries of ``features``): [0:2] stride 2, [2:4] stride 4,
  [4:7] stride 8, [7:14] stride 16, [14:18] stride 32, [18] the 1x1 conv to 1280 channels (6 stages).

``last_stride=1`` removes the last downsampling (the "BoT" trick, default for ResNet); MobileNetV2 keeps
torchvision's stride 2 by default but accepts ``last_stride=1`` too.

``BACKBONES[name](weights=None, frozen_stages=0, last_stride=...) -> (stem, body, v0_dim)``. ``weights``:
None (random init), ``"imagenet"`` (torchvision's standard weights, needs the network; a failure is a
``ValueError``), or a local state dict with torchvision key names, e.g. ``mobilenet_v2_imagenet.pth``
(features only). A local file must provide every backbone key with the right shape and no unknown key
(classifier/fc keys may be absent or present), else ``ValueError``: a wrong file never gives random weights.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torchvision
from torch import nn

from ctfreid.codes import check_length
from ctfreid.errors import CtfreidError

DEFAULT_LENGTHS = (2048, 512, 128, 32)

BackboneParts = tuple[nn.Sequential, nn.Sequential, int]


# ---------------------------------------------------------------------------------------------- weights
def _load_backbone_weights(net: nn.Module, weights: str | os.PathLike, name: str, used_prefixes: tuple[str, ...]) -> None:
    """Load a torchvision-key-named state dict into ``net``, refusing a file that does not fit.

    ``strict=False`` only so that classifier weights may be absent (or present and unused); every key of the
    backbone parts we use (``used_prefixes``) must be loaded, and no key in the file may be unknown.
    """
    path = Path(weights)
    if not path.is_file():
        raise FileNotFoundError(f"backbone weights file {path} does not exist (expected a torchvision {name} state dict)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors, truncated files, ...
        raise CtfreidError(f"cannot read backbone weights {path} as a torch state dict: {exc}") from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CtfreidError(
            f"backbone weights {path} must be a plain state dict {{key: tensor}} with torchvision {name} key names, "
            f"got {type(state).__name__} with keys such as {list(state)[:3] if isinstance(state, dict) else '-'}"
        )
    model_state = net.state_dict()
    unexpected = sorted(k for k in state if k not in model_state)
    needed = [k for k in model_state if k.startswith(used_prefixes)]
    missing = sorted(k for k in needed if k not in state)
    wrong_shape = sorted(k for k in state if k in model_state and state[k].shape != model_state[k].shape)
    if unexpected or missing or wrong_shape:
        raise CtfreidError(
            f"backbone weights {path} do not match torchvision {name}: "
            f"{len(missing)} backbone keys missing (e.g. {missing[:3]}), "
            f"{len(unexpected)} unknown keys (e.g. {unexpected[:3]}), "
            f"{len(wrong_shape)} keys with another shape (e.g. {wrong_shape[:3]})"
        )
    net.load_state_dict(state, strict=False)


def _make_torchvision(name: str, weights: str | os.PathLike | None, used_prefixes: tuple[str, ...]) -> nn.Module:
    """Build torchvision model ``name``; weights None (random), "imagenet" (download) or a local file."""
    ctor = getattr(torchvision.models, name)
    if weights is None:
        return ctor(weights=None)
    if isinstance(weights, str) and weights == "imagenet":
        try:
            return ctor(weights="DEFAULT")
        except Exception as exc:  # no network, proxy, cache dir not writable ...
            raise CtfreidError(
                f"could not get torchvision's ImageNet weights for {name} ({type(exc).__name__}: {exc}); "
                "this needs the network, or pass a local state dict file instead"
            ) from exc
    net = ctor(weights=None)
    _load_backbone_weights(net, weights, name, used_prefixes)
    return net


# ---------------------------------------------------------------------------------------------- backbones
def _split(stages: list[nn.Module], frozen_stages: int, name: str) -> tuple[nn.Sequential, nn.Sequential]:
    if not isinstance(frozen_stages, int) or not 0 <= frozen_stages <= len(stages):
        raise CtfreidError(f"frozen_stages for {name} must be an integer in [0, {len(stages)}], got {frozen_stages!r}")
    stem = nn.Sequential(*stages[:frozen_stages])
    body = nn.Sequential(*stages[frozen_stages:], nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
    return stem, body


def _resnet(name: str, v0_dim: int) -> Callable[..., BackboneParts]:
    def build(weights: str | None = None, frozen_stages: int = 0, last_stride: int = 1) -> BackboneParts:
        net = _make_torchvision(name, weights, ("conv1.", "bn1.", "layer"))
        if last_stride not in (1, 2):
            raise CtfreidError(f"last_stride must be 1 or 2, got {last_stride!r}")
        if last_stride == 1:
            # BoT trick: keep layer4 at stride 16 (twice the spatial detail for the pooled feature).
            # The stride sits in conv1 (BasicBlock) or conv2 (Bottleneck); the other one is already 1.
            net.layer4[0].conv1.stride = (1, 1)
            net.layer4[0].conv2.stride = (1, 1)
            net.layer4[0].downsample[0].stride = (1, 1)
        stages = [
            nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1),
            net.layer2,
            net.layer3,
            net.layer4,
        ]
        return (*_split(stages, frozen_stages, name), v0_dim)

    build.__doc__ = f"torchvision {name} -> (stem, body, {v0_dim}); stages [conv1..layer1], layer2, layer3, layer4."
    return build


def _mobilenet_v2(weights: str | None = None, frozen_stages: int = 0, last_stride: int = 2) -> BackboneParts:
    """torchvision mobilenet_v2 -> (stem, body, 1280); stages at the stride boundaries of ``features``."""
    net = _make_torchvision("mobilenet_v2", weights, ("features.",))
    if last_stride not in (1, 2):
        raise CtfreidError(f"last_stride must be 1 or 2, got {last_stride!r}")
    if last_stride == 1:
        net.features[14].conv[1][0].stride = (1, 1)  # the depthwise conv of the last stride-2 block
    f = net.features
    stages = [f[0:2], f[2:4], f[4:7], f[7:14], f[14:18], f[18:19]]
    return (*_split(stages, frozen_stages, "mobilenet_v2"), 1280)


BACKBONES: dict[str, Callable[..., BackboneParts]] = {
    "resnet50": _resnet("resnet50", 2048),
    "resnet18": _resnet("resnet18", 512),
    "mobilenet_v2": _mobilenet_v2,
}
DEFAULT_LAST_STRIDE = {"resnet50": 1, "resnet18": 1, "mobilenet_v2": 2}


# ---------------------------------------------------------------------------------------------- model
def sign_codes(bn: torch.Tensor) -> torch.Tensor:
    """Eq. 2's ``b = sgn(bn(v))`` as +-1 values of ``bn``'s dtype; a 0 becomes +1 (bit 1 when packed)."""
    return torch.where(bn >= 0, 1.0, -1.0).to(bn.dtype)


class AiOModel(nn.Module):
    """All-in-One model (Sec. 3.2): one backbone, N codes of different lengths in a pyramid (Eqs. 1-2).

    ``lengths`` lists the code lengths shortest first, as everywhere in the package; ``lengths_longest_first``
    is the order of Eq. 1's chain and of ``fcs``, ``bns`` and ``classifiers``.

    ``forward(x)`` returns a dict with sub-dicts keyed by code length (``int``):

    - ``"v0"``: ``[B, v0_dim]`` pooled backbone feature (the float feature of Table 4).
    - ``"bn"``: ``{L: bn(v_L)}`` real-valued ``[B, L]``.
    - ``"codes"``: ``{L: tanh(s * bn(v_L))}`` in training (relaxation of Eq. 2; ``s = model.tanh_scale``, 1 by
      default, raised over the epochs by the training loop with ``--tanh-scale-end``, HashNet's continuation),
      ``{L: sgn(bn(v_L))}`` as ±1
      floats in eval (Eq. 2; ``sgn(0) = +1``, matching ``ctfreid.codes.binarize`` which maps > 0 to bit 1
      only up to this measure-zero tie).
    - ``"logits"``: ``{L: classifier_L(codes[L])}`` ``[B, num_classes]``, in training mode only.

    ``model.detach_heads = True`` (``--detach-heads``) detaches the input of every head but the longest code's:
    same values, but each shorter code's losses train only its own head (the authors' light-reid detaches its
    code heads from the backbone the same way).
    """

    def __init__(
        self,
        num_classes: int,
        backbone: str = "resnet50",
        lengths: Sequence[int] = DEFAULT_LENGTHS,
        pyramid: bool = True,
        weights: str | None = None,
        frozen_stages: int = 0,
        last_stride: int | None = None,
    ) -> None:
        super().__init__()
        if backbone not in BACKBONES:
            raise CtfreidError(f"backbone must be one of {sorted(BACKBONES)}, got {backbone!r}")
        if not isinstance(num_classes, int) or num_classes < 1:
            raise CtfreidError(f"num_classes must be a positive integer (number of training identities), got {num_classes!r}")
        if isinstance(lengths, (str, bytes)) or not isinstance(lengths, Sequence) or not lengths:
            raise CtfreidError(f"lengths must be a non-empty sequence of code lengths, got {lengths!r}")
        checked = [check_length(length, "code length") for length in lengths]
        if len(set(checked)) != len(checked):
            raise CtfreidError(f"code lengths must be distinct, got {list(lengths)}")
        # Eq. 1 chains the codes longest first; fcs / bns / classifiers (and the state dict) are in that order.
        self.lengths_longest_first: tuple[int, ...] = tuple(sorted(checked, reverse=True))
        self.num_classes = num_classes
        self.backbone_name = backbone
        self.pyramid = bool(pyramid)
        self.frozen_stages = frozen_stages
        self.last_stride = DEFAULT_LAST_STRIDE[backbone] if last_stride is None else last_stride

        self.stem, self.body, self.v0_dim = BACKBONES[backbone](
            weights=weights, frozen_stages=frozen_stages, last_stride=self.last_stride
        )
        for p in self.stem.parameters():
            p.requires_grad_(False)

        # Eq. 1: FC_k maps l_{k-1} -> l_k (pyramid) or v0 -> l_k (independent heads).
        chain = self.lengths_longest_first
        in_dims = [self.v0_dim, *chain[:-1]] if self.pyramid else [self.v0_dim] * len(chain)
        self.fcs = nn.ModuleList(nn.Linear(d, length) for d, length in zip(in_dims, chain))
        self.bns = nn.ModuleList(nn.BatchNorm1d(length) for length in chain)
        for norm in self.bns:
            # BN shift fixed at 0 (as the authors' BNHead): sgn(bn(v)) thresholds each bit at its mean,
            # so bits stay balanced and symmetric to 0, the reason Eq. 2 uses BN at all.
            norm.bias.requires_grad_(False)
        self.classifiers = nn.ModuleList(nn.Linear(length, num_classes, bias=False) for length in chain)
        for fc in self.fcs:
            nn.init.kaiming_normal_(fc.weight, mode="fan_out")
            nn.init.zeros_(fc.bias)
        for cls in self.classifiers:
            nn.init.normal_(cls.weight, std=0.001)
        self.stem.eval()
        # s of the training relaxation tanh(s * bn(v)); not a parameter and not saved: sgn(s * x) = sgn(x) for
        # every s > 0, so it changes training only, never the codes of Eq. 2.
        self.tanh_scale: float = 1.0
        # True: every head but the longest code's takes its input detached (light-reid's fc(feats.detach())), so
        # a code's losses train its own FC / BN / classifier only, and the backbone learns from the longest
        # code's losses alone. Training only, not saved: the forward values are the same either way.
        self.detach_heads: bool = False

    @property
    def lengths(self) -> tuple[int, ...]:
        """The code lengths, shortest first, the order of the search side (``CtFIndex.lengths``,
        ``EncodedSet.lengths``: the CtF stages, Sec. 3.1). The pyramid order is ``lengths_longest_first``."""
        return self.lengths_longest_first[::-1]

    def train(self, mode: bool = True) -> AiOModel:
        """Set train/eval mode; the frozen stem always stays in eval mode (fixed BN statistics)."""
        super().train(mode)
        self.stem.eval()
        return self

    def forward(self, x: torch.Tensor) -> dict:
        """Images ``[B, 3, H, W]`` -> outputs dict (see the class docstring)."""
        return self.forward_from_stem(self.stem(x))

    def forward_from_stem(self, stem_out: torch.Tensor) -> dict:
        """Same as ``forward`` but from a (possibly cached) output of ``self.stem``."""
        v0 = self.body(stem_out)
        bn: dict[int, torch.Tensor] = {}
        codes: dict[int, torch.Tensor] = {}
        logits: dict[int, torch.Tensor] = {}
        prev = v0
        for i, (length, fc, norm, cls) in enumerate(zip(self.lengths_longest_first, self.fcs, self.bns, self.classifiers)):
            x = prev if self.pyramid else v0
            v = fc(x.detach() if self.detach_heads and i > 0 else x)
            prev = v
            b = norm(v)
            bn[length] = b
            if self.training:
                codes[length] = torch.tanh(b if self.tanh_scale == 1.0 else self.tanh_scale * b)
                logits[length] = cls(codes[length])
            else:
                codes[length] = sign_codes(b)
        out = {"v0": v0, "bn": bn, "codes": codes}
        if self.training:
            out["logits"] = logits
        return out

    def config(self) -> dict:
        """Plain dict such that ``AiOModel(**model.config())`` rebuilds this architecture (weights aside)."""
        return {
            "num_classes": self.num_classes,
            "backbone": self.backbone_name,
            "lengths": list(self.lengths_longest_first),  # as in model files written before: unchanged format
            "pyramid": self.pyramid,
            "frozen_stages": self.frozen_stages,
            "last_stride": self.last_stride,
        }


def resolve_device(device: str) -> torch.device:
    """``"auto"`` -> cuda when available, else cpu; ``ValueError`` for unknown or unavailable devices."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise CtfreidError(f"device must be cpu, cuda, cuda:N or auto, got {device!r}") from None
    if dev.type not in ("cpu", "cuda"):
        raise CtfreidError(f"device must be cpu, cuda, cuda:N or auto, got {device!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CtfreidError(f"device {device!r} asked for but CUDA is not available on this machine (use --device cpu)")
    return dev
