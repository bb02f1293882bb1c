"""Self-distillation between the codes of one AiO model (Sec. 3.2, Eqs. 3-4).

The codes are ordered longest first, ``l_1 > l_2 > ... > l_N``; code ``k`` is the teacher of code ``k+1``.
The teacher's side is detached ("fixed during training"): its tensors get no gradient from these losses,
while the student's do. Both losses average over the ``N - 1`` teacher/student pairs; with a single code
they are 0.

Probability distillation (Eq. 3): the soft cross-entropy ``-sum_c p_t log p_s`` of the student's
tempered softmax against the teacher's, averaged over the batch. It differs from ``KL(p_t || p_s)`` only
by the teacher's entropy, a constant for the student, so gradients are the same. It is multiplied by
``T**2`` (Hinton et al.) so its gradient scale does not shrink with the temperature; the paper's T = 1
makes this a no-op.

Similarity distillation (Eq. 4): ``G_k[i, j] / l_k`` is the length-normalised Hamming distance of images
i and j, relaxed to the inner-product form ``(1 - <t_i, t_j> / l_k) / 2`` on tanh codes ``t`` (equal to
``Hamming / l`` for ±1 codes, Sec. 3.2 end). The loss is the squared difference of student and teacher
matrices, **averaged** over all ``B x B`` pairs (diagonal included). The paper writes a sum over i, j;
the authors' code (light-reid, ``SIMSelfDistillLoss``) takes ``.mean()`` over the matrix, and
``lambda_2 = 1000`` only makes sense with a mean (a sum over 64 x 64 pairs would be 4096 times larger).

Who teaches whom (``teacher``). ``"next"`` is Eqs. 3-4 as written: code k teaches code k+1. ``"longest"``
makes the longest code the teacher of every shorter one, as the authors' light-reid code does (its
``ProbSelfDistillLoss`` / ``SIMSelfDistillLoss`` take the first entry of the list as the one teacher).
``"v0"`` (similarity only) makes the real-valued backbone feature v0 the teacher of every code: its
distance matrix is ``(1 - cos(z_i, z_j)) / 2`` of the batch-standardised feature ``z`` (each dimension
centred and scaled over the batch, like a BN without affine parameters; v0 is a post-ReLU feature, all
positive, so its raw cosines are all close to 1). This matrix is 0 on the diagonal and near 0.5 for
unrelated images, the same range as ``Hamming / L`` of ±1 codes. The student side is then the cosine form
``(1 - cos(t_i, t_j)) / 2`` of the relaxed codes (``Hamming / L`` again for ±1 codes): the inner-product
form ``(1 - <t_i, t_j> / L) / 2`` can only reach the teacher's zero diagonal with saturated tanh codes, a
strong pull to ±1 that, in a CUHK03 run with lambda_2 = 1000 and a quantisation loss, made all bits
equal (bit correlations near 1) and kept the cross-entropy at chance. The chained teachers ``"next"``
and ``"longest"`` are relaxed codes themselves: with tanh(bn) codes of unit-variance BN outputs,
``<t_i, t_i> / L`` is about 0.4 and every entry of their matrices lies near 0.3-0.5, so the target is flat
and the loss small (about 1.5e-4 per pair in a CPU run; ``lambda_2 = 1000`` makes that 0.15 against a
cross-entropy of about 20).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

from ctfreid.errors import CtfreidError

PROB_TEACHERS = ("next", "longest")
SIM_TEACHERS = ("next", "longest", "v0")


def teacher_pairs(order: Sequence[int], teacher: str, allowed: Sequence[str] = PROB_TEACHERS) -> list[tuple[int, int]]:
    """(teacher length, student length) pairs of codes ordered longest first: ``"next"`` chains them
    (k teaches k+1, Eqs. 3-4), ``"longest"`` makes the first the teacher of all others."""
    if teacher not in allowed:
        raise CtfreidError(f"distillation teacher must be one of {list(allowed)}, got {teacher!r}")
    if teacher == "longest":
        return [(order[0], s) for s in order[1:]]
    return list(itertools.pairwise(order))


def _ordered(values: Mapping[int, torch.Tensor], lengths: Sequence[int] | None, name: str) -> list[int]:
    """Lengths longest first, checked against the keys of ``values``."""
    if not isinstance(values, Mapping) or not values:
        raise CtfreidError(f"{name} must be a non-empty dict {{code length: tensor}}, got {type(values).__name__}")
    if lengths is None:
        lengths = list(values)
    missing = [length for length in lengths if length not in values]
    if missing:
        raise CtfreidError(f"{name} has no entry for code lengths {missing}; it has {sorted(values)}")
    if len(set(lengths)) != len(lengths):
        raise CtfreidError(f"code lengths must be distinct, got {list(lengths)}")
    return sorted(lengths, reverse=True)


def soft_cross_entropy(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``mean_i T^2 * CE(softmax(teacher_i / T), softmax(student_i / T))``; the teacher is detached."""
    if temperature <= 0:
        raise CtfreidError(f"temperature must be > 0, got {temperature}")
    if student_logits.shape != teacher_logits.shape or student_logits.ndim != 2:
        raise CtfreidError(
            f"student and teacher logits must both be [B, classes], got {tuple(student_logits.shape)} "
            f"and {tuple(teacher_logits.shape)}"
        )
    target = F.softmax(teacher_logits.detach() / temperature, dim=1)
    log_prob = F.log_softmax(student_logits / temperature, dim=1)
    return -(target * log_prob).sum(dim=1).mean() * temperature**2


def probability_distillation(
    logits: Mapping[int, torch.Tensor], lengths: Sequence[int] | None = None, temperature: float = 1.0,
    teacher: str = "next",
) -> torch.Tensor:
    """Eq. 3: ``L_prob = 1/(N-1) sum_k CE(softmax(z_{k+1}/T), softmax(stopgrad(z_k)/T))``.

    ``logits`` maps code length -> ``[B, classes]`` logits; ``lengths`` (default: all keys) are sorted
    longest first and each code is the fixed teacher of the next shorter one (``teacher="next"``), or the
    longest code is the teacher of every other (``"longest"``; the sum is then over those N - 1 pairs).
    """
    order = _ordered(logits, lengths, "logits")
    pairs = teacher_pairs(order, teacher, PROB_TEACHERS)
    if not pairs:
        return logits[order[0]].sum() * 0.0
    total = sum(soft_cross_entropy(logits[s], logits[t], temperature) for t, s in pairs)
    return total / len(pairs)


def normalized_code_distances(codes: torch.Tensor) -> torch.Tensor:
    """``[B, L]`` relaxed codes -> ``[B, B]`` matrix ``(1 - <t_i, t_j> / L) / 2`` (= Hamming / L for ±1)."""
    if codes.ndim != 2:
        raise CtfreidError(f"codes must be [B, L], got shape {tuple(codes.shape)}")
    return (1.0 - codes @ codes.T / codes.shape[1]) * 0.5


def cosine_code_distances(codes: torch.Tensor) -> torch.Tensor:
    """``[B, L]`` relaxed codes -> ``[B, B]`` matrix ``(1 - cos(t_i, t_j)) / 2``: also ``Hamming / L`` for ±1
    codes, but invariant to the codes' scale, so that matching it does not force tanh into saturation."""
    if codes.ndim != 2:
        raise CtfreidError(f"codes must be [B, L], got shape {tuple(codes.shape)}")
    unit = F.normalize(codes, dim=1)
    return (1.0 - unit @ unit.T) * 0.5


def standardized_feature_distances(features: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """``[B, D]`` real features -> ``[B, B]`` matrix ``(1 - cos(z_i, z_j)) / 2``, ``z`` = ``features`` with
    each dimension centred and scaled to unit variance over the batch (the teacher matrix of ``"v0"``)."""
    if features.ndim != 2 or features.shape[0] < 2:
        raise CtfreidError(f"features must be [B, D] with B >= 2, got shape {tuple(features.shape)}")
    z = (features - features.mean(dim=0)) / (features.var(dim=0, unbiased=False) + eps).sqrt()
    z = F.normalize(z, dim=1)
    return (1.0 - z @ z.T) * 0.5


def similarity_distillation(codes: Mapping[int, torch.Tensor], lengths: Sequence[int] | None = None,
                            teacher: str = "next", v0: torch.Tensor | None = None) -> torch.Tensor:
    """Eq. 4: ``L_sim = 1/(N-1) sum_k mean_{i,j} (G_{k+1}[i,j]/l_{k+1} - stopgrad(G_k[i,j])/l_k)^2``.

    ``codes`` maps code length -> ``[B, length]`` relaxed (tanh) codes; ``G / l`` is
    ``normalized_code_distances``. Mean over the ``B x B`` pairs, as in the authors' code (module docstring).
    ``teacher``: ``"next"`` (Eq. 4), ``"longest"`` (the longest code teaches every other; N - 1 pairs) or
    ``"v0"``: ``standardized_feature_distances(v0)`` teaches every code's ``cosine_code_distances`` (N
    terms, averaged over N).
    """
    order = _ordered(codes, lengths, "codes")
    for length in order:
        if codes[length].ndim != 2 or codes[length].shape[1] != length:
            raise CtfreidError(f"codes[{length}] must be [B, {length}], got {tuple(codes[length].shape)}")
    if teacher == "v0":
        if v0 is None:
            raise CtfreidError("similarity distillation from v0 needs the real-valued feature v0")
        target = standardized_feature_distances(v0.detach())
        pairs = [(target, cosine_code_distances(codes[s])) for s in order]
    else:
        pairs = [(normalized_code_distances(codes[t].detach()), normalized_code_distances(codes[s]))
                 for t, s in teacher_pairs(order, teacher, SIM_TEACHERS)]
    if not pairs:
        return codes[order[0]].sum() * 0.0
    return sum((student - target).pow(2).mean() for target, student in pairs) / len(pairs)
