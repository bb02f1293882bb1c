"""AiO model (Sec. 3.2, Eqs. 1-2): shapes, pyramid structure, codes, frozen stem, weights loading."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")

from ctfreid.learn.losses import aio_loss  # noqa: E402
from ctfreid.learn.model import BACKBONES, AiOModel  # noqa: E402

torch.set_num_threads(1)
SMALL = (2, 3, 64, 32)
V0_DIM = {"resnet50": 2048, "resnet18": 512, "mobilenet_v2": 1280}


def _x(n: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randn((n, *SMALL[1:]), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_output_shapes_each_backbone(backbone):
    torch.manual_seed(0)
    model = AiOModel(num_classes=7, backbone=backbone, lengths=(128, 32))
    out = model(_x(4))
    assert out["v0"].shape == (4, V0_DIM[backbone]) == (4, model.v0_dim)
    assert list(out["codes"]) == [128, 32] and list(out["bn"]) == [128, 32]
    for length in (128, 32):
        assert out["bn"][length].shape == (4, length)
        assert out["codes"][length].shape == (4, length)
        assert out["logits"][length].shape == (4, 7)


def test_lengths_shortest_first_like_the_search_side_and_validated():
    model = AiOModel(num_classes=3, backbone="resnet18")
    assert model.lengths == (32, 128, 512, 2048)  # as CtFIndex.lengths / EncodedSet.lengths: CtF stage order
    assert model.lengths_longest_first == (2048, 512, 128, 32)  # Eq. 1's chain: fcs / bns / classifiers
    other = AiOModel(3, "resnet18", lengths=[32, 256, 64])
    assert other.lengths == (32, 64, 256) and other.lengths_longest_first == (256, 64, 32)
    assert [bn.num_features for bn in other.bns] == [256, 64, 32]
    for bad in [(2048, 500), (16,), (8192,), (64, 64), ()]:
        with pytest.raises(ValueError):
            AiOModel(num_classes=3, backbone="resnet18", lengths=bad)
    with pytest.raises(ValueError, match="backbone"):
        AiOModel(num_classes=3, backbone="vgg16")
    with pytest.raises(ValueError, match="frozen_stages"):
        AiOModel(num_classes=3, backbone="resnet18", frozen_stages=5)
    with pytest.raises(ValueError, match="num_classes"):
        AiOModel(num_classes=0, backbone="resnet18")


def test_pyramid_on_off_structure_and_computation():
    torch.manual_seed(0)
    pyr = AiOModel(5, "resnet18", lengths=(256, 64, 32), pyramid=True)
    sep = AiOModel(5, "resnet18", lengths=(256, 64, 32), pyramid=False)
    # Eq. 1: FC_k maps l_{k-1} -> l_k; without the pyramid every head reads v0.
    assert [(fc.in_features, fc.out_features) for fc in pyr.fcs] == [(512, 256), (256, 64), (64, 32)]
    assert [(fc.in_features, fc.out_features) for fc in sep.fcs] == [(512, 256), (512, 64), (512, 32)]
    for model in (pyr, sep):
        model.eval()
        out = model(_x(3))
        v0 = out["v0"]
        prev = v0
        for length, fc, bn in zip(model.lengths_longest_first, model.fcs, model.bns):
            v = fc(prev if model.pyramid else v0)
            torch.testing.assert_close(out["bn"][length], bn(v))
            prev = v


def test_train_codes_are_tanh_eval_codes_are_signs():
    torch.manual_seed(0)
    model = AiOModel(4, "mobilenet_v2", lengths=(64, 32))
    out = model(_x(4))
    for length in (64, 32):
        torch.testing.assert_close(out["codes"][length], torch.tanh(out["bn"][length]))
        torch.testing.assert_close(
            out["logits"][length], out["codes"][length] @ model.classifiers[model.lengths_longest_first.index(length)].weight.T
        )
    model.eval()
    out = model(_x(4))
    assert "logits" not in out
    for length in (64, 32):
        codes, bn = out["codes"][length], out["bn"][length]
        assert set(codes.unique().tolist()) <= {-1.0, 1.0}
        expected = torch.tensor([[1.0 if v >= 0 else -1.0 for v in row] for row in bn.tolist()])
        torch.testing.assert_close(codes, expected)
    with torch.no_grad():  # a BN scale of 0 makes bn(v) exactly 0 for bit 5: sgn(0) must give +1
        model.bns[1].weight[5] = 0.0
    out = model(_x(4))
    assert torch.all(out["bn"][32][:, 5] == 0) and torch.all(out["codes"][32][:, 5] == 1.0)


def test_bn_bias_frozen_at_zero():
    model = AiOModel(4, "resnet18", lengths=(64, 32))
    for bn in model.bns:
        assert not bn.bias.requires_grad and torch.all(bn.bias == 0)


def test_frozen_stem_no_grad_eval_mode_and_forward_from_stem():
    torch.manual_seed(0)
    model = AiOModel(4, "mobilenet_v2", lengths=(64, 32), frozen_stages=3)
    assert len(model.stem) == 3 and all(not p.requires_grad for p in model.stem.parameters())
    assert any(p.requires_grad for p in model.body.parameters())
    model.train()
    assert model.training and model.body.training
    assert not model.stem.training and not any(m.training for m in model.stem.modules())
    stem_bn = [m for m in model.stem.modules() if isinstance(m, torch.nn.BatchNorm2d)][0]
    before = stem_bn.running_mean.clone()
    x = _x(4)
    pids = torch.tensor([0, 0, 1, 1])
    total, _ = aio_loss(model(x), pids)
    total.backward()
    assert torch.equal(stem_bn.running_mean, before)  # frozen BN statistics do not move
    assert all(p.grad is None for p in model.stem.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.body.parameters())
    model.eval()
    a = model(x)
    b = model.forward_from_stem(model.stem(x))
    for key in ("bn", "codes"):
        for length in model.lengths:
            torch.testing.assert_close(a[key][length], b[key][length])
    torch.testing.assert_close(a["v0"], b["v0"])


def test_resnet_stages_and_last_stride():
    x = _x(2)
    for last_stride, spatial in ((1, (4, 2)), (2, (2, 1))):
        model = AiOModel(3, "resnet18", lengths=(32,), last_stride=last_stride).eval()
        fmap = model.body[:-2](model.stem(x))  # body without pooling
        assert fmap.shape == (2, 512, *spatial)
    assert AiOModel(3, "resnet18", lengths=(32,)).last_stride == 1
    model = AiOModel(3, "resnet18", lengths=(32,), frozen_stages=4)
    assert len(model.stem) == 4 and len(model.body) == 2  # body = pooling only
    assert model.stem(x).shape == (2, 512, 4, 2)


def test_config_rebuilds_model():
    torch.manual_seed(0)
    model = AiOModel(6, "mobilenet_v2", lengths=(128, 32), pyramid=False, frozen_stages=2).eval()
    cfg = model.config()
    assert cfg == {
        "num_classes": 6,
        "backbone": "mobilenet_v2",
        "lengths": [128, 32],
        "pyramid": False,
        "frozen_stages": 2,
        "last_stride": 2,
    }
    clone = AiOModel(**cfg)
    clone.load_state_dict(model.state_dict(), strict=True)
    # model files store the lengths longest first (the format before `lengths` became shortest first):
    # they load into the same layers in either order
    again = AiOModel(**{**cfg, "lengths": [32, 128]})
    again.load_state_dict(model.state_dict(), strict=True)
    assert again.lengths == clone.lengths == (32, 128)
    clone.eval()
    x = _x(2)
    torch.testing.assert_close(clone(x)["bn"][32], model(x)["bn"][32])


def _backbone_values(model: AiOModel) -> list[torch.Tensor]:
    return list(model.stem.state_dict().values()) + list(model.body.state_dict().values())


def test_weights_round_trip_mobilenet(tmp_path):
    torch.manual_seed(1)
    net = torchvision.models.mobilenet_v2(weights=None)
    path = tmp_path / "mnv2.pth"
    torch.save({k: v for k, v in net.state_dict().items() if k.startswith("features.")}, path)  # no classifier
    torch.manual_seed(2)
    model = AiOModel(3, "mobilenet_v2", lengths=(32,), weights=str(path), frozen_stages=2)
    got = _backbone_values(model)
    want = list(net.features.state_dict().values())
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    random_model = AiOModel(3, "mobilenet_v2", lengths=(32,))
    assert not torch.equal(_backbone_values(random_model)[0], want[0])


def test_weights_round_trip_resnet_full_state_dict(tmp_path):
    torch.manual_seed(3)
    net = torchvision.models.resnet18(weights=None)
    path = tmp_path / "r18.pth"
    torch.save(net.state_dict(), path)  # includes fc.*, which is allowed and unused
    model = AiOModel(3, "resnet18", lengths=(32,), weights=path)
    sd = net.state_dict()
    want = [v for k, v in sd.items() if not k.startswith("fc.")]
    got = _backbone_values(model)
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_wrong_weights_files_raise(tmp_path):
    r18 = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), r18)
    with pytest.raises(ValueError, match="do not match"):
        AiOModel(3, "mobilenet_v2", lengths=(32,), weights=str(r18))
    partial = tmp_path / "partial.pth"
    sd = torchvision.models.mobilenet_v2(weights=None).state_dict()
    torch.save({k: v for k, v in sd.items() if not k.startswith("features.18")}, partial)
    with pytest.raises(ValueError, match="missing"):
        AiOModel(3, "mobilenet_v2", lengths=(32,), weights=str(partial))
    prefixed = tmp_path / "prefixed.pth"
    torch.save({"module." + k: v for k, v in sd.items()}, prefixed)
    with pytest.raises(ValueError, match="unknown keys"):
        AiOModel(3, "mobilenet_v2", lengths=(32,), weights=str(prefixed))
    not_a_dict = tmp_path / "list.pth"
    torch.save([1, 2, 3], not_a_dict)
    with pytest.raises(ValueError, match="state dict"):
        AiOModel(3, "mobilenet_v2", lengths=(32,), weights=str(not_a_dict))
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="cannot read"):
        AiOModel(3, "mobilenet_v2", lengths=(32,), weights=str(garbage))
    with pytest.raises(FileNotFoundError):
        AiOModel(3, "mobilenet_v2", lengths=(32,), weights=str(tmp_path / "missing.pth"))


def test_imagenet_download_failure_is_a_clear_error(monkeypatch):
    real = torchvision.models.mobilenet_v2

    def offline(weights=None, **kwargs):
        if weights is not None:
            raise OSError("network is unreachable")
        return real(weights=None, **kwargs)

    monkeypatch.setattr(torchvision.models, "mobilenet_v2", offline)
    with pytest.raises(ValueError, match="ImageNet weights for mobilenet_v2.*network is unreachable"):
        AiOModel(3, "mobilenet_v2", lengths=(32,), weights="imagenet")


def test_encoded_features_are_the_longest_codes_bn(synth_dataset):
    """``encode_records``'s float features are bn(v) of the longest code (Table 4's float row), whatever the
    order of ``model.lengths``."""
    from ctfreid.data.datasets import read_image
    from ctfreid.data.transforms import TransformConfig, build_test_transform
    from ctfreid.infer.encoder import encode_records

    torch.manual_seed(0)
    model = AiOModel(3, "mobilenet_v2", lengths=(32, 128, 64)).eval()
    records = synth_dataset.query[:3]
    enc = encode_records(model, records, height=32, width=16, progress=False)
    assert enc.features.shape == (3, 128)
    tf = build_test_transform(TransformConfig(height=32, width=16))
    x = torch.stack([tf(read_image(p)) for p, _, _ in records])
    with torch.no_grad():
        bn = model(x)["bn"][128]
    np.testing.assert_allclose(enc.features, bn.numpy(), rtol=1e-4, atol=1e-5)
