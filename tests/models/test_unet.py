import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file

from ccld.apps.options import describe_checkpoint
from ccld.errors import CCLDError
from ccld.models.unet import CCLDUNet, infer_unet_config, load_unet
from conftest import max_rel_err


def test_bare_state_dict_matches_reference(fixtures):
    unet = load_unet(fixtures / "unet.ckpt")
    assert unet.config == {"base_channels": 64, "channel_multipliers": [1, 1, 2, 2], "embed_dim": 512}
    assert float(unet.autoencoder_scale) == 3.25
    assert sum(p.numel() for p in unet.parameters()) == 23912012
    io = load_file(fixtures / "unet_io.safetensors")
    with torch.no_grad():
        v = unet(io["x"], io["t"], io["embed"])
    assert max_rel_err(v, io["v"]) < 1e-4


def test_lightning_checkpoint_uses_ema_weights(fixtures):
    unet = load_unet(fixtures / "unet_lightning.ckpt")
    assert unet.config["channel_multipliers"] == [1, 1, 1, 1]
    assert float(unet.autoencoder_scale) == 5.0
    io = load_file(fixtures / "unet_io.safetensors")
    ref = load_file(fixtures / "unet_lightning_io.safetensors")["v_ema"]
    with torch.no_grad():
        v = unet(io["x"], io["t"], io["embed"])
    assert max_rel_err(v, ref) < 1e-4


def test_safetensors_round_trip(fixtures, tmp_path):
    unet = load_unet(fixtures / "unet.ckpt")
    save_file({k: v.contiguous() for k, v in unet.state_dict().items()}, tmp_path / "u.safetensors")
    again = load_unet(tmp_path / "u.safetensors")
    io = load_file(fixtures / "unet_io.safetensors")
    with torch.no_grad():
        assert torch.equal(unet(io["x"], io["t"], io["embed"]), again(io["x"], io["t"], io["embed"]))


@pytest.mark.parametrize("base,mults", [(192, (1, 1, 2, 2)), (192, (4, 4, 8, 8)),
                                        (128, (4, 4, 8, 8)), (32, (1, 2, 3, 4))])
def test_architecture_is_inferred_from_shapes(base, mults):
    # meta tensors: the 1.2B teacher's shapes without allocating its weights
    with torch.device("meta"):
        sd = CCLDUNet(base, mults).state_dict()
    assert infer_unet_config(sd) == {"base_channels": base, "channel_multipliers": list(mults),
                                     "embed_dim": 512}


def test_published_sizes():
    with torch.device("meta"):
        student = CCLDUNet(192, (1, 1, 2, 2))
    assert round(sum(p.numel() for p in student.parameters()) / 1e6, 1) == 105.4


def test_info_describes_checkpoints(fixtures):
    info = describe_checkpoint(fixtures / "unet_lightning.ckpt")
    assert info["kind"].startswith("CCLD U-Net (Lightning")
    assert info["autoencoder_scale"] == 5.0
    assert describe_checkpoint(fixtures / "cloob.pkl")["kind"].startswith("CLOOB")
    assert describe_checkpoint(fixtures / "autoencoder.ckpt")["kind"].startswith("KL autoencoder")


def test_wrong_kind_and_damaged_files(fixtures, tmp_path):
    with pytest.raises(CCLDError, match="not a CCLD U-Net checkpoint.*autoencoder"):
        load_unet(fixtures / "autoencoder.ckpt")
    data = (fixtures / "unet.ckpt").read_bytes()
    (tmp_path / "half.ckpt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CCLDError, match="half.ckpt: not a readable U-Net checkpoint"):
        load_unet(tmp_path / "half.ckpt")
    with pytest.raises(CCLDError, match="no such U-Net checkpoint file"):
        load_unet(tmp_path / "missing.ckpt")
    sd = torch.load(fixtures / "unet.ckpt", weights_only=True)
    sd["net.0.main.4.weight"] = sd["net.0.main.4.weight"][:, :3]
    torch.save(sd, tmp_path / "bad_shape.ckpt")
    with pytest.raises(CCLDError, match="bad_shape.ckpt: weights do not fit"):
        load_unet(tmp_path / "bad_shape.ckpt")


class _Planted:
    def __reduce__(self):
        import os
        return (os.system, ("touch PWNED_BY_CHECKPOINT",))


def test_checkpoint_with_code_is_refused_and_runs_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save({"state_dict": {"x": _Planted()}}, tmp_path / "evil.ckpt")
    with pytest.raises(CCLDError, match="refused to load"):
        load_unet(tmp_path / "evil.ckpt")
    assert not (tmp_path / "PWNED_BY_CHECKPOINT").exists()
    with open(tmp_path / "evil.pkl", "wb") as f:
        pickle.dump({"params": _Planted()}, f)
    from ccld.io.checkpoints import load_array_pickle
    with pytest.raises(CCLDError, match="refused to load.*posix.system|refused to load.*os.system"):
        load_array_pickle(tmp_path / "evil.pkl")
    assert not (tmp_path / "PWNED_BY_CHECKPOINT").exists()


def test_empty_weights_builds_skeletons_and_restores_initialisation():
    from torch import nn

    from ccld.models import empty_weights

    torch.manual_seed(0)
    expected = nn.Conv2d(3, 4, 3).weight.detach().clone()
    state = torch.get_rng_state()
    with empty_weights():
        skeleton = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Linear(4, 4), nn.GroupNorm(2, 4))
    assert all(p.is_meta for p in skeleton.parameters())
    assert torch.equal(torch.get_rng_state(), state)  # no initialiser ran
    torch.manual_seed(0)
    assert torch.equal(nn.Conv2d(3, 4, 3).weight, expected)  # layers built later initialise


@pytest.mark.parametrize("base", [8, 32])  # 32: the 64-channel levels' one head becomes two
def test_a_widened_net_computes_what_it_was_made_from_and_its_copies_learn_apart(base):
    from ccld.models.unet import widened

    torch.manual_seed(0)
    net = CCLDUNet(base, (1, 1, 2, 2), embed_dim=32, autoencoder_scale=2.5, guidance_input=True,
                   guidance_range=(1, 8), distilled_steps=4)
    with torch.no_grad():  # a trained-looking guidance input, not its zero initialisation
        net.guidance_embed.linear.weight.normal_(0, 0.1)
    wide = widened(net, 2, seed=1)
    assert wide.config == {**net.config, "base_channels": 2 * base}
    assert float(wide.autoencoder_scale) == 2.5
    assert torch.equal(wide.distilled_timesteps, net.distilled_timesteps)
    x, t, embed, w = torch.randn(3, 4, 8, 8), torch.rand(3), torch.randn(3, 32), torch.rand(3) * 7
    with torch.no_grad():
        assert max_rel_err(wide(x, t, embed, guidance=w), net(x, t, embed, guidance=w)) < 1e-5
    # the copies of a channel are split unevenly, so their gradients differ
    wide(x, t, embed).square().mean().backward()
    grad = wide.net[1].main[0].weight.grad  # a conv reading the repeated channels of the first
    assert not torch.allclose(grad[:base], grad[base:])
    assert widened(net, 1, seed=1)(x, t, embed).allclose(net(x, t, embed))
    with pytest.raises(ValueError, match="whole factor"):
        widened(net, 0)
