"""The fast path's numerics: reduced precision stays close to fp32, and fp32 stays exact."""

import pytest
import torch
from safetensors.torch import load_file

from ccld import CCLDPipeline
from ccld.errors import CCLDError
from ccld.pipeline import fast_bf16_cpu, resolve_precision
from conftest import max_rel_err


def test_auto_precision_follows_the_hardware():
    assert resolve_precision("auto", torch.device("cuda")) == "fp16"
    expected = "bf16" if fast_bf16_cpu() else "fp32"  # emulated bf16 is slower than fp32
    assert resolve_precision("auto", torch.device("cpu")) == expected
    assert resolve_precision("fp32", torch.device("cuda")) == "fp32"
    with pytest.raises(CCLDError, match="unknown precision 'int3'"):
        resolve_precision("int3", torch.device("cpu"))


def test_auto_is_float32_where_onednn_is_capped_below_bf16(monkeypatch):
    """ONEDNN_MAX_CPU_ISA=AVX2 makes a bf16 CPU compute as an AVX2-only one: auto follows."""
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert not fast_bf16_cpu()
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"


@pytest.fixture(scope="module")
def pipe(model_files):
    return CCLDPipeline.from_files(**model_files)  # its own: these tests change its precision


def test_bf16_unet_is_close_and_fp32_comes_back_exact(pipe, fixtures):
    io = load_file(fixtures / "unet_io.safetensors")
    x, t, e = io["x"][:1], io["t"][:1], io["embed"][:1]
    with pipe.autocast():
        exact = pipe.unet(x, t, e)
    saved = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    pipe.to(precision="bf16")
    try:
        # held rounded, as autocast would round them at every call; saved as float32
        assert pipe.unet.net[0].main[0].weight.dtype == torch.bfloat16
        assert all(torch.equal(v, saved[k]) and v.dtype == saved[k].dtype
                   for k, v in pipe.unet.state_dict().items())
        with pipe.autocast():
            fast = pipe.unet(x, t, e).float()
        assert max_rel_err(fast, io["v"][:1]) < 3e-2
    finally:
        pipe.to(precision="fp32")
    assert pipe.unet.net[0].main[0].weight.dtype == torch.float32
    with pipe.autocast():
        assert torch.equal(pipe.unet(x, t, e), exact)
    assert max_rel_err(exact, io["v"][:1]) < 1e-4


def test_held_bf16_weights_compute_what_autocast_computes_bit_for_bit(model_files, fixtures):
    """Rounding the weights once is the rounding autocast does at every call: the same bits,
    for the U-Net and the decoder, only faster."""
    from ccld.models import release_held_weights

    pipe = CCLDPipeline.from_files(**model_files, precision="bf16")
    io = load_file(fixtures / "unet_io.safetensors")
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with pipe.autocast():
        held = pipe.unet(io["x"], io["t"], io["embed"]), pipe.decode(z)
    for net in (pipe.unet, pipe.autoencoder.decoder):
        release_held_weights(net)
        net.to(memory_format=torch.channels_last)  # laid out as the rounded copies were
    assert pipe.unet.net[0].main[0].weight.dtype == torch.float32
    with pipe.autocast():
        rounded_at_each_call = pipe.unet(io["x"], io["t"], io["embed"]), pipe.decode(z)
    assert all(torch.equal(a, b) for a, b in zip(held, rounded_at_each_call))


def test_bf16_text_embeddings_are_close(pipe):
    exact = pipe.encode_text(["a snowy landscape"])
    pipe.to(precision="bf16")
    try:
        fast = pipe.encode_text(["a snowy landscape"])
    finally:
        pipe.to(precision="fp32")
    assert fast.dtype == torch.float32
    assert torch.nn.functional.cosine_similarity(fast, exact).item() > 0.99


def test_auto_on_a_cpu_without_bf16_is_fp32_channels_last_within_1e4(pipe, fixtures, monkeypatch):
    import ccld.pipeline.precision

    monkeypatch.setattr(ccld.pipeline.precision, "fast_bf16_cpu", lambda: False)  # as on an AVX2-only CPU
    io = load_file(fixtures / "unet_io.safetensors")
    x, t, e = io["x"], io["t"], io["embed"]
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with pipe.autocast():
        exact, exact_pixels = pipe.unet(x, t, e), pipe.decode(z)
    pipe.to(precision="auto")
    try:
        assert pipe.precision == "fp32" and pipe.channels_last
        assert pipe.unet.net[0].main[0].weight.is_contiguous(memory_format=torch.channels_last)
        with pipe.autocast():
            fast, fast_pixels = pipe.unet(x, t, e), pipe.decode(z)
        assert all(block.upsamplers[0].folded_weight is not None  # laid out as it first paints
                   for block in pipe.autoencoder.decoder.up_blocks[:-1])
        assert max_rel_err(fast, exact) < 1e-4 and max_rel_err(fast_pixels, exact_pixels) < 1e-4
    finally:
        pipe.to(precision="fp32")
    assert not pipe.channels_last
    assert pipe.unet.net[0].main[0].weight.is_contiguous()  # explicit fp32: the reference layout
    with pipe.autocast():
        assert torch.equal(pipe.decode(z), exact_pixels)
    assert all(block.upsamplers[0].folded_weight is None  # and the reference's upsampling
               for block in pipe.autoencoder.decoder.up_blocks[:-1])
