import json

import pytest
import torch

from modalink.projectors import (
    KINDS,
    ProjectorConfig,
    build_projector,
    load_projector,
    pad_features,
    project,
    save_projector,
)


def make(kind: str, **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = ProjectorConfig(kind=kind, d_in=32, d_llm=24, n_tokens=5, n_layers=2, d_model=16, n_heads=4, **kw)
    if kind in ("perceiver", "qformer"):
        cfg.max_positions = 8
    return build_projector(cfg)


@pytest.mark.parametrize("kind", KINDS)
def test_output_shape_for_any_input_length(kind):
    proj = make(kind)
    for n_in in (1, 7, 49):
        assert proj(torch.randn(3, n_in, 32)).shape == (3, 5, 24)


@pytest.mark.parametrize("kind", KINDS)
def test_every_parameter_gets_a_gradient(kind):
    proj = make(kind)
    x = torch.randn(2, 9, 32, requires_grad=True)
    proj(x).pow(2).mean().backward()
    for name, p in proj.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert x.grad.abs().sum() > 0


@pytest.mark.parametrize("kind", KINDS)
def test_save_load_round_trip(kind, tmp_path):
    proj = make(kind).eval()
    save_projector(proj, tmp_path, {"modality": "image"})
    assert (tmp_path / "projector.safetensors").exists()
    meta = json.loads((tmp_path / "config.json").read_text())
    assert meta["projector"]["kind"] == kind and meta["modality"] == "image"
    loaded, meta2 = load_projector(tmp_path)
    x = torch.randn(2, 11, 32)
    with torch.no_grad():
        assert torch.equal(proj(x), loaded(x))
    assert meta2 == meta


@pytest.mark.parametrize("kind", KINDS)
def test_padding_does_not_change_an_items_output(kind):
    """A short item batched with a long one (padded + masked) projects as it does alone."""
    proj = make(kind).eval()
    short, long = torch.randn(4, 32), torch.randn(10, 32)
    x, mask = pad_features([short, long])
    with torch.no_grad():
        batched = proj(x, mask)
        alone = proj(short[None])
    torch.testing.assert_close(batched[0], alone[0], atol=1e-5, rtol=1e-5)


def test_bad_configs_are_rejected():
    with pytest.raises(ValueError, match="unknown projector kind"):
        ProjectorConfig(kind="transformer")
    with pytest.raises(ValueError, match="n_tokens"):
        ProjectorConfig(n_tokens=0)
    with pytest.raises(ValueError, match="divisible"):
        ProjectorConfig(kind="perceiver", d_model=30, n_heads=8)
    with pytest.raises(ValueError, match="unknown projector config keys"):
        ProjectorConfig.from_dict({"kind": "mlp", "bogus": 1})


def test_mlp_positions_mark_where_each_pooled_token_is(tmp_path):
    """With ``token_positions`` the MLP adds a learned embedding per pooled position (a video's time): the same
    frame at two times projects differently; without, alike."""
    x = torch.randn(1, 1, 32).expand(1, 8, 32)  # one frame, eight times
    plain = make("mlp").eval()
    with torch.no_grad():
        out = plain(x)
    torch.testing.assert_close(out[0, 0], out[0, -1])
    timed = make("mlp", token_positions=5).eval()
    with torch.no_grad():
        timed.pos.normal_()
        out = timed(x)
    assert not torch.allclose(out[0, 0], out[0, -1])
    save_projector(timed, tmp_path)
    loaded, _ = load_projector(tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(x), out)


def test_mlp_without_stretch_keeps_a_short_items_length(tmp_path):
    """Without ``stretch`` an item of fewer tokens than ``n_tokens`` keeps its length (a one-frame video is one
    token, not that frame repeated): ``project`` returns each item's own rows, the same batched as alone; a long
    item is pooled to ``n_tokens`` as before; the setting survives save/load and old configs stretch."""
    proj = make("mlp", token_positions=5, stretch=False).eval()
    one, three, long = torch.randn(1, 32), torch.randn(3, 32), torch.randn(12, 32)
    with torch.no_grad():
        proj.pos.normal_()
        batched = project(proj, *pad_features([one, three, long]))
        alone = [project(proj, f[None])[0] for f in (one, three, long)]
    assert [tuple(o.shape) for o in batched] == [(1, 24), (3, 24), (5, 24)]
    for b, a in zip(batched, alone, strict=True):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
    stretched = make("mlp", token_positions=5)
    stretched.load_state_dict(proj.state_dict())
    with torch.no_grad():
        assert project(stretched.eval(), one[None])[0].shape == (5, 24)  # the frame repeated, as shipped v4 reads it
    save_projector(proj, tmp_path)
    loaded, meta = load_projector(tmp_path)
    assert meta["projector"]["stretch"] is False and project(loaded, one[None])[0].shape == (1, 24)
    assert ProjectorConfig.from_dict({"kind": "mlp"}).stretch  # configs written before the field stretch


def test_shipped_adapters_load():
    """Every adapter the repo ships loads into today's projector classes (an mlp adapter carries a max_positions
    that its kind never used: reading it as position embeddings broke the audio adapter)."""
    from modalink.config import Settings
    from modalink.registry import AdapterRegistry

    registry = AdapterRegistry(Settings().adapters_dir)
    for modality in ("image", "audio", "imu", "video"):
        assert registry.load(modality) is not None, modality
