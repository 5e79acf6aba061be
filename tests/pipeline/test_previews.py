"""Sampling previews: the autoencoder's linear latent-to-RGB map (fitted, stored, reloaded), the
pipeline's `preview`, and `ccld generate --preview`. The web gallery's previews are tested in
test_web.py and, in a browser, in test_web_server.py."""

import torch
from PIL import Image

from ccld import CCLDPipeline
from ccld.apps.cli import main
from ccld.models.autoencoder import load_autoencoder
from ccld.models.latent_preview import FILE_NAME, LatentPreview, fit_latent_preview, fit_linear_map


def test_least_squares_recovers_a_known_linear_map():
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn([4, 3], generator=generator)
    bias = torch.randn([3], generator=generator)
    latents = torch.randn([3, 4, 6, 5], generator=generator)
    colours = torch.einsum("nchw,cr->nrhw", latents, weight) + bias.view(1, 3, 1, 1)
    pixels = colours.repeat_interleave(8, dim=2).repeat_interleave(8, dim=3)
    # detail within each 8x8 block averages out: only the block's mean colour is fitted
    detail = torch.randn([3, 3, 8, 8], generator=generator)
    pixels = pixels + (detail - detail.mean(dim=(2, 3), keepdim=True)).repeat(1, 1, 6, 5)
    fitted = fit_linear_map(latents, pixels)
    assert torch.allclose(fitted.weight, weight, atol=1e-5)
    assert torch.allclose(fitted.bias, bias, atol=1e-5)
    shown = fitted(latents)
    assert shown.shape == (3, 3, 48, 40) and shown.dtype == torch.float32


def test_the_map_is_fitted_on_first_use_and_saved_with_the_autoencoder(model_files, tmp_path):
    pipe = CCLDPipeline.from_files(**model_files)
    assert pipe.autoencoder.latent_preview is None  # loading a release file fits nothing
    fitted = pipe.latent_preview
    assert pipe.latent_preview is fitted  # once per process
    refit = fit_latent_preview(pipe.autoencoder)  # deterministic
    assert torch.allclose(refit.weight, fitted.weight, atol=1e-6)
    assert torch.allclose(refit.bias, fitted.bias, atol=1e-6)
    pipe.autoencoder.save_pretrained(tmp_path / "vae")
    assert (tmp_path / "vae" / FILE_NAME).is_file()
    loaded = load_autoencoder(tmp_path / "vae")
    assert torch.equal(loaded.latent_preview.weight, fitted.weight)
    # a folder saved before the maps existed: none stored, so the pipeline fits one when asked
    (tmp_path / "vae" / FILE_NAME).unlink()
    assert load_autoencoder(tmp_path / "vae").latent_preview is None
    assert LatentPreview.from_dict({"weight": [[1, 2]], "bias": [0]}) is None  # malformed


def test_pipeline_preview_is_the_linear_map_or_the_tiny_decoder(model_files):
    from ccld.models.tiny_decoder import TinyDecoder, TinyDecoderConfig

    pipe = CCLDPipeline.from_files(**model_files)
    pipe.autoencoder.latent_preview = None  # as from an old folder: fitted on first use
    latents = torch.randn([2, 4, 8, 16])
    pixels = pipe.preview(latents)
    assert pixels.shape == (2, 3, 64, 128) and pixels.device.type == "cpu"
    assert pipe.autoencoder.latent_preview is not None
    assert torch.equal(pixels, pipe.latent_preview(latents * pipe.default_latent_scale))
    tiny = TinyDecoder(TinyDecoderConfig(decoder_block_out_channels=(8, 8, 8, 8)))
    with_tiny = CCLDPipeline(pipe.unet, pipe.autoencoder, pipe.cloob, decoder=tiny)
    assert torch.equal(with_tiny.preview(latents), with_tiny.decode(latents))


def test_cli_preview_file_is_updated_in_place(model_flags, tmp_path, monkeypatch):
    import ccld.io.files

    written = []
    atomic_write = ccld.io.files.atomic_write

    def counting(path, write, what="file", **kw):
        written.append((path.name, what))
        return atomic_write(path, write, what, **kw)

    monkeypatch.setattr(ccld.io.files, "atomic_write", counting)
    out = tmp_path / "out"
    assert main(["generate", "a castle", "--preview", "-n", "2", "--steps", "4", "--method",
                 "ddim", "--width", "128", "--height", "64", "-q", "--out", str(out),
                 *model_flags]) == 0
    previews = [name for name, what in written if what == "preview"]
    assert previews == ["preview.png"] * 2  # after steps 2 and 4
    with Image.open(out / "preview.png") as preview:
        assert preview.format == "PNG" and preview.size == (256, 64)  # the batch side by side
    assert sorted(p.name for p in out.iterdir()) == ["00000.png", "00001.png", "preview.png"]
