"""Compiled U-Net forwards kept in ccld's cache (ccld.pipeline.compiled): the keys, the eager
fallback, invalidation, the messages, and (slow) the numerics of a real AOTInductor package."""

import pytest
import torch
from torch import nn

from ccld.models.unet import CCLDUNet
from ccld.pipeline import compiled


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CCLD_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache" / compiled.COMPILED_FOLDER


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return CCLDUNet(8, (1, 1, 1, 1)).eval()


def inputs(batch=2, size=8, generator_seed=0):
    g = torch.Generator().manual_seed(generator_seed)
    return (torch.randn(batch, 4, size, size, generator=g), torch.rand(batch, generator=g),
            torch.randn(batch, 512, generator=g))


class FakeCompiler:
    """Stands in for AOTInductor (minutes of C++ compiling): a "package" is a file naming its
    key, and "running" one computes the eager forward, counted."""

    def __init__(self, monkeypatch):
        self.built, self.loaded, self.runs = [], [], 0
        monkeypatch.setattr(compiled, "_build", self.build)
        monkeypatch.setattr(compiled, "_load", self.load)

    def build(self, path, unet, inputs, autocast=None):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("package")
        self.built.append(path.name)

    def load(self, path, unet):
        if path.read_text() != "package":
            raise RuntimeError("Failed to initialize zip archive")
        self.loaded.append(path.name)

        def run(*args):
            self.runs += 1
            return type(unet).forward(unet, *args)
        return run


def test_the_key_changes_with_everything_the_compiled_code_depends_on(unet, monkeypatch):
    x = inputs()
    key = compiled.package_key(unet, x)
    assert compiled.package_key(unet, inputs(generator_seed=1)) == key  # values do not count
    assert compiled.package_key(unet, inputs(batch=4)) != key
    assert compiled.package_key(unet, inputs(size=16)) != key
    assert compiled.package_key(unet.to(memory_format=torch.channels_last), x) != key
    unet.to(memory_format=torch.contiguous_format)
    assert compiled.package_key(unet, x) == key
    assert compiled.package_key(CCLDUNet(8, (1, 1, 1, 1)).bfloat16(), x) != key  # precision
    assert compiled.package_key(CCLDUNet(16, (1, 1, 1, 1)), x) != key
    with monkeypatch.context() as m:
        m.setattr(torch, "__version__", "9.9.9")
        assert compiled.package_key(unet, x) != key
    with monkeypatch.context() as m:
        m.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
        assert compiled.package_key(unet, x) != key
    with monkeypatch.context() as m:
        m.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
        assert compiled.package_key(unet, x) != key
    assert compiled.package_key(unet, x, torch.bfloat16) != key  # autocast
    assert compiled.package_key(unet, x) == key


def test_without_a_package_the_forward_is_eager_and_nothing_is_built(unet, cache, monkeypatch):
    fake = FakeCompiler(monkeypatch)
    x = inputs()
    with torch.inference_mode():
        expected = unet(*x)
        forwards = compiled.install(unet)
        try:
            assert torch.equal(unet(*x), expected)
        finally:
            compiled.uninstall(unet)
    assert (forwards.compiled_calls, fake.built, fake.loaded) == (0, [], [])
    assert not cache.exists()
    assert "forward" not in unet.__dict__  # uninstalled
    assert set(unet.state_dict()) == set(CCLDUNet(8, (1, 1, 1, 1)).state_dict())


def test_a_package_is_built_once_then_loaded_by_later_processes_until_torch_changes(
        unet, cache, monkeypatch):
    fake = FakeCompiler(monkeypatch)
    notes = []
    x = inputs()
    with torch.inference_mode():
        expected = unet(*x)
        first = compiled.install(unet, build=True, say=notes.append)
        assert torch.equal(unet(*x), expected) and torch.equal(unet(*x), expected)
        assert len(fake.built) == 1 and first.compiled_calls == 2
        assert [note.split(" (")[0] for note in notes] == [
            "compiling the U-Net for 2x4x8x8 latents", "compiled the U-Net in 0 s"]
        assert list(cache.iterdir()) == [cache / fake.built[0]]
        unet(*inputs(batch=1))  # a second shape in the same run: eager, not compiled
        assert len(fake.built) == 1 and first.compiled_calls == 2

        later = compiled.install(unet, say=notes.append)  # another process, without --compile
        unet(*x)
        assert later.compiled_calls == 1 and len(fake.loaded) == 2 and len(fake.built) == 1
        monkeypatch.setattr(torch, "__version__", "9.9.9")  # torch upgraded: not that package
        newer = compiled.install(unet, say=notes.append)
        assert torch.equal(unet(*x), expected)
        assert newer.compiled_calls == 0 and len(fake.loaded) == 2
        compiled.uninstall(unet)
    assert len(notes) == 2


def test_new_weights_are_handed_to_the_package_again(unet, cache, monkeypatch):
    fake = FakeCompiler(monkeypatch)
    net = CCLDUNet(8, (1, 1, 1, 1)).eval()
    x = inputs()
    with torch.inference_mode():
        compiled.install(net, build=True, say=lambda _: None)
        net(*x)
        net.load_state_dict(unet.state_dict(), assign=True)  # other tensors, same layout
        assert torch.equal(net(*x), type(unet).forward(unet, *x))
    assert len(fake.built) == 1 and len(fake.loaded) == 2


def test_no_compiler_is_one_note_and_the_painting_goes_on(unet, cache, monkeypatch):
    fake = FakeCompiler(monkeypatch)
    monkeypatch.setattr(compiled.shutil, "which", lambda name: None)
    monkeypatch.delenv("CXX", raising=False)
    notes = []
    with torch.inference_mode():
        forwards = compiled.install(unet, build=True, say=notes.append)
        expected = type(unet).forward(unet, *inputs())
        assert torch.equal(unet(*inputs()), expected)
        unet(*inputs(batch=4))
        compiled.uninstall(unet)
    assert notes == ["not compiling the U-Net: no C++ compiler (c++, g++ or clang++) is on the "
                     "PATH; painting without it"]
    assert forwards.compiled_calls == 0 and fake.built == []


def test_a_failed_compile_or_a_damaged_package_never_costs_the_painting(unet, cache, monkeypatch):
    fake = FakeCompiler(monkeypatch)
    notes = []
    x = inputs()
    with torch.inference_mode():
        expected = type(unet).forward(unet, *x)
        place = cache / f"unet-{compiled.package_key(unet, x)}.pt2"
        place.parent.mkdir(parents=True)
        place.write_text("half a zip")
        compiled.install(unet, say=notes.append)
        assert torch.equal(unet(*x), expected)
        assert not place.exists()  # removed, so a later --compile builds it again
        assert notes == [f"the compiled U-Net {place.name} does not load (Failed to initialize "
                         "zip archive); painting without it"]

        def broken(path, unet, inputs, autocast=None):
            raise RuntimeError("C++ compile error\nthe compiler's whole output")
        monkeypatch.setattr(compiled, "_build", broken)
        compiled.install(unet, build=True, say=notes.append)
        assert torch.equal(unet(*x), expected)
        compiled.uninstall(unet)
    assert notes[-1] == ("compiling the U-Net failed (RuntimeError: C++ compile error); "
                         "painting without it")
    assert not place.exists() and fake.loaded == []


def test_a_guidance_input_runs_eager(cache, monkeypatch):
    fake = FakeCompiler(monkeypatch)
    torch.manual_seed(0)
    student = CCLDUNet(8, (1, 1, 1, 1), guidance_input=True).eval()
    with torch.inference_mode():
        forwards = compiled.install(student, build=True, say=lambda _: None)
        student(*inputs(), guidance=torch.full((2,), 3.0))
        compiled.uninstall(student)
    assert forwards.compiled_calls == 0 and fake.built == []


def test_the_command_line_builds_uses_and_refuses_packages(model_flags, tmp_path, cache,
                                                           monkeypatch, capsys):
    from ccld.apps.cli import main

    fake = FakeCompiler(monkeypatch)
    run = ["generate", "a castle", "--steps", "2", "--method", "ddim", "--width", "64",
           "--height", "64", "-q", *model_flags]
    assert main([*run, "--compile", "--out", str(tmp_path / "built")]) == 0
    assert len(fake.built) == 1 and "compiling the U-Net for" in capsys.readouterr().err
    runs = fake.runs
    assert main([*run, "--out", str(tmp_path / "cached")]) == 0  # the default: the cached one
    assert fake.runs > runs and len(fake.built) == 1
    runs = fake.runs
    assert main([*run, "--no-compile", "--out", str(tmp_path / "eager")]) == 0
    assert fake.runs == runs
    pictures = [(tmp_path / name / "00000.png").read_bytes() for name in ("built", "cached", "eager")]
    assert pictures[0] == pictures[1] == pictures[2]


def test_cache_info_lists_the_packages_and_clear_removes_them(unet, cache, monkeypatch, capsys):
    from ccld.apps.cli import main

    FakeCompiler(monkeypatch)
    with torch.inference_mode():
        compiled.install(unet, build=True, say=lambda _: None)
        unet(*inputs())
        compiled.uninstall(unet)
    assert main(["cache", "info"]) == 0
    assert f"compiled U-Nets (`--compile`): {cache}, 1 package," in capsys.readouterr().out
    assert main(["cache", "clear"]) == 0
    assert "and 1 compiled U-Net (0.0 MB)" in capsys.readouterr().out
    assert compiled.packages() == []


class Tiny(nn.Module):
    """A net with the U-Net's call, small enough for AOTInductor to compile in seconds."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1)
        self.out = nn.Conv2d(8, 4, 3, padding=1)
        self.embed = nn.Linear(512, 8)

    def forward(self, x, t, embed, guidance=None):
        h = self.conv(x) + self.embed(embed)[..., None, None] * t[:, None, None, None]
        return self.out(nn.functional.silu(h))


@pytest.mark.slow
@pytest.mark.skipif(compiled.compiler_missing() is not None, reason="needs a C++ compiler")
def test_a_real_package_computes_the_eager_forward_in_a_later_process(cache, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    torch.manual_seed(0)
    net, x = Tiny().eval(), inputs()
    with torch.inference_mode():
        expected = net(*x)
        compiled.install(net, build=True, say=lambda _: None)
        assert torch.allclose(net(*x), expected, rtol=1e-5, atol=1e-6)
        later = compiled.install(net)  # as a later process does: from the cache alone
        assert torch.allclose(net(*x), expected, rtol=1e-5, atol=1e-6)
        assert later.compiled_calls == 1
        with torch.autocast("cpu", dtype=torch.bfloat16):  # a package of its own, holding the casts
            compiled.uninstall(net)
            reduced = net(*x)
            compiled.install(net, build=True, say=lambda _: None)
            again = net(*x)
        assert again.dtype == reduced.dtype == torch.bfloat16
        assert torch.allclose(again.float(), reduced.float(), rtol=0.02, atol=0.02)
        compiled.uninstall(net)
    assert len(list(cache.glob("unet-*.pt2"))) == 2
