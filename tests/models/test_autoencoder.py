import re
import shutil

import pytest
import torch
from safetensors.torch import load_file

from ccld.errors import CCLDError
from ccld.models.autoencoder import decode_latents, encode_moments, load_autoencoder
from conftest import max_rel_err


@pytest.fixture(scope="module")
def ae(fixtures):
    return load_autoencoder(fixtures / "autoencoder.ckpt")  # the yaml beside it, by default


@pytest.fixture(scope="module")
def io(fixtures):
    return load_file(fixtures / "autoencoder_io.safetensors")


def _check(ae, io):
    with torch.no_grad():
        mean, logvar = encode_moments(ae, io["image"])
        decoded = decode_latents(ae, io["z"])
    assert mean.shape == logvar.shape == (2, 4, 8, 8)
    assert max_rel_err(mean, io["mean"]) < 1e-5
    assert max_rel_err(logvar, io["logvar"]) < 1e-5
    assert decoded.shape == (2, 3, 64, 64)
    assert max_rel_err(decoded, io["decoded"]) < 1e-5
    return decoded


def test_ldm_checkpoint_matches_reference(ae, io):
    assert not ae.training
    assert not any(p.requires_grad for p in ae.parameters())
    assert list(ae.config.block_out_channels) == [32, 64, 128, 128]
    assert ae.config.sample_size == 64 and ae.config.latent_channels == 4
    _check(ae, io)


def test_bare_state_dict_and_explicit_config(fixtures, io, tmp_path):
    sd = torch.load(fixtures / "autoencoder.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    torch.save(sd, tmp_path / "ae_model.ckpt")
    shutil.copy(fixtures / "autoencoder.yaml", tmp_path / "ae_model.yaml")
    _check(load_autoencoder(tmp_path / "ae_model.ckpt"), io)
    torch.save(sd, tmp_path / "other.ckpt")
    _check(load_autoencoder(tmp_path / "other.ckpt", config_path=tmp_path / "ae_model.yaml"), io)


def test_missing_yaml(fixtures, tmp_path):
    shutil.copy(fixtures / "autoencoder.ckpt", tmp_path / "lonely.ckpt")
    with pytest.raises(CCLDError, match=r"lonely\.ckpt.*autoencoder_config=") as e:
        load_autoencoder(tmp_path / "lonely.ckpt")
    assert "\n" not in str(e.value)
    # the command line words the same error by its option
    from ccld.errors import option_words

    assert re.search(r"lonely\.ckpt.*--autoencoder-config", e.value.worded(option_words))


def test_wrong_kind_of_checkpoint(fixtures, tmp_path):
    torch.save({"net.0.weight": torch.zeros(1)}, tmp_path / "unet.ckpt")
    shutil.copy(fixtures / "autoencoder.yaml", tmp_path / "unet.yaml")
    with pytest.raises(CCLDError, match=r"unet\.ckpt: not an autoencoder checkpoint"):
        load_autoencoder(tmp_path / "unet.ckpt")


def test_truncated_checkpoint(fixtures, tmp_path):
    data = (fixtures / "autoencoder.ckpt").read_bytes()
    (tmp_path / "cut.ckpt").write_bytes(data[: len(data) // 2])
    shutil.copy(fixtures / "autoencoder.yaml", tmp_path / "cut.yaml")
    with pytest.raises(CCLDError, match=r"cut\.ckpt") as e:
        load_autoencoder(tmp_path / "cut.ckpt")
    assert "\n" not in str(e.value)


def test_missing_checkpoint(tmp_path):
    with pytest.raises(CCLDError, match=r"nothere\.ckpt: no such"):
        load_autoencoder(tmp_path / "nothere.ckpt")


def test_bad_yaml_and_mismatched_config(fixtures, tmp_path):
    shutil.copy(fixtures / "autoencoder.ckpt", tmp_path / "ae.ckpt")
    (tmp_path / "ae.yaml").write_text("model: [unclosed\n  params: {\n")
    with pytest.raises(CCLDError, match=r"ae\.yaml: not a readable yaml") as e:
        load_autoencoder(tmp_path / "ae.ckpt")
    assert "\n" not in str(e.value)

    (tmp_path / "ae.yaml").write_text("model:\n  target: something.Else\n")
    with pytest.raises(CCLDError, match=r"ae\.yaml: not an LDM autoencoder config"):
        load_autoencoder(tmp_path / "ae.ckpt")

    wider = (fixtures / "autoencoder.yaml").read_text().replace("ch: 32", "ch: 64")
    (tmp_path / "ae.yaml").write_text(wider)
    with pytest.raises(CCLDError, match=r"ae\.ckpt: the weights do not fit") as e:
        load_autoencoder(tmp_path / "ae.ckpt")
    assert "\n" not in str(e.value)


def test_save_pretrained_round_trip(ae, io, tmp_path):
    ae.save_pretrained(tmp_path / "vae")
    assert (tmp_path / "vae" / "diffusion_pytorch_model.safetensors").is_file()
    again = load_autoencoder(tmp_path / "vae")
    assert not again.training
    with torch.no_grad():
        a = decode_latents(ae, io["z"])
        b = decode_latents(again, io["z"])
    assert torch.equal(a, b)
    # a pipeline folder holding the autoencoder under vae/ loads too
    assert torch.equal(decode_latents(load_autoencoder(tmp_path), io["z"]), b)


def test_folder_without_config(tmp_path):
    with pytest.raises(CCLDError, match="without config.json"):
        load_autoencoder(tmp_path)


def test_torch_module_computes_what_diffusers_computes(ae, io):
    """KLAutoencoder is diffusers' AutoencoderKL in plain torch: same names, same arithmetic."""
    from diffusers import AutoencoderKL

    reference = AutoencoderKL(**{k: v for k, v in ae.config.to_diffusers().items()
                                 if not k.startswith("_")}).eval()
    reference.load_state_dict(ae.state_dict(), strict=True)
    with torch.no_grad():
        z = io["z"]
        assert torch.equal(ae.decode(z), reference.decode(z).sample)
        h = reference.quant_conv(reference.encoder(io["image"]))
        assert torch.equal(torch.cat(ae.encode_moments(io["image"]), dim=1), h)


NO_DIFFUSERS_CHILD = """
import sys
from ccld.models.autoencoder import load_autoencoder
ae = load_autoencoder(sys.argv[1])
print("diffusers" in sys.modules, sum(p.numel() for p in ae.parameters()))
"""


def test_a_converted_autoencoder_loads_without_importing_diffusers(fixtures, io, tmp_path,
                                                                   monkeypatch):
    import subprocess
    import sys

    monkeypatch.setenv("CCLD_CACHE_DIR", str(tmp_path / "cache"))
    shutil.copy(fixtures / "autoencoder.ckpt", tmp_path / "ae.ckpt")
    shutil.copy(fixtures / "autoencoder.yaml", tmp_path / "ae.yaml")
    runs = [subprocess.run([sys.executable, "-c", NO_DIFFUSERS_CHILD, str(tmp_path / "ae.ckpt")],
                           check=True, capture_output=True, text=True).stdout.split()
            for _ in range(2)]
    assert runs[0][0] == "True" and runs[1][0] == "False"  # converted once, by diffusers
    assert runs[0][1] == runs[1][1]
    cached = load_autoencoder(tmp_path / "ae.ckpt")
    _check(cached, io)
    # a changed yaml is a new entry: the cached copy is never used for another config
    (tmp_path / "ae.yaml").write_text((fixtures / "autoencoder.yaml").read_text() + "\n# edited\n")
    assert len(list((tmp_path / "cache" / "converted").iterdir())) == 1
    _check(load_autoencoder(tmp_path / "ae.ckpt"), io)
    assert len(list((tmp_path / "cache" / "converted").iterdir())) == 2


def test_folded_upsampling_is_the_same_arithmetic_to_float_rounding(ae, io):
    """Nearest doubling then a 3x3 conv, as one transposed conv (the fast path's decoder)."""
    from ccld.models.autoencoder import Resample

    torch.manual_seed(0)
    sampler = Resample(16, down=False).eval()
    x = torch.randn(2, 16, 5, 7)
    with torch.no_grad():
        exact = sampler(x)
        sampler.fold_upsampling(True)
        folded = sampler(x)
    assert folded.shape == exact.shape == (2, 16, 10, 14)
    assert max_rel_err(folded, exact) < 1e-5

    try:
        ae.decoder.fold_upsampling(True)
        with torch.no_grad():
            fast = decode_latents(ae, io["z"])
        assert max_rel_err(fast, io["decoded"]) < 1e-5
    finally:
        ae.decoder.fold_upsampling(False)
    _check(ae, io)  # unfolded again: the reference's arithmetic
