"""The tiny decoder: diffusers' AutoencoderTiny decoder in plain torch, loaded from every layout,
chosen with `--decoder`, recorded in the PNGs, and trained by `ccld distill-decoder`."""

import json

import pytest
import torch
from safetensors.torch import save_file

from ccld import CCLDPipeline
from ccld.apps.cli import main
from ccld.errors import CCLDError
from ccld.io import hub
from ccld.io.images import read_png_parameters
from ccld.models.tiny_decoder import (
    TAESD_INPUT_SCALE,
    TinyDecoder,
    TinyDecoderConfig,
    load_tiny_decoder,
)
from conftest import state

pytestmark = pytest.mark.usefixtures("one_thread")

NARROW = TinyDecoderConfig(decoder_block_out_channels=(8, 8, 8, 8))  # fast, on raw latents


@pytest.fixture(scope="module")
def autoencoder_tiny():
    """diffusers' AutoencoderTiny with TAESD's architecture and random weights."""
    from diffusers import AutoencoderTiny

    torch.manual_seed(0)
    return AutoencoderTiny().eval()


@pytest.fixture(scope="module")
def narrow_decoder(tmp_path_factory):
    """A random narrow tiny decoder on raw latents, saved as `ccld distill-decoder` exports one."""
    torch.manual_seed(1)
    decoder = TinyDecoder(NARROW).eval()
    return decoder, decoder.save_pretrained(tmp_path_factory.mktemp("tiny") / "tiny_decoder")


def test_computes_what_diffusers_autoencoder_tiny_computes(autoencoder_tiny, tmp_path):
    autoencoder_tiny.save_pretrained(tmp_path / "taesd")
    ours = load_tiny_decoder(tmp_path / "taesd")  # its encoder weights are ignored
    assert ours.config.input_scale == TAESD_INPUT_SCALE  # a diffusers folder: SD's scaled latents
    assert not ours.training and not any(p.requires_grad for p in ours.parameters())
    assert set(ours.state_dict()) == {k for k in autoencoder_tiny.state_dict()
                                      if k.startswith("decoder.")}
    scaled = torch.randn(2, 4, 8, 8) * 2
    z = torch.randn(2, 4, 8, 8) * 6  # raw kl-f8 latents
    with torch.no_grad():
        assert torch.equal(ours.decoder(scaled), autoencoder_tiny.decode(scaled).sample)
        assert torch.equal(ours(z), autoencoder_tiny.decode(z * TAESD_INPUT_SCALE).sample)
    assert ours(z).shape == (2, 3, 64, 64)


def test_a_weights_file_alone_gives_its_architecture(tmp_path):
    from diffusers import AutoencoderTiny

    torch.manual_seed(2)
    odd = AutoencoderTiny(decoder_block_out_channels=(8, 8, 8, 8), num_decoder_blocks=(1, 2, 1, 1),
                          encoder_block_out_channels=(8, 8, 8, 8)).eval()
    save_file(odd.state_dict(), tmp_path / "weights.safetensors")
    ours = load_tiny_decoder(tmp_path / "weights.safetensors")
    assert ours.config.num_decoder_blocks == (1, 2, 1, 1)
    assert ours.config.decoder_block_out_channels == (8, 8, 8, 8)
    x = torch.randn(1, 4, 4, 4)
    with torch.no_grad():
        assert torch.equal(ours.decoder(x), odd.decode(x).sample)
    save_file({"net.0.weight": torch.zeros(1)}, tmp_path / "unet.safetensors")
    with pytest.raises(CCLDError, match=r"unet\.safetensors: the weights are not a TAESD-style decoder"):
        load_tiny_decoder(tmp_path / "unet.safetensors")


def test_pipeline_folder_keeps_its_tiny_decoder(fixture_pipeline, narrow_decoder, tmp_path):
    decoder, folder = narrow_decoder
    part = fixture_pipeline
    pipe = CCLDPipeline(part.unet, part.autoencoder, part.cloob, dict(part.sources),
                        decoder=load_tiny_decoder(folder))
    latents = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        expected = decoder(latents * 3.25)
    assert torch.equal(pipe.decode(latents), expected)  # the tiny decoder paints by default
    assert torch.equal(pipe.decode(latents, full_decoder=True), part.decode(latents))
    pipe.save_pretrained(tmp_path / "model")
    again = CCLDPipeline.from_pretrained(tmp_path / "model")
    assert torch.equal(again.decode(latents), expected)
    assert torch.equal(load_tiny_decoder(tmp_path / "model")(latents * 3.25), expected)
    plain = CCLDPipeline.from_pretrained(tmp_path / "model", decoder="full")
    assert plain.tiny_decoder is None and "tiny_decoder" not in plain.sources
    assert torch.equal(plain.decode(latents), part.decode(latents))


def generate(tmp_path, flags, *options) -> dict:
    """`ccld generate` of one picture; the parameters its PNG records."""
    out = tmp_path / "out"
    assert main(["generate", "a red circle", "--steps", "1", "--out", str(out), "-q",
                 *flags, *options]) == 0
    return read_png_parameters(sorted(out.glob("*.png"))[-1])


def test_cli_decoder_option_paints_and_is_recorded(model_flags, narrow_decoder, tmp_path, capsys):
    _, folder = narrow_decoder
    from ccld.pipeline.metadata import model_identity

    params = generate(tmp_path, model_flags, "--decoder", f"tiny:{folder}")
    # recorded by what identifies it (its name and a hash of its files), not where it lies
    assert params["decoder"] == f"tiny:{model_identity(folder.resolve())}"
    assert params["decoder"].startswith(f"tiny:{folder.name}@") and "/" not in params["decoder"]
    assert generate(tmp_path, model_flags)["decoder"] == "full"
    capsys.readouterr()
    for option, message in [("tiny:" + str(tmp_path / "nothing"), "no such file or folder"),
                            ("small", "choose full, taesd or tiny:PATH")]:
        assert main(["generate", "x", "--decoder", option, "--out", str(tmp_path / "x"),
                     *model_flags]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err


def test_taesd_comes_from_the_hub_only_when_asked(model_flags, autoencoder_tiny, offline_hub,
                                                  tmp_path, capsys):
    assert generate(tmp_path, model_flags)["decoder"] == "full"  # nothing fetched: the cache is empty
    capsys.readouterr()
    assert main(["generate", "x", "--decoder", "taesd", "--out", str(tmp_path / "x"),
                 *model_flags]) == 2
    assert "could not get diffusion_pytorch_model.safetensors from the hub repo " \
           "madebyollin/taesd" in capsys.readouterr().err
    autoencoder_tiny.save_pretrained(tmp_path / "published")
    repo, weights, config = hub.TAESD
    for name in (weights, config):
        offline_hub(repo, name, (tmp_path / "published" / name).read_bytes())
    assert generate(tmp_path, model_flags, "--decoder", "taesd")["decoder"] == "taesd"


def test_loading_spends_no_random_init(narrow_decoder, monkeypatch):
    """Weights come from the file; the network is built on the meta device, where an init is
    free (the count below is of inits on real tensors)."""
    _, folder = narrow_decoder
    real_inits = []
    for name in ("kaiming_uniform_", "uniform_", "normal_", "zeros_", "ones_"):
        original = getattr(torch.nn.init, name)

        def counted(tensor, *args, _original=original, **kwargs):
            if tensor.device.type != "meta":
                real_inits.append(tensor.shape)
            return _original(tensor, *args, **kwargs)

        monkeypatch.setattr(torch.nn.init, name, counted)
    TinyDecoder(NARROW)
    assert real_inits  # the count works: a new decoder is initialised
    real_inits.clear()
    load_tiny_decoder(folder)
    assert real_inits == []


# ccld distill-decoder

def distill(cache, out, *options) -> int:
    return main(["distill-decoder", "--data", str(cache), "--out", str(out), "--width", "8",
                 "--batch-size", "4", "--lr", "3e-3", "--log-every", "1", "--num-workers", "0",
                 "--no-tensorboard", *options])


def losses(out) -> list[float]:
    lines = (out / "logs" / "metrics.jsonl").read_text().splitlines()
    return [m["distill-decoder/loss"] for m in map(json.loads, lines) if "distill-decoder/loss" in m]


@pytest.mark.slow
def test_distill_decoder_lowers_its_loss_exports_and_resumes(latent_cache, tmp_path):
    from ccld.training.checkpointing import split_state_dict

    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert distill(latent_cache, whole, "--max-steps", "12") == 0
    curve = losses(whole)
    assert len(curve) == 12 and sum(curve[-3:]) / 3 < 0.8 * sum(curve[:2]) / 2, curve
    ckpt = state(whole / "checkpoints" / "last.ckpt")
    assert ckpt["ccld"]["kind"] == "distill-decoder" and ckpt["global_step"] == 12
    _, ema = split_state_dict(ckpt["state_dict"])
    exported = load_tiny_decoder(whole / "tiny_decoder")  # as --decoder tiny:PATH reads it
    assert exported.config.input_scale == 1.0  # learnt on raw latents
    assert all(torch.equal(v, ema[k]) for k, v in exported.state_dict().items())

    assert distill(latent_cache, parts, "--max-steps", "6") == 0
    assert distill(latent_cache, parts, "--max-steps", "12", "--resume") == 0
    resumed = state(parts / "checkpoints" / "last.ckpt")
    for k, v in ckpt["state_dict"].items():
        assert torch.equal(v, resumed["state_dict"][k]), k
    assert losses(parts) == curve


def test_distill_decoder_trains_on_images_without_clip(image_sources, narrow_autoencoder,
                                                       tmp_path, monkeypatch):
    def no_download(*args):
        raise AssertionError("distill-decoder fetched CLOOB")

    monkeypatch.setattr(hub, "download_cloob", no_download)
    out = tmp_path / "run"
    assert distill(image_sources["folder"], out, "--image-size", "64", "--max-steps", "2",
                   "--autoencoder", str(narrow_autoencoder), "--feature-weight", "0",
                   "--latents", "mean") == 0
    assert state(out / "checkpoints" / "last.ckpt")["global_step"] == 2
    assert (out / "tiny_decoder" / "config.json").is_file()
