"""Training losses of the AiO model (Eq. 5): cross-entropy, batch-hard triplet, and their sum with the
self-distillation terms of ``ctfreid.learn.self_distillation``.

``L = L_ce + L_tri + lambda_1 * L_prob + lambda_2 * L_sim`` (Eq. 5), where ``L_ce`` and ``L_tri`` are
summed over all codes and ``L_prob`` / ``L_sim`` (Eqs. 3-4) already average over teacher/student pairs.

Triplet distance on codes. Sec. 3.2 relaxes sgn to tanh and "the Hamming distance to the inner-product
distance". The default triplet distance is therefore the length-normalised inner-product distance
``d(i, j) = (1 - <t_i, t_j> / L) / 2`` on the tanh codes, which is exactly ``Hamming / L`` for ±1 codes, the
same quantity that Eq. 4 distils and that the search ranks by. One margin (0.3, Sec. 4.2) then means the
same fraction of bits for every code length, and the distance only reaches its extremes for saturated
codes, so the triplet also pulls codes towards ±1 (less quantisation loss). ``triplet_distance="euclidean"``
(BoT-style Euclidean distance on the tanh codes, scale ~ sqrt(L)) is available for comparison.

Code regularisers (not in the paper; off by default), the usual helpers of short binary codes in learning
to hash, each a function of one ``[B, L]`` relaxed code ``t = tanh(bn(v))`` and summed over the codes with
its own weight (``CODE_REGULARIZERS``):

- ``quantization``: ``mean (|t| - 1)^2``, the gap between the relaxed code and its sign (Eq. 2), so
  that what the cross-entropy and triplet see during training is what the search sees;
- ``balance``: ``mean_l (mean_b t_bl)^2``, each bit +1 on half the images (BN with a fixed zero shift
  centres ``bn(v)``, not ``tanh(bn(v))``'s sign);
- ``decorrelation``: the mean squared off-diagonal entry of ``t^T t / B``, bits that do not repeat each
  other (32 correlated bits carry fewer than 32 bits of information).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ctfreid.errors import CtfreidError
from ctfreid.learn.self_distillation import (
    PROB_TEACHERS,
    SIM_TEACHERS,
    normalized_code_distances,
    probability_distillation,
    similarity_distillation,
)


@dataclass
class LossConfig:
    """Eq. 5 settings; defaults are the paper's (Sec. 4.2)."""

    margin: float = 0.3  # triplet margin
    lambda1: float = 1.0  # weight of the probability distillation (Eq. 3)
    lambda2: float = 1000.0  # weight of the similarity distillation (Eq. 4)
    temperature: float = 1.0  # T of Eq. 3
    self_distillation: bool = True  # Table 5 "SD" switch
    label_smoothing: float = 0.0  # 0 = plain cross-entropy as in the paper
    triplet_distance: str = "hamming"  # "hamming" (normalised inner product) or "euclidean"
    prob_teacher: str = "next"  # Eq. 3 teacher: "next" (k teaches k+1) or "longest"
    sim_teacher: str = "next"  # Eq. 4 teacher: "next", "longest" or "v0" (the real-valued feature)
    quantization_weight: float = 0.0  # weight of quantization_loss, summed over the codes
    balance_weight: float = 0.0  # weight of bit_balance_loss, summed over the codes
    decorrelation_weight: float = 0.0  # weight of decorrelation_loss, summed over the codes
    shortest_weight: float = 1.0  # weight of the shortest code's cross-entropy and triplet terms (1 = Eq. 5)


def cross_entropy(logits: torch.Tensor, pids: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Identity classification loss, mean over the batch; ``pids`` are class indices in [0, classes)."""
    if not 0.0 <= label_smoothing < 1.0:
        raise CtfreidError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    return F.cross_entropy(logits, pids, label_smoothing=label_smoothing)


def euclidean_distances(x: torch.Tensor) -> torch.Tensor:
    """``[B, D]`` -> ``[B, B]`` Euclidean distances (clamped before the sqrt for a finite gradient at 0)."""
    sq = (x * x).sum(dim=1)
    d2 = sq[:, None] + sq[None, :] - 2.0 * (x @ x.T)
    return d2.clamp(min=1e-12).sqrt()


TRIPLET_DISTANCES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "hamming": normalized_code_distances,
    "euclidean": euclidean_distances,
}


def batch_hard_triplet(distances: torch.Tensor, pids: torch.Tensor, margin: float = 0.3) -> torch.Tensor:
    """Batch-hard triplet loss (Hermans et al. 2017) from a ``[B, B]`` distance matrix.

    For each anchor i: ``relu(max_{p: pid_p = pid_i, p != i} d(i, p) - min_{n: pid_n != pid_i} d(i, n) + margin)``,
    averaged over the anchors that have at least one positive and one negative (0 if there are none).
    """
    if distances.ndim != 2 or distances.shape[0] != distances.shape[1] or distances.shape[0] != pids.shape[0]:
        raise CtfreidError(f"distances must be [B, B] with B = len(pids) = {pids.shape[0]}, got {tuple(distances.shape)}")
    same = pids[:, None] == pids[None, :]
    eye = torch.eye(len(pids), dtype=torch.bool, device=pids.device)
    pos_mask = same & ~eye
    neg_mask = ~same
    valid = pos_mask.any(dim=1) & neg_mask.any(dim=1)
    if not valid.any():
        return distances.sum() * 0.0
    inf = torch.finfo(distances.dtype).max
    hardest_pos = distances.masked_fill(~pos_mask, -inf).amax(dim=1)
    hardest_neg = distances.masked_fill(~neg_mask, inf).amin(dim=1)
    return F.relu(hardest_pos - hardest_neg + margin)[valid].mean()


def triplet_loss(codes: torch.Tensor, pids: torch.Tensor, margin: float = 0.3, distance: str = "hamming") -> torch.Tensor:
    """Batch-hard triplet loss on ``[B, L]`` relaxed codes with distance ``"hamming"`` or ``"euclidean"``."""
    if distance not in TRIPLET_DISTANCES:
        raise CtfreidError(f"triplet distance must be one of {sorted(TRIPLET_DISTANCES)}, got {distance!r}")
    return batch_hard_triplet(TRIPLET_DISTANCES[distance](codes), pids, margin)


def _check_codes(codes: torch.Tensor) -> None:
    if codes.ndim != 2 or codes.shape[0] < 1:
        raise CtfreidError(f"codes must be [B, L] with B >= 1, got shape {tuple(codes.shape)}")


def quantization_loss(codes: torch.Tensor) -> torch.Tensor:
    """``mean_{b,l} (|t_bl| - 1)^2``: how far the relaxed codes are from the ±1 codes of Eq. 2."""
    _check_codes(codes)
    return (codes.abs() - 1.0).pow(2).mean()


def bit_balance_loss(codes: torch.Tensor) -> torch.Tensor:
    """``mean_l (mean_b t_bl)^2``: 0 when every bit is +1 on as many images as -1 (for ±1 codes)."""
    _check_codes(codes)
    return codes.mean(dim=0).pow(2).mean()


def decorrelation_loss(codes: torch.Tensor) -> torch.Tensor:
    """Mean squared off-diagonal entry of ``C = t^T t / B`` (``[L, L]``), over the ``L (L - 1)`` entries.

    Computed without the ``L x L`` matrix: ``sum_{l,m} C_lm^2 = ||t t^T||_F^2 / B^2`` (the ``B x B`` Gram
    matrix has the same Frobenius norm), minus the diagonal ``sum_l C_ll^2``.
    """
    _check_codes(codes)
    b, length = codes.shape
    if length < 2:
        return codes.sum() * 0.0
    total = (codes @ codes.T).pow(2).sum() / b**2
    diagonal = (codes.pow(2).sum(dim=0) / b).pow(2).sum()
    return (total - diagonal) / (length * (length - 1))


CODE_REGULARIZERS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "quantization": quantization_loss,
    "balance": bit_balance_loss,
    "decorrelation": decorrelation_loss,
}


def aio_loss(
    outputs: Mapping, pids: torch.Tensor, config: LossConfig | None = None
) -> tuple[torch.Tensor, dict[str, float]]:
    """Eq. 5 over all codes of a training-mode ``AiOModel`` output.

    ``L = sum_L w_L (CE(logits_L) + Tri(codes_L)) + lambda1 * L_prob (Eq. 3) + lambda2 * L_sim (Eq. 4)``,
    with ``w_L = config.shortest_weight`` for the shortest code and 1 for the others (all 1: Eq. 5).
    Plus ``w * sum_L R(codes_L)`` for each code regulariser ``R`` of ``CODE_REGULARIZERS`` whose weight
    ``config.<name>_weight`` is not 0.
    Returns ``(total, terms)`` with ``terms`` = unweighted ``ce``, ``triplet``, (when
    ``config.self_distillation``) ``prob`` and ``sim``, each regulariser in use, plus the weighted ``total``,
    as floats for logging.
    """
    config = config or LossConfig()
    if "logits" not in outputs or "codes" not in outputs:
        raise CtfreidError("aio_loss needs the training-mode outputs of AiOModel (with 'codes' and 'logits'); call model.train()")
    if config.triplet_distance not in TRIPLET_DISTANCES:
        raise CtfreidError(f"triplet_distance must be one of {sorted(TRIPLET_DISTANCES)}, got {config.triplet_distance!r}")
    if config.prob_teacher not in PROB_TEACHERS or config.sim_teacher not in SIM_TEACHERS:
        raise CtfreidError(f"prob_teacher must be one of {list(PROB_TEACHERS)} and sim_teacher one of "
                           f"{list(SIM_TEACHERS)}, got {config.prob_teacher!r} and {config.sim_teacher!r}")
    codes, logits = outputs["codes"], outputs["logits"]
    lengths = sorted(codes, reverse=True)
    w = {length: config.shortest_weight if length == lengths[-1] else 1.0 for length in lengths}
    ce = sum(w[length] * cross_entropy(logits[length], pids, config.label_smoothing) for length in lengths)
    tri = sum(w[length] * triplet_loss(codes[length], pids, config.margin, config.triplet_distance) for length in lengths)
    total = ce + tri
    terms = {"ce": float(ce.detach()), "triplet": float(tri.detach())}
    if config.self_distillation:
        prob = probability_distillation(logits, lengths, config.temperature, config.prob_teacher)
        sim = similarity_distillation(codes, lengths, config.sim_teacher, outputs.get("v0"))
        total = total + config.lambda1 * prob + config.lambda2 * sim
        terms.update(prob=float(prob.detach()), sim=float(sim.detach()))
    for name, regularizer in CODE_REGULARIZERS.items():
        weight = getattr(config, f"{name}_weight")
        if weight:
            value = sum(regularizer(codes[length]) for length in lengths)
            total = total + weight * value
            terms[name] = float(value.detach())
    terms["total"] = float(total.detach())
    return total, terms
