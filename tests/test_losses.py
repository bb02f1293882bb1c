"""Losses of Eq. 5 and the self-distillation of Eqs. 3-4 against hand-worked and loop-based references."""

from __future__ import annotations

import itertools
import math

import pytest

torch = pytest.importorskip("torch")

from ctfreid.learn.losses import (  # noqa: E402
    LossConfig,
    aio_loss,
    batch_hard_triplet,
    cross_entropy,
    euclidean_distances,
    triplet_loss,
)
from ctfreid.learn.self_distillation import (  # noqa: E402
    normalized_code_distances,
    probability_distillation,
    similarity_distillation,
)

torch.set_num_threads(1)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _softmax(row: list[float]) -> list[float]:
    m = max(row)
    e = [math.exp(v - m) for v in row]
    return [v / sum(e) for v in e]


# ------------------------------------------------------------------------------------------ cross-entropy
def test_cross_entropy_hand_computed():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]])
    pids = torch.tensor([0, 1])
    p0 = math.exp(2) / (math.exp(2) + 1 + math.exp(-1))
    p1 = math.exp(0.5) / (2 * math.exp(0.5) + math.exp(3))
    expected = -(math.log(p0) + math.log(p1)) / 2
    assert cross_entropy(logits, pids).item() == pytest.approx(expected, rel=1e-6)
    # label smoothing eps: (1 - eps) * NLL + eps * mean over classes of -log p
    eps = 0.1
    logp = [[math.log(p) for p in _softmax(row)] for row in logits.tolist()]
    smooth = sum((1 - eps) * -lp[y] + eps * -sum(lp) / 3 for lp, y in zip(logp, [0, 1])) / 2
    assert cross_entropy(logits, pids, label_smoothing=eps).item() == pytest.approx(smooth, rel=1e-6)
    with pytest.raises(ValueError):
        cross_entropy(logits, pids, label_smoothing=1.5)


# ------------------------------------------------------------------------------------------ triplet
def test_batch_hard_triplet_hand_worked_4_samples():
    d = torch.tensor(
        [
            [0.0, 0.6, 0.4, 0.9],
            [0.6, 0.0, 0.7, 0.2],
            [0.4, 0.7, 0.0, 0.5],
            [0.9, 0.2, 0.5, 0.0],
        ]
    )
    pids = torch.tensor([0, 0, 1, 1])
    # anchor 0: pos 0.6, neg min(0.4, 0.9) -> 0.6 - 0.4 + 0.3 = 0.5
    # anchor 1: pos 0.6, neg min(0.7, 0.2) -> 0.7;  anchor 2: 0.5 - 0.4 + 0.3 = 0.4;  anchor 3: 0.5 - 0.2 + 0.3 = 0.6
    assert batch_hard_triplet(d, pids, margin=0.3).item() == pytest.approx((0.5 + 0.7 + 0.4 + 0.6) / 4)
    assert batch_hard_triplet(d, pids, margin=0.0).item() == pytest.approx((0.2 + 0.4 + 0.1 + 0.3) / 4)
    # margin -0.25 hits the hinge for anchors 0 (-0.05) and 2 (-0.15), they count as 0 in the mean
    assert batch_hard_triplet(d, pids, margin=-0.25).item() == pytest.approx((0.15 + 0.05) / 4)


def _triplet_reference(d: list[list[float]], pids: list[int], margin: float) -> float:
    losses = []
    for a in range(len(pids)):
        pos = [d[a][p] for p in range(len(pids)) if p != a and pids[p] == pids[a]]
        neg = [d[a][n] for n in range(len(pids)) if pids[n] != pids[a]]
        if pos and neg:
            losses.append(max(0.0, max(pos) - min(neg) + margin))
    return sum(losses) / len(losses) if losses else 0.0


@pytest.mark.parametrize("seed", range(5))
def test_batch_hard_triplet_matches_loop_reference(seed):
    g = _gen(seed)
    n = 9
    x = torch.rand(n, n, generator=g)
    d = (x + x.T) / 2
    d.fill_diagonal_(0.0)
    pids = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 3])  # pid 3 has no positive: excluded
    got = batch_hard_triplet(d, pids, margin=0.3).item()
    assert got == pytest.approx(_triplet_reference(d.tolist(), pids.tolist(), 0.3), rel=1e-6)


def test_triplet_without_valid_anchor_is_zero_with_graph():
    d = torch.rand(3, 3, requires_grad=True)
    loss = batch_hard_triplet(d, torch.tensor([0, 1, 2]))
    assert loss.item() == 0.0
    loss.backward()  # still differentiable


def test_triplet_hamming_distance_on_sign_codes_is_hamming_over_length():
    g = _gen(7)
    codes = torch.where(torch.rand(6, 32, generator=g) > 0.5, 1.0, -1.0)
    d = normalized_code_distances(codes)
    for i, j in itertools.product(range(6), repeat=2):
        differ = sum(1 for a, b in zip(codes[i].tolist(), codes[j].tolist()) if a != b)
        assert d[i, j].item() == pytest.approx(differ / 32)
    pids = torch.tensor([0, 0, 1, 1, 2, 2])
    expected = _triplet_reference(d.tolist(), pids.tolist(), 0.3)
    assert triplet_loss(codes, pids, 0.3, "hamming").item() == pytest.approx(expected, rel=1e-6)


def test_euclidean_distances_and_triplet_euclidean():
    x = torch.randn(5, 8, generator=_gen(3))
    torch.testing.assert_close(euclidean_distances(x), torch.cdist(x, x), atol=1e-5, rtol=1e-5)
    pids = torch.tensor([0, 0, 1, 1, 1])
    d = [[math.dist(a, b) for b in x.tolist()] for a in x.tolist()]
    assert triplet_loss(x, pids, 0.3, "euclidean").item() == pytest.approx(_triplet_reference(d, pids.tolist(), 0.3), rel=1e-5)
    with pytest.raises(ValueError, match="distance"):
        triplet_loss(x, pids, 0.3, "cosine")


# ------------------------------------------------------------------------------------------ Eq. 3
def _prob_reference(logits: dict[int, list[list[float]]], temperature: float) -> float:
    order = sorted(logits, reverse=True)
    pair_losses = []
    for t, s in zip(order[:-1], order[1:]):
        per_sample = []
        for zt, zs in zip(logits[t], logits[s]):
            pt = _softmax([v / temperature for v in zt])
            ps = _softmax([v / temperature for v in zs])
            per_sample.append(-sum(a * math.log(b) for a, b in zip(pt, ps)) * temperature**2)
        pair_losses.append(sum(per_sample) / len(per_sample))
    return sum(pair_losses) / len(pair_losses)


def test_probability_distillation_explicit_numbers():
    logits = {
        64: torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 1.0]]),
        32: torch.tensor([[1.0, 1.0, 1.0], [2.0, -1.0, 0.5]]),
        128: torch.tensor([[0.5, 0.0, -0.5], [1.0, 1.0, 0.0]]),
    }
    as_lists = {k: v.tolist() for k, v in logits.items()}
    for temperature in (1.0, 2.0):
        got = probability_distillation(logits, temperature=temperature).item()
        assert got == pytest.approx(_prob_reference(as_lists, temperature), rel=1e-6)
    # one hand-checked value: student uniform over 3 classes -> CE = log 3 whatever the teacher
    two = {64: logits[64], 32: torch.zeros(2, 3)}
    assert probability_distillation(two).item() == pytest.approx(math.log(3), rel=1e-6)
    # explicit lengths restrict the chain (128 -> 32 only)
    got = probability_distillation(logits, lengths=[32, 128]).item()
    assert got == pytest.approx(_prob_reference({128: as_lists[128], 32: as_lists[32]}, 1.0), rel=1e-6)
    with pytest.raises(ValueError, match="no entry"):
        probability_distillation(logits, lengths=[256, 32])


def test_probability_distillation_teacher_detached():
    teacher = torch.randn(4, 5, generator=_gen(1), requires_grad=True)
    student = torch.randn(4, 5, generator=_gen(2), requires_grad=True)
    probability_distillation({64: teacher, 32: student}).backward()
    assert teacher.grad is None
    assert student.grad is not None and student.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------ Eq. 4
def _sim_reference(codes: dict[int, list[list[float]]]) -> float:
    order = sorted(codes, reverse=True)
    pair_losses = []
    for t, s in zip(order[:-1], order[1:]):
        n = len(codes[t])
        acc = 0.0
        for i in range(n):
            for j in range(n):
                g_t = (1 - sum(a * b for a, b in zip(codes[t][i], codes[t][j])) / t) / 2
                g_s = (1 - sum(a * b for a, b in zip(codes[s][i], codes[s][j])) / s) / 2
                acc += (g_s - g_t) ** 2
        pair_losses.append(acc / (n * n))  # mean over pairs, as the authors' code
    return sum(pair_losses) / len(pair_losses)


def test_similarity_distillation_explicit_numbers():
    # hand-worked: teacher (4 bits) codes a=(1,1,1,1), b=(1,1,-1,-1): G/l(a,b) = 2/4 = 0.5, G/l(a,a) = 0
    #               student (2 bits) codes a=(1,1),   b=(1,1):        G/l(a,b) = 0
    # pairs (a,b) and (b,a) differ by 0.5 -> mean over 4 pairs = 2 * 0.25 / 4 = 0.125
    teacher = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, -1.0, -1.0]])
    student = torch.tensor([[1.0, 1.0], [1.0, 1.0]])
    assert similarity_distillation({4: teacher, 2: student}).item() == pytest.approx(0.125)
    g = _gen(5)
    codes = {length: torch.tanh(2 * torch.randn(5, length, generator=g)) for length in (16, 8, 4)}
    got = similarity_distillation(codes).item()
    assert got == pytest.approx(_sim_reference({k: v.tolist() for k, v in codes.items()}), rel=1e-5)
    with pytest.raises(ValueError, match=r"codes\[8\]"):
        similarity_distillation({16: codes[16], 8: codes[4]})


def test_similarity_distillation_teacher_detached():
    g = _gen(9)
    long = torch.randn(6, 16, generator=g).requires_grad_()
    mid = torch.randn(6, 8, generator=g).requires_grad_()
    short = torch.randn(6, 4, generator=g).requires_grad_()
    similarity_distillation({16: torch.tanh(long), 8: torch.tanh(mid), 4: torch.tanh(short)}).backward()
    assert long.grad is None  # only ever a teacher
    assert mid.grad is not None and mid.grad.abs().sum() > 0  # student of 16 (its teacher role adds nothing)
    assert short.grad is not None and short.grad.abs().sum() > 0
    # the middle code's gradient equals that of its student term alone (x 1/2 for the pair average)
    mid2 = mid.detach().clone().requires_grad_()
    (similarity_distillation({16: torch.tanh(long.detach()), 8: torch.tanh(mid2)}) / 2).backward()
    torch.testing.assert_close(mid.grad, mid2.grad)


def test_single_code_distillation_is_zero():
    assert probability_distillation({32: torch.randn(3, 4)}).item() == 0.0
    assert similarity_distillation({32: torch.randn(3, 32)}).item() == 0.0


# ------------------------------------------------------------------------------------------ Eq. 5
def _fake_outputs(seed: int = 0, batch: int = 8, classes: int = 4) -> dict:
    g = _gen(seed)
    bn = {length: torch.randn(batch, length, generator=g).requires_grad_() for length in (64, 32)}
    codes = {length: torch.tanh(v) for length, v in bn.items()}
    logits = {length: torch.randn(batch, classes, generator=g).requires_grad_() for length in (64, 32)}
    return {"v0": torch.randn(batch, 16, generator=g), "bn": bn, "codes": codes, "logits": logits}


def test_aio_loss_sums_eq5_terms():
    out = _fake_outputs()
    pids = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    cfg = LossConfig(lambda1=0.5, lambda2=200.0, temperature=2.0)
    total, terms = aio_loss(out, pids, cfg)
    assert set(terms) == {"ce", "triplet", "prob", "sim", "total"}
    ce = sum(cross_entropy(out["logits"][k], pids).item() for k in (64, 32))
    tri = sum(triplet_loss(out["codes"][k], pids, 0.3, "hamming").item() for k in (64, 32))
    prob = probability_distillation(out["logits"], temperature=2.0).item()
    sim = similarity_distillation(out["codes"]).item()
    assert terms["ce"] == pytest.approx(ce, rel=1e-6)
    assert terms["triplet"] == pytest.approx(tri, rel=1e-6)
    assert terms["prob"] == pytest.approx(prob, rel=1e-6) and terms["sim"] == pytest.approx(sim, rel=1e-6)
    assert total.item() == pytest.approx(ce + tri + 0.5 * prob + 200.0 * sim, rel=1e-5)
    assert terms["total"] == pytest.approx(total.item())
    total.backward()
    assert out["bn"][32].grad is not None


def test_aio_loss_without_self_distillation_and_bad_input():
    out = _fake_outputs()
    pids = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    total, terms = aio_loss(out, pids, LossConfig(self_distillation=False))
    assert set(terms) == {"ce", "triplet", "total"}
    assert total.item() == pytest.approx(terms["ce"] + terms["triplet"], rel=1e-6)
    # the default config is the paper's
    assert LossConfig() == LossConfig(0.3, 1.0, 1000.0, 1.0, True, 0.0, "hamming")
    eval_out = {k: v for k, v in out.items() if k != "logits"}
    with pytest.raises(ValueError, match="training-mode"):
        aio_loss(eval_out, pids)
    with pytest.raises(ValueError, match="triplet_distance"):
        aio_loss(out, pids, LossConfig(triplet_distance="manhattan"))
