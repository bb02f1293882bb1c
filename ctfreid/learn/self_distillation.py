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
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

from ctfreid.errors import CtfreidError


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
    logits: Mapping[int, torch.Tensor], lengths: Sequence[int] | None = None, temperature: float = 1.0
) -> torch.Tensor:
    """Eq. 3: ``L_prob = 1/(N-1) sum_k CE(softmax(z_{k+1}/T), softmax(stopgrad(z_k)/T))``.

    ``logits`` maps code length -> ``[B, classes]`` logits; ``lengths`` (default: all keys) are sorted
    longest first and each code is the fixed teacher of the next shorter one.
    """
    order = _ordered(logits, lengths, "logits")
    pairs = list(zip(order[:-1], order[1:]))
    if not pairs:
        return logits[order[0]].sum() * 0.0
    total = sum(soft_cross_entropy(logits[s], logits[t], temperature) for t, s in pairs)
    return total / len(pairs)


def normalized_code_distances(codes: torch.Tensor) -> torch.Tensor:
    """``[B, L]`` relaxed codes -> ``[B, B]`` matrix ``(1 - <t_i, t_j> / L) / 2`` (= Hamming / L for ±1)."""
    if codes.ndim != 2:
        raise CtfreidError(f"codes must be [B, L], got shape {tuple(codes.shape)}")
    return (1.0 - codes @ codes.T / codes.shape[1]) * 0.5


def similarity_distillation(codes: Mapping[int, torch.Tensor], lengths: Sequence[int] | None = None) -> torch.Tensor:
    """Eq. 4: ``L_sim = 1/(N-1) sum_k mean_{i,j} (G_{k+1}[i,j]/l_{k+1} - stopgrad(G_k[i,j])/l_k)^2``.

    ``codes`` maps code length -> ``[B, length]`` relaxed (tanh) codes; ``G / l`` is
    ``normalized_code_distances``. Mean over the ``B x B`` pairs, as in the authors' code (module docstring).
    """
    order = _ordered(codes, lengths, "codes")
    pairs = list(zip(order[:-1], order[1:]))
    if not pairs:
        return codes[order[0]].sum() * 0.0
    total = 0.0
    for t, s in pairs:
        for length in (t, s):
            if codes[length].ndim != 2 or codes[length].shape[1] != length:
                raise CtfreidError(f"codes[{length}] must be [B, {length}], got {tuple(codes[length].shape)}")
        teacher = normalized_code_distances(codes[t].detach())
        student = normalized_code_distances(codes[s])
        total = total + (student - teacher).pow(2).mean()
    return total / len(pairs)
