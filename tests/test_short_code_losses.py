"""Short-code options of the training loss (issue #16): the code regularisers (quantisation, bit balance,
decorrelation), the distillation teachers ("next" = Eqs. 3-4, "longest", "v0"), their TrainConfig fields,
and that run configurations saved before these fields existed still load and resume."""

from __future__ import annotations

import itertools
import json
import math

import pytest

torch = pytest.importorskip("torch")

from ctfreid.learn.losses import (
    CODE_REGULARIZERS,
    LossConfig,
    aio_loss,
    bit_balance_loss,
    cross_entropy,
    decorrelation_loss,
    quantization_loss,
    triplet_loss,
)
from ctfreid.learn.self_distillation import (
    cosine_code_distances,
    normalized_code_distances,
    probability_distillation,
    similarity_distillation,
    standardized_feature_distances,
    teacher_pairs,
)
from ctfreid.learn.train import TrainConfig, _check_resumable, train

torch.set_num_threads(1)


# ------------------------------------------------------------------------------------------ regularisers
def test_quantization_loss_hand_worked():
    # (|0.5| - 1)^2 = 0.25, (|-1| - 1)^2 = 0, (0 - 1)^2 = 1, (0.8 - 1)^2 = 0.04 -> mean 1.29 / 4
    t = torch.tensor([[0.5, -1.0], [0.0, 0.8]])
    assert quantization_loss(t).item() == pytest.approx(0.3225)
    assert quantization_loss(torch.tensor([[1.0, -1.0], [-1.0, 1.0]])).item() == 0.0


def test_bit_balance_loss_hand_worked():
    # column means (1, 0, -1) -> squares (1, 0, 1) -> mean 2/3
    t = torch.tensor([[1.0, 1.0, -1.0], [1.0, -1.0, -1.0]])
    assert bit_balance_loss(t).item() == pytest.approx(2 / 3)
    assert bit_balance_loss(torch.tensor([[1.0, -1.0], [-1.0, 1.0]])).item() == 0.0


def test_decorrelation_loss_hand_worked_and_against_the_explicit_matrix():
    # bits 0 and 1 are equal on all 4 images (C_01 = C_10 = 1); bit 2 is uncorrelated with both (C_02 = C_12 = 0)
    # -> off-diagonal squares sum to 2 over the 3 * 2 = 6 entries
    t = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, -1.0], [-1.0, -1.0, 1.0], [-1.0, -1.0, -1.0]])
    assert decorrelation_loss(t).item() == pytest.approx(1 / 3)
    # orthogonal bits (Hadamard columns): 0
    h = torch.tensor([[1.0, 1.0, 1.0], [1.0, -1.0, -1.0], [-1.0, 1.0, -1.0], [-1.0, -1.0, 1.0]])
    assert decorrelation_loss(h).item() == pytest.approx(0.0, abs=1e-7)
    # the B x B Gram shortcut equals the explicit L x L loop on relaxed codes
    t = torch.tanh(torch.randn(6, 5, generator=torch.Generator().manual_seed(3)))
    rows = t.tolist()
    acc = 0.0
    for l, m in itertools.permutations(range(5), 2):
        acc += (sum(r[l] * r[m] for r in rows) / 6) ** 2
    assert decorrelation_loss(t).item() == pytest.approx(acc / 20, rel=1e-5)
    assert decorrelation_loss(torch.ones(3, 1)).item() == 0.0


def test_regularisers_reject_bad_shapes():
    for fn in CODE_REGULARIZERS.values():
        with pytest.raises(ValueError, match=r"\[B, L\]"):
            fn(torch.ones(4))


# ------------------------------------------------------------------------------------------ teachers
def test_teacher_pairs():
    assert teacher_pairs([128, 64, 32], "next") == [(128, 64), (64, 32)]
    assert teacher_pairs([128, 64, 32], "longest") == [(128, 64), (128, 32)]
    with pytest.raises(ValueError, match="teacher"):
        teacher_pairs([128, 64], "v0")


def test_probability_distillation_longest_teacher_hand_worked():
    # one image, 3 classes; p(ln 4, 0, 0) = (2/3, 1/6, 1/6); p(0, 0, 0) = (1/3, 1/3, 1/3)
    q = [math.log(4.0), 0.0, 0.0]
    logits = {128: torch.tensor([q]), 64: torch.zeros(1, 3), 32: torch.tensor([q])}
    uniform_student = math.log(3)  # CE(anything, uniform) = log 3
    self_ce = -(2 / 3 * math.log(2 / 3) + 1 / 3 * math.log(1 / 6))  # CE(p, p) = entropy of p
    uniform_teacher = -(1 / 3 * math.log(2 / 3) + 2 / 3 * math.log(1 / 6))  # CE(uniform, p)
    # longest: 128 -> 64 and 128 -> 32; next: 128 -> 64 and 64 -> 32
    assert probability_distillation(logits, teacher="longest").item() == pytest.approx((uniform_student + self_ce) / 2)
    assert probability_distillation(logits, teacher="next").item() == pytest.approx((uniform_student + uniform_teacher) / 2)


def test_similarity_distillation_longest_teacher_hand_worked():
    # teacher (4 bits): a = (1,1,1,1), b = (1,1,-1,-1): G/l(a, b) = 0.5; 2 bits: a = b -> 0; 1 bit: a != b -> 1
    codes = {4: torch.tensor([[1.0, 1, 1, 1], [1, 1, -1, -1]]), 2: torch.tensor([[1.0, 1], [1, 1]]),
             1: torch.tensor([[1.0], [-1]])}
    # pairs (a, b) and (b, a) of 4 differ: 4 -> 2 by 0.5, 4 -> 1 by 0.5, 2 -> 1 by 1
    assert similarity_distillation(codes, teacher="longest").item() == pytest.approx((0.125 + 0.125) / 2)
    assert similarity_distillation(codes, teacher="next").item() == pytest.approx((0.125 + 0.5) / 2)


def test_standardized_feature_distances_hand_worked():
    # columns (1, 3, 1, 3) and (0, 0, 2, 2): mean 2 and 1, variance 1 -> z rows (-1,-1), (1,-1), (-1,1), (1,1)
    features = torch.tensor([[1.0, 0.0], [3.0, 0.0], [1.0, 2.0], [3.0, 2.0]])
    expected = torch.tensor([[0.0, 0.5, 0.5, 1.0], [0.5, 0.0, 1.0, 0.5], [0.5, 1.0, 0.0, 0.5], [1.0, 0.5, 0.5, 0.0]])
    torch.testing.assert_close(standardized_feature_distances(features), expected, atol=1e-5, rtol=0)
    # invariant to a per-dimension scale and shift (a post-ReLU feature, all positive, is centred first), up to
    # the variance's eps (1e-5 against a variance of 0.25 here)
    torch.testing.assert_close(standardized_feature_distances(features * torch.tensor([10.0, 0.5]) + 7),
                               expected, atol=1e-4, rtol=0)


def test_cosine_code_distances_hand_worked():
    # +-1 codes: (1 - cos) / 2 = Hamming / L, as the inner-product form; a = (1,1,1,1), b = (1,1,-1,-1): 0.5
    signs = torch.tensor([[1.0, 1, 1, 1], [1, 1, -1, -1], [-1, -1, -1, -1]])
    expected = torch.tensor([[0.0, 0.5, 1.0], [0.5, 0.0, 0.5], [1.0, 0.5, 0.0]])
    torch.testing.assert_close(cosine_code_distances(signs), expected)
    torch.testing.assert_close(normalized_code_distances(signs), expected)
    # scaled relaxed codes (0.2 * signs): the cosine form is unchanged, the inner-product form is not
    # (its diagonal becomes (1 - 0.04) / 2 = 0.48)
    torch.testing.assert_close(cosine_code_distances(0.2 * signs), expected)
    assert normalized_code_distances(0.2 * signs)[0, 0].item() == pytest.approx(0.48)


def test_similarity_distillation_from_v0_hand_worked_and_detached():
    v0 = torch.tensor([[1.0, 0.0], [3.0, 0.0], [1.0, 2.0], [3.0, 2.0]], requires_grad=True)
    # 2-bit codes with the signs of the standardised v0: Hamming / 2 equals the teacher matrix -> 0
    match = torch.tensor([[-1.0, -1.0], [1.0, -1.0], [-1.0, 1.0], [1.0, 1.0]])
    assert similarity_distillation({2: match}, teacher="v0", v0=v0).item() == pytest.approx(0.0, abs=1e-9)
    # identical codes: distances all 0; each teacher row holds 0, 0.5, 0.5, 1 -> squares 1.5 per row, 6 / 16;
    # every code is a student of v0 (N terms averaged): (0.375 + 0) / 2
    same = torch.ones(4, 1, requires_grad=True)
    got = similarity_distillation({2: match, 1: same}, teacher="v0", v0=v0)
    assert got.item() == pytest.approx(0.375 / 2, rel=1e-4)
    # the student side is scale-free (cosine form): 0.3 * match gives the same 0
    assert similarity_distillation({2: 0.3 * match}, teacher="v0", v0=v0).item() == pytest.approx(0.0, abs=1e-9)
    # a single code still has its v0 term (the chained teachers give 0 there)
    assert similarity_distillation({1: same}, teacher="v0", v0=v0).item() == pytest.approx(0.375, rel=1e-4)
    got.backward()
    assert v0.grad is None  # the teacher is fixed
    assert same.grad is not None
    with pytest.raises(ValueError, match="v0"):
        similarity_distillation({2: match}, teacher="v0")
    with pytest.raises(ValueError, match="teacher"):
        similarity_distillation({2: match}, teacher="shortest")


# ------------------------------------------------------------------------------------------ Eq. 5 + options
def _outputs(seed: int = 0, batch: int = 8, classes: int = 4) -> dict:
    g = torch.Generator().manual_seed(seed)
    bn = {length: torch.randn(batch, length, generator=g).requires_grad_() for length in (64, 32)}
    return {"v0": torch.rand(batch, 16, generator=g), "bn": bn, "codes": {k: torch.tanh(v) for k, v in bn.items()},
            "logits": {k: torch.randn(batch, classes, generator=g) for k in (64, 32)}}


def test_aio_loss_adds_each_weighted_regulariser_and_the_chosen_teachers():
    out = _outputs()
    pids = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    cfg = LossConfig(lambda2=10.0, sim_teacher="v0", prob_teacher="longest", quantization_weight=2.0,
                     decorrelation_weight=5.0)
    total, terms = aio_loss(out, pids, cfg)
    assert set(terms) == {"ce", "triplet", "prob", "sim", "quantization", "decorrelation", "total"}  # balance: weight 0
    codes = out["codes"]
    ce = sum(cross_entropy(out["logits"][k], pids).item() for k in (64, 32))
    tri = sum(triplet_loss(codes[k], pids).item() for k in (64, 32))
    prob = probability_distillation(out["logits"], teacher="longest").item()
    sim = similarity_distillation(codes, teacher="v0", v0=out["v0"]).item()
    quant = quantization_loss(codes[64]).item() + quantization_loss(codes[32]).item()
    decor = decorrelation_loss(codes[64]).item() + decorrelation_loss(codes[32]).item()
    assert terms["quantization"] == pytest.approx(quant, rel=1e-6)
    assert terms["decorrelation"] == pytest.approx(decor, rel=1e-6)
    assert total.item() == pytest.approx(ce + tri + prob + 10.0 * sim + 2.0 * quant + 5.0 * decor, rel=1e-5)
    # the regularisers act without self-distillation too
    _, terms = aio_loss(out, pids, LossConfig(self_distillation=False, balance_weight=1.0))
    assert set(terms) == {"ce", "triplet", "balance", "total"}
    with pytest.raises(ValueError, match="sim_teacher"):
        aio_loss(out, pids, LossConfig(sim_teacher="nobody"))


def test_shortest_weight_scales_only_the_shortest_codes_ce_and_triplet():
    out = _outputs(seed=3)
    pids = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    codes, logits = out["codes"], out["logits"]
    ce = {k: cross_entropy(logits[k], pids).item() for k in (64, 32)}
    tri = {k: triplet_loss(codes[k], pids).item() for k in (64, 32)}
    for sd in (False, True):
        base, _ = aio_loss(out, pids, LossConfig(self_distillation=sd))
        total, terms = aio_loss(out, pids, LossConfig(self_distillation=sd, shortest_weight=4.0))
        # by hand: 3 more copies of the 32-bit code's CE and triplet, nothing else changes
        assert total.item() == pytest.approx(base.item() + 3.0 * (ce[32] + tri[32]), rel=1e-5)
        assert terms["ce"] == pytest.approx(ce[64] + 4.0 * ce[32], rel=1e-5)
    total.backward()
    assert out["bn"][32].grad.abs().sum() > 0 and out["bn"][64].grad.abs().sum() > 0
    with pytest.raises(ValueError, match="shortest_weight"):
        TrainConfig(shortest_weight=0.0)


# ------------------------------------------------------------------------------------------ config
def test_new_fields_default_to_the_old_behaviour_and_are_checked():
    c = TrainConfig()
    assert (c.prob_teacher, c.sim_teacher) == ("next", "next")
    assert (c.quantization_weight, c.balance_weight, c.decorrelation_weight) == (0.0, 0.0, 0.0)
    lc = c.loss_config()
    assert (lc.sim_teacher, lc.quantization_weight) == ("next", 0.0)
    for bad in ({"quantization_weight": -1.0}, {"sim_teacher": "x"}, {"prob_teacher": "v0"}):
        with pytest.raises(ValueError):
            TrainConfig(**bad)


def test_a_config_saved_before_the_new_fields_loads_and_resumes(tmp_path):
    new_fields = {"prob_teacher", "sim_teacher", "quantization_weight", "balance_weight", "decorrelation_weight",
                  "shortest_weight"}
    old = {k: v for k, v in TrainConfig(device="cpu").to_dict().items() if k not in new_fields}
    (tmp_path / "config.json").write_text(json.dumps(old))
    loaded = TrainConfig.from_dict(json.loads((tmp_path / "config.json").read_text()))
    assert loaded == TrainConfig(device="cpu")
    _check_resumable(old, loaded, tmp_path)  # same run: no error
    with pytest.raises(ValueError, match="quantization_weight"):
        _check_resumable(old, TrainConfig(device="cpu", quantization_weight=1.0), tmp_path)


def test_a_tiny_run_logs_the_regularisers(synth_root, tmp_path):
    config = TrainConfig(backbone="mobilenet_v2", lengths=(128, 32), height=64, width=32, p=4, k=2, epochs=1,
                         warmup_epochs=0, num_workers=0, device="cpu", log_every=0, threads=1, sim_teacher="v0",
                         quantization_weight=1.0, balance_weight=1.0, decorrelation_weight=1.0)
    train(config, synth_root, tmp_path, progress=False)
    epoch = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()][-1]
    assert epoch["type"] == "epoch" and all(math.isfinite(epoch[k]) for k in ("sim", "quantization", "balance",
                                                                               "decorrelation"))


# ------------------------------------------------------------------------------------------ saturation
def test_tanh_scale_grows_geometrically_from_1_to_the_end_value():
    from ctfreid.learn.train import tanh_scale

    c = TrainConfig(epochs=30, tanh_scale_end=10.0)
    # hand-worked: 10 ** (e / 29); epoch 0 -> 1, epoch 29 (the last) -> 10, the middle of the log scale at 14.5
    assert tanh_scale(c, 0) == 1.0
    assert math.isclose(tanh_scale(c, 29), 10.0, rel_tol=1e-12)
    assert math.isclose(tanh_scale(c, 1), 1.0826367338740541, rel_tol=1e-12)  # 10 ** (1 / 29)
    assert math.isclose(tanh_scale(c, 15), 3.2903445623126686, rel_tol=1e-12)  # 10 ** (15 / 29)
    scales = [tanh_scale(c, e) for e in range(30)]
    assert all(b / a == pytest.approx(10 ** (1 / 29)) for a, b in zip(scales, scales[1:]))
    assert {tanh_scale(TrainConfig(epochs=30), e) for e in range(30)} == {1.0}  # default: off
    assert tanh_scale(TrainConfig(epochs=1, tanh_scale_end=10.0), 0) == 1.0
    with pytest.raises(ValueError, match="tanh_scale_end"):
        TrainConfig(tanh_scale_end=0.5)


def test_the_tanh_scale_changes_the_training_codes_only():
    from ctfreid.learn.model import AiOModel

    torch.manual_seed(0)
    model = AiOModel(5, backbone="mobilenet_v2", lengths=(64, 32), frozen_stages=6)
    stem_out = torch.randn(4, 1280, 2, 1)
    model.train()
    plain = model.forward_from_stem(stem_out)
    model.tanh_scale = 3.0
    scaled = model.forward_from_stem(stem_out)
    for length in (64, 32):
        assert torch.allclose(scaled["codes"][length], torch.tanh(3.0 * scaled["bn"][length]))
        assert torch.allclose(plain["codes"][length], torch.tanh(plain["bn"][length]))
        assert torch.allclose(scaled["logits"][length], scaled["codes"][length] @ model.classifiers[0 if length == 64 else 1].weight.T)
    model.eval()
    signs = model.forward_from_stem(stem_out)["codes"]
    model.tanh_scale = 1.0
    assert all(torch.equal(signs[length], model.forward_from_stem(stem_out)["codes"][length]) for length in (64, 32))


def test_no_decay_bn_puts_batchnorm_parameters_and_biases_in_a_group_without_decay():
    from ctfreid.learn.train import parameter_groups

    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1, bias=False), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                              torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3), torch.nn.Linear(3, 2, bias=False))
    net[4].bias.requires_grad_(False)  # frozen: in no group (as the codes' BN shift)
    names = {id(p): n for n, p in net.named_parameters()}
    decay, no_decay = parameter_groups(net, 5e-4, decay_bn=False)
    assert [names[id(p)] for p in decay["params"]] == ["0.weight", "3.weight", "5.weight"]
    assert [names[id(p)] for p in no_decay["params"]] == ["1.weight", "1.bias", "3.bias", "4.weight"]
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (5e-4, 0.0)
    (everything,) = parameter_groups(net, 5e-4)
    assert [names[id(p)] for p in everything["params"]] == [n for n, p in net.named_parameters() if p.requires_grad]
    assert everything["weight_decay"] == 5e-4


def test_the_cli_flags_of_the_saturation_options():
    import argparse

    from ctfreid.cli import train as cli_train

    parser = argparse.ArgumentParser()
    cli_train.add_arguments(parser)
    args = parser.parse_args(["--data", "d", "--out", "o", "--tanh-scale-end", "10", "--no-decay-bn"])
    assert (args.tanh_scale_end, args.decay_bn) == (10.0, False)
    args = parser.parse_args(["--data", "d", "--out", "o"])
    assert (args.tanh_scale_end, args.decay_bn) == (1.0, True)


def test_a_tiny_run_raises_the_tanh_scale_each_epoch_and_skips_decay_on_bn(synth_root, tmp_path):
    config = TrainConfig(backbone="mobilenet_v2", lengths=(128, 32), height=64, width=32, p=4, k=2, epochs=3,
                         warmup_epochs=0, num_workers=0, device="cpu", log_every=0, threads=1, frozen_stages=5,
                         tanh_scale_end=4.0, decay_bn=False)
    train(config, synth_root, tmp_path, progress=False)
    epochs = [e for e in map(json.loads, (tmp_path / "log.jsonl").read_text().splitlines()) if e["type"] == "epoch"]
    assert [e["tanh_scale"] for e in epochs] == pytest.approx([1.0, 2.0, 4.0])
    assert all(set(e["mean_abs_code"]) == {"128", "32"} and all(0 < v < 1 for v in e["mean_abs_code"].values())
               for e in epochs)
    groups = torch.load(tmp_path / "checkpoint.pt", map_location="cpu", weights_only=False)["optimizer"]["param_groups"]
    assert [g["weight_decay"] for g in groups] == [config.weight_decay, 0.0]
    # old configs (without the fields) resume as the defaults; a changed setting is refused
    old = {k: v for k, v in TrainConfig(device="cpu").to_dict().items() if k not in {"tanh_scale_end", "decay_bn"}}
    _check_resumable(old, TrainConfig(device="cpu"), tmp_path)
    with pytest.raises(ValueError, match="decay_bn"):
        _check_resumable(old, TrainConfig(device="cpu", decay_bn=False), tmp_path)


@pytest.mark.parametrize("pyramid", [True, False])
def test_detached_heads_keep_the_shorter_codes_gradients_out_of_the_backbone_and_longer_heads(pyramid):
    from ctfreid.learn.model import AiOModel

    torch.manual_seed(0)
    model = AiOModel(5, backbone="mobilenet_v2", lengths=(128, 64, 32), pyramid=pyramid, frozen_stages=5)
    stem_out = torch.randn(4, 320, 2, 1)  # the output of features[:18]; the body (features[18]) is trained
    model.train()

    def grads(detach: bool, length: int) -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        model.detach_heads = detach
        out = model.forward_from_stem(stem_out)
        out["logits"][length].square().sum().backward()  # a loss of one code only
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    with torch.no_grad():
        model.detach_heads = False
        attached = model.forward_from_stem(stem_out)
        model.detach_heads = True
        detached = model.forward_from_stem(stem_out)
    for length in (128, 64, 32):  # the forward values do not change
        assert torch.equal(attached["codes"][length], detached["codes"][length])
    heads = {128: "0", 64: "1", 32: "2"}  # index of each code's fc / bn / classifier (longest first)
    body = [n for n, _ in model.named_parameters() if n.startswith("body.")]
    assert body
    for length, own in heads.items():
        with_detach, without = grads(True, length), grads(False, length)
        for name, g in with_detach.items():
            head = name.split(".")[1] if name.split(".")[0] in ("fcs", "bns", "classifiers") else None
            reaches = head == own or (length == 128 and name in body)
            assert (g is not None and bool(g.abs().sum() > 0)) == reaches, (length, name)
        # without detaching, the 32-bit loss reaches the backbone (and, in the pyramid, the longer heads)
        if length != 128:
            assert without[body[-1]] is not None and without[body[-1]].abs().sum() > 0
            assert (without["fcs.0.weight"] is not None) == pyramid


def test_the_detach_heads_flag_reaches_the_model_in_a_tiny_run(synth_root, tmp_path, monkeypatch):
    import argparse

    from ctfreid.cli import train as cli_train
    from ctfreid.learn.model import AiOModel

    seen = []  # detach_heads of every training forward
    forward = AiOModel.forward_from_stem

    def spy(self, stem_out):
        if self.training:
            seen.append(self.detach_heads)
        return forward(self, stem_out)

    monkeypatch.setattr(AiOModel, "forward_from_stem", spy)

    parser = argparse.ArgumentParser()
    cli_train.add_arguments(parser)
    assert parser.parse_args(["--data", "d", "--out", "o", "--detach-heads"]).detach_heads is True
    assert parser.parse_args(["--data", "d", "--out", "o"]).detach_heads is False
    config = TrainConfig(backbone="mobilenet_v2", lengths=(64, 32), height=64, width=32, p=4, k=2, epochs=1,
                         warmup_epochs=0, num_workers=0, device="cpu", log_every=0, threads=1, frozen_stages=5,
                         detach_heads=True)
    train(config, synth_root, tmp_path, progress=False)
    assert seen and all(seen)
    assert json.loads((tmp_path / "config.json").read_text())["detach_heads"] is True
    old = {k: v for k, v in TrainConfig(device="cpu").to_dict().items() if k != "detach_heads"}
    _check_resumable(old, TrainConfig(device="cpu"), tmp_path)
    with pytest.raises(ValueError, match="detach_heads"):
        _check_resumable(old, TrainConfig(device="cpu", detach_heads=True), tmp_path)
