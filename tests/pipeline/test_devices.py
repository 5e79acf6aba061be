"""The GPU and Mac paths, checked on the CPU by emulating what they depend on: a torch without
autocast for a device, fp16 overflow (CPU autocast has fp16 too), a fake GPU count, the CUDA
switches (settable on a CPU build)."""

import contextlib

import pytest
import torch
from torch import nn

from ccld.errors import CCLDError
from ccld.models import autocast_available, autocast_off, finite_or_float32, hold_weights_in
from ccld.models.unet import FourierFeatures
from ccld.pipeline import painting, precision
from ccld.pipeline.precision import Layout, faithful_cuda_arithmetic


@pytest.fixture
def no_autocast_for(monkeypatch):
    """Makes this torch look like one without autocast for a device type (MPS before 2.5)."""
    def emulate(device_type: str, dtype: torch.dtype | None = None):
        real = torch.autocast

        def autocast(kind, *args, **kwargs):
            if kind == device_type and (dtype is None or kwargs.get("dtype") in (dtype, None)):
                raise RuntimeError(f"User specified an unsupported autocast device_type '{kind}'")
            return real(kind, *args, **kwargs)

        monkeypatch.setattr(torch, "autocast", autocast)
        monkeypatch.setattr(torch.amp, "is_autocast_available", lambda kind: True, raising=False)
        autocast_available.cache_clear()
    yield emulate
    autocast_available.cache_clear()


def test_switching_autocast_off_where_a_torch_has_none_does_nothing(no_autocast_for):
    no_autocast_for("cpu")
    assert not autocast_available("cpu")
    with autocast_off("cpu"):  # the preview and decode paths' context, on an old MPS torch
        assert torch.ones(2).sum() == 2


def test_a_precision_without_autocast_on_the_device_is_one_line_before_anything_moves(
        no_autocast_for):
    no_autocast_for("cpu", torch.bfloat16)
    current = Layout(torch.device("cpu"), "fp32", False)
    with pytest.raises(CCLDError, match=r"bf16 on cpu: this torch .* has no bf16 autocast there; "
                                        "use fp32"):
        Layout.wanted(current, None, "bf16")
    assert Layout.wanted(current, None, "fp32").precision == "fp32"


def test_a_pipeline_built_without_a_precision_paints_auto_once_on_a_gpu(monkeypatch):
    """`from_pretrained().to("cuda")`: fp16 channels-last there, unless fp32 was chosen."""
    monkeypatch.setattr(precision, "check_device", lambda device: torch.device(device))
    monkeypatch.setattr(precision, "check_autocast", lambda precision, device: None)
    unchosen = Layout(torch.device("cpu"), "fp32", False, chosen=False)
    assert Layout.wanted(unchosen, "cuda", None) == Layout(torch.device("cuda"), "fp16", True,
                                                           chosen=False)
    assert Layout.wanted(unchosen, "cpu", None) == unchosen  # the reference's on the CPU
    chosen = Layout(torch.device("cpu"), "fp32", False)
    assert Layout.wanted(chosen, "cuda", None) == Layout(torch.device("cuda"), "fp32", False)


@contextlib.contextmanager
def cuda_switches():
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def test_fp32_on_a_gpu_turns_tf32_off_and_the_reduced_precisions_leave_cudnn_its_default():
    with cuda_switches():
        faithful_cuda_arithmetic(Layout(torch.device("cuda"), "fp32", False))
        assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
        faithful_cuda_arithmetic(Layout(torch.device("cuda"), "fp16", True))
        assert torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
        torch.backends.cudnn.allow_tf32 = False
        faithful_cuda_arithmetic(Layout(torch.device("cpu"), "fp32", False))  # not a GPU's
        assert not torch.backends.cudnn.allow_tf32


def test_an_fp16_overflow_is_computed_again_in_float32():
    """The KL decoder under fp16 autocast (CUDA's `auto`) can pass fp16's 65504."""
    layer = nn.Linear(4, 4, bias=False)
    nn.init.constant_(layer.weight, 1000.0)
    hold_weights_in(layer, torch.float16)  # as the pipeline holds its painting nets
    x = torch.full([1, 4], 100.0)
    with torch.autocast("cpu", dtype=torch.float16):
        assert not torch.isfinite(layer(x)).all()
        out = finite_or_float32(lambda: layer(x), layer, "cpu")
    assert out.dtype == torch.float32 and torch.equal(out, torch.full([1, 4], 400_000.0))
    assert layer.weight.dtype == torch.float16  # held rounded again afterwards
    with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16 has float32's range: no retry
        assert torch.isfinite(finite_or_float32(lambda: layer(x), layer, "cpu")).all()


def test_the_timestep_features_are_float32_under_autocast():
    features = FourierFeatures(1, 16, std=8.0)
    t = torch.rand(5, 1)
    exact = features(t)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = features(t)
    assert under.dtype == torch.float32 and torch.equal(under, exact)


def test_a_batch_is_decoded_a_few_pictures_at_a_time(monkeypatch):
    calls = []

    class Decoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(()))

        def decode(self, z):
            calls.append(z.shape[0])
            return z[:, :3].repeat_interleave(8, -1).repeat_interleave(8, -2) * self.scale

    latents = torch.randn(5, 4, 8, 8)
    monkeypatch.setattr(painting, "DECODE_PIXELS", 2 * 64 * 64)  # two 64-pixel pictures a call
    pixels = painting.decode(Decoder(), latents, 2.0)
    assert calls == [2, 2, 1] and pixels.shape == (5, 3, 64, 64)
    assert torch.equal(pixels, (latents * 2.0)[:, :3].repeat_interleave(8, -1)
                       .repeat_interleave(8, -2))


def test_more_processes_than_gpus_is_one_line_before_loading(monkeypatch):
    from ccld.apps.batch import Processes

    selected = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", selected.append)
    assert Processes(rank=1, world=2, local_rank=1).device("cuda") == "cuda:1"
    assert selected == [1]
    with pytest.raises(CCLDError, match="LOCAL_RANK 2, but this machine has 2 CUDA device"):
        Processes(rank=2, world=3, local_rank=2).device("auto")
    assert Processes(rank=0, world=2, local_rank=0).device("cpu") == "cpu"


def test_the_ema_update_is_one_foreach_call_with_the_same_values():
    from ccld.training.ema import ema_update

    torch.manual_seed(0)
    model, averaged = nn.Linear(3, 2), nn.Linear(3, 2)
    expected = [a.detach() + 0.01 * (p.detach() - a.detach())
                for p, a in zip(model.parameters(), averaged.parameters())]
    ema_update(model, averaged, 0.99)
    for got, want in zip(averaged.parameters(), expected):
        assert torch.allclose(got, want, atol=1e-7)


def test_a_prompt_file_run_is_keyed_on_the_precision_and_batch_it_resolves_to():
    """A run resumed on other hardware must not mix fp16 and bf16 pictures under one key."""
    from argparse import Namespace

    from ccld.apps.batch import run_settings

    args = Namespace(precision=None, decoder=None)
    on_gpu, on_cpu = run_settings(args, "cuda:0", None), run_settings(args, "cpu", None)
    assert (on_gpu["precision"], on_gpu["batch_size"]) == ("fp16", 16)
    assert on_cpu["precision"] in ("bf16", "fp32") and on_cpu["batch_size"] == 4
