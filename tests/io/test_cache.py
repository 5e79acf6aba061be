"""The converted-weights cache: release files converted once, memory-mapped afterwards; and the
CLOOB towers, each read only when used."""

import json
import os
import shutil
import sys
from pathlib import Path

import huggingface_hub.constants as hf_constants
import pytest
import torch
from safetensors.torch import load_file, save_file

from ccld.apps.cli import main
from ccld.errors import CCLDError
from ccld.io import hub, weights_cache
from ccld.io.weights_cache import converted_dir, load_converted, map_safetensors, read_safetensors_header
from ccld.models.cloob import haiku_pickle_state_dict, load_cloob
from ccld.models.unet import load_unet
from conftest import max_rel_err

on_linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self")


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """A cache folder of this test's own, written synchronously (the background writer has tests
    of its own below)."""
    root = tmp_path / "cache"
    monkeypatch.setenv("CCLD_CACHE_DIR", str(root))
    monkeypatch.setattr(weights_cache, "BACKGROUND_WRITES", False)
    return root


def entries(cache: Path) -> list[Path]:
    folder = cache / "converted"
    return sorted(p for p in folder.iterdir() if not p.name.startswith(".")) if folder.is_dir() else []


def temporaries(cache: Path) -> list[Path]:
    return sorted((cache / "converted").glob(".*"))


def equal_state_dicts(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(a[k], b[k]) for k in a)


def mapped_file(t: torch.Tensor) -> str | None:
    """The file whose mapping holds the tensor's memory, if any."""
    address = t.data_ptr()
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        low, high = (int(x, 16) for x in fields[0].split("-"))
        if low <= address < high:
            return fields[5] if len(fields) == 6 else None
    return None


def anonymous_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no RssAnon in /proc/self/status")


class CountingConvert:
    """A stand-in converter with a few dtypes and shapes, counting its calls."""

    def __init__(self):
        self.calls = 0

    def __call__(self):
        self.calls += 1
        return {"w": torch.arange(6.0).reshape(2, 3), "half": torch.ones(3, dtype=torch.bfloat16),
                "mask": torch.tensor([True, False]), "step": torch.tensor(7),
                "empty": torch.zeros(0, 4)}, {"config": (1, 2), "name": "x"}


@pytest.fixture
def source(tmp_path) -> Path:
    path = tmp_path / "release.ckpt"
    path.write_bytes(bytes(range(256)) * 12289)  # 3 MiB and a bit: head and tail apart
    return path


# Hits, misses and keys


@on_linux
def test_second_unet_load_is_mapped_from_the_cache_bit_for_bit(fixtures, cache, monkeypatch):
    monkeypatch.setenv("CCLD_CACHE_DIR", "off")
    reference = load_unet(fixtures / "unet.ckpt").state_dict()
    monkeypatch.setenv("CCLD_CACHE_DIR", str(cache))
    first = load_unet(fixtures / "unet.ckpt")
    (entry,) = entries(cache)
    import ccld.io.checkpoints
    reads = []
    monkeypatch.setattr(ccld.io.checkpoints, "load_torch_file", lambda *a: reads.append(a))
    second = load_unet(fixtures / "unet.ckpt", stored_layout=True)  # as the pipeline loads it
    assert reads == []  # the release file is not read again
    assert second.config == first.config and float(second.autoencoder_scale) == 3.25
    assert equal_state_dicts(second.state_dict(), reference)
    assert equal_state_dicts(first.state_dict(), reference)
    weights = str(entry / "weights.safetensors")
    assert all(mapped_file(t) == weights for t in second.state_dict().values())
    # the kernels come channels-last, the fast path's layout, with no copy made
    kernels = [t for t in second.state_dict().values() if t.dim() == 4]
    assert kernels and all(t.is_contiguous(memory_format=torch.channels_last) for t in kernels)
    # and a plain load_unet gives the reference's layout, whose arithmetic is the reference's
    assert all(t.is_contiguous() for t in load_unet(fixtures / "unet.ckpt").state_dict().values())


def test_channels_last_tensors_round_trip_through_an_entry(tmp_path):
    torch.manual_seed(0)
    tensors = {"kernel": torch.randn(6, 5, 3, 3), "cl": torch.randn(4, 3, 2, 2).contiguous(
        memory_format=torch.channels_last), "bias": torch.randn(6)}
    with open(tmp_path / "w.safetensors", "wb") as f:
        weights_cache.write_safetensors(f, tensors, channels_last=["kernel", "cl"])
    mapped = map_safetensors(tmp_path / "w.safetensors")
    assert equal_state_dicts(mapped, tensors)
    assert mapped["kernel"].is_contiguous(memory_format=torch.channels_last)
    assert mapped["cl"].is_contiguous(memory_format=torch.channels_last)
    assert mapped["bias"].is_contiguous()
    # a standard file to other readers: the channels-last ones as [N, H, W, C], so named
    assert load_file(tmp_path / "w.safetensors")["kernel"].shape == (6, 3, 3, 5)
    with pytest.raises(ValueError, match="only 4-d"):
        with open(tmp_path / "x.safetensors", "wb") as f:
            weights_cache.write_safetensors(f, tensors, channels_last=["bias"])


@on_linux
def test_second_cloob_load_is_mapped_from_the_cache_bit_for_bit(fixtures, cache, monkeypatch):
    reference = haiku_pickle_state_dict(fixtures / "cloob.pkl")
    first = load_cloob(fixtures / "cloob.pkl", fixtures / "cloob.json")
    assert equal_state_dicts(first.state_dict(), reference)  # both towers used: both stored
    import ccld.io.checkpoints
    reads = []
    monkeypatch.setattr(ccld.io.checkpoints, "load_array_pickle", lambda *a: reads.append(a))
    second = load_cloob(fixtures / "cloob.pkl", fixtures / "cloob.json")
    assert reads == []
    assert equal_state_dicts(second.state_dict(), reference)
    stored = {entry.name.split("-")[0]: entry / "weights.safetensors" for entry in entries(cache)}
    assert sorted(stored) == ["cloob_image", "cloob_text"]
    assert all(mapped_file(t) == str(stored["cloob_" + k.split("_")[0]])
               for k, t in second.state_dict().items())


def test_a_first_cloob_load_stores_the_text_tower_and_lets_the_image_tower_go(
        fixtures, cache, monkeypatch, cloob_io):
    """A text-only run never writes the image tower nor holds its conversion; needed after all,
    it is read from the pickle again and stored then."""
    import ccld.io.checkpoints

    read = ccld.io.checkpoints.load_array_pickle
    reads = []
    monkeypatch.setattr(ccld.io.checkpoints, "load_array_pickle",
                        lambda *a: reads.append(a) or read(*a))
    cloob = load_cloob(fixtures / "cloob.pkl", fixtures / "cloob.json")
    weights_cache.finish_writes()
    assert [e.name.split("-")[0] for e in entries(cache)] == ["cloob_text"] and len(reads) == 1
    assert callable(cloob.image_encoder._deferred[0])  # its conversion was let go
    with torch.no_grad():
        assert max_rel_err(cloob.text_encoder(cloob_io["tokens"]), cloob_io["text_embeds"]) < 1e-4
    again = load_cloob(fixtures / "cloob.pkl", fixtures / "cloob.json")  # the next text-only run
    with torch.no_grad():
        assert torch.equal(again.text_encoder(cloob_io["tokens"]),
                           cloob.text_encoder(cloob_io["tokens"]))
    assert len(reads) == 1  # never reads the pickle
    with torch.no_grad():
        assert max_rel_err(cloob.encode_image(cloob_io["images"]), cloob_io["image_embeds"]) < 1e-4
    weights_cache.finish_writes()
    assert sorted(e.name.split("-")[0] for e in entries(cache)) == ["cloob_image", "cloob_text"]
    assert len(reads) == 2


@on_linux
def test_cached_weights_stay_out_of_anonymous_memory(fixtures, cache):
    load_unet(fixtures / "unet.ckpt")  # converts and stores (96 MB of weights)
    before = anonymous_mb()
    unet = load_unet(fixtures / "unet.ckpt", stored_layout=True)
    with torch.no_grad():
        for p in unet.parameters():
            p.sum()  # every page read
    assert anonymous_mb() - before < 30


def test_same_result_from_converter_and_cache(source, cache):
    convert = CountingConvert()
    first = load_converted("thing", [source], ["config: 1"], convert)
    second = load_converted("thing", [source], ["config: 1"], convert)
    assert convert.calls == 1
    assert equal_state_dicts(first[0], second[0]) and equal_state_dicts(first[0], convert()[0])
    assert first[1] == second[1] == {"config": [1, 2], "name": "x"}  # JSON's view, both times


def test_a_changed_source_or_config_gets_a_new_entry(source, cache):
    convert = CountingConvert()
    load_converted("thing", [source], ["a: 1"], convert)
    load_converted("thing", [source], [b"a: 2"], convert)  # another config: an entry of its own
    load_converted("thing", [source], ["a: 1"], convert)
    assert convert.calls == 2 and len(entries(cache)) == 2
    st = source.stat()
    os.utime(source, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched
    load_converted("thing", [source], ["a: 1"], convert)
    assert convert.calls == 3
    data = bytearray(source.read_bytes())
    data[-1] ^= 1  # the last byte changed, size and mtime kept
    source.write_bytes(bytes(data))
    os.utime(source, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    load_converted("thing", [source], ["a: 1"], convert)
    assert convert.calls == 4
    # entries of the file's earlier versions (with either config) can never match again
    assert len(entries(cache)) == 1


def test_a_changed_release_file_or_cloob_config_gets_a_new_entry(fixtures, tmp_path, cache):
    pickle_path = tmp_path / "cloob.pkl"
    shutil.copy(fixtures / "cloob.pkl", pickle_path)
    load_cloob(pickle_path, fixtures / "cloob.json").encode_text("a castle")
    (old,) = entries(cache)
    os.utime(pickle_path, ns=(0, pickle_path.stat().st_mtime_ns + 10**9))
    load_cloob(pickle_path, fixtures / "cloob.json").encode_text("a castle")
    (new,) = entries(cache)
    assert new != old
    config = json.loads((fixtures / "cloob.json").read_text())
    config["comment"] = "edited"
    (tmp_path / "edited.json").write_text(json.dumps(config))
    load_cloob(pickle_path, tmp_path / "edited.json").encode_text("a castle")
    assert len(entries(cache)) == 2


def test_what_does_not_load_is_not_stored(fixtures, cache):
    with pytest.raises(CCLDError, match="not a CCLD U-Net checkpoint"):
        load_unet(fixtures / "autoencoder.ckpt")
    config = json.loads((fixtures / "cloob.json").read_text())
    config["text_encoder"]["n_layers"] = 1
    with pytest.raises(CCLDError, match="does not match the CLOOB config"):
        load_cloob(fixtures / "cloob.pkl", config)
    assert entries(cache) == [] and temporaries(cache) == []


# Damage, concurrency, unwritable folders, off


def _truncate(entry):
    weights = entry / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])


def _garbage_header(entry):
    with open(entry / "weights.safetensors", "r+b") as f:
        f.write(b"\xff" * 16)


def _garbage_tail(entry):
    with open(entry / "weights.safetensors", "r+b") as f:
        f.seek(-8, os.SEEK_END)
        f.write(b"\x01" * 8)


@pytest.mark.parametrize("damage", [
    _truncate, _garbage_header, _garbage_tail,
    lambda entry: (entry / "entry.json").unlink(),
    lambda entry: (entry / "entry.json").write_text("{"),
    lambda entry: (entry / "weights.safetensors").unlink(),
], ids=["truncated", "garbage-header", "garbage-tail", "no-json", "bad-json", "no-weights"])
def test_a_damaged_entry_is_rebuilt_never_trusted(source, cache, damage):
    convert = CountingConvert()
    load_converted("thing", [source], [], convert)
    (entry,) = entries(cache)
    damage(entry)
    again, _ = load_converted("thing", [source], [], convert)
    assert convert.calls == 2 and equal_state_dicts(again, CountingConvert()()[0])
    assert entries(cache) == [entry] and temporaries(cache) == []
    load_converted("thing", [source], [], convert)
    assert convert.calls == 2  # the rebuilt entry serves


@pytest.mark.parametrize("byte", [0x00, 0xFF], ids=["zeroed", "ones"])
def test_damage_in_the_middle_of_an_entry_gets_it_rebuilt(fixtures, cache, byte):
    """Bytes overwritten far from both ends of a large entry (same size, same ends) are caught
    by the whole-file hash: the next load converts again and gets the file's own weights."""
    expected = {k: v.clone() for k, v in load_unet(fixtures / "unet.ckpt").state_dict().items()}
    (entry,) = entries(cache)
    weights = entry / "weights.safetensors"
    size = weights.stat().st_size
    assert size > 8 << 20  # far more than the first and last MiB
    with open(weights, "r+b") as f:
        f.seek(size // 2)
        f.write(bytes([byte]) * 4096)
    again = load_unet(fixtures / "unet.ckpt").state_dict()
    assert equal_state_dicts(again, expected)
    assert entries(cache) == [entry] and temporaries(cache) == []
    with open(weights, "rb") as f:
        f.seek(size // 2)
        assert f.read(4096) != bytes([byte]) * 4096  # rebuilt, not patched over


def test_a_truncated_cloob_entry_is_rebuilt(fixtures, cache):
    load_cloob(fixtures / "cloob.pkl", fixtures / "cloob.json").state_dict()  # both stored
    for entry in entries(cache):
        _truncate(entry)
    cloob = load_cloob(fixtures / "cloob.pkl", fixtures / "cloob.json")
    assert equal_state_dicts(cloob.state_dict(), haiku_pickle_state_dict(fixtures / "cloob.pkl"))
    assert len(entries(cache)) == 2


def test_a_writer_that_loses_the_race_uses_the_winners_entry(source, cache):
    convert = CountingConvert()

    def convert_while_another_process_stores():
        load_converted("thing", [source], [], convert)  # the other process, finishing first
        return convert()

    state, _ = load_converted("thing", [source], [], convert_while_another_process_stores)
    assert convert.calls == 2 and equal_state_dicts(state, convert()[0])
    assert len(entries(cache)) == 1 and temporaries(cache) == []


@pytest.mark.parametrize("background", [True, False], ids=["background", "foreground"])
def test_an_unwritable_cache_costs_one_warning_line_not_the_load(fixtures, tmp_path, monkeypatch,
                                                                 capsys, background):
    blocker = tmp_path / "a_file"
    blocker.write_text("")  # a folder cannot be made inside a file, even by root
    monkeypatch.setenv("CCLD_CACHE_DIR", str(blocker / "cache"))
    monkeypatch.setattr(weights_cache, "_warned_unwritable", False)
    monkeypatch.setattr(weights_cache, "BACKGROUND_WRITES", background)
    unet = load_unet(fixtures / "unet.ckpt")
    cloob = load_cloob(fixtures / "cloob.pkl", fixtures / "cloob.json")
    weights_cache.finish_writes()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ccld: warning: cannot write the converted-weights "
                                               f"cache in {blocker / 'cache' / 'converted'}")
    io = load_file(fixtures / "unet_io.safetensors")
    with torch.no_grad():
        assert max_rel_err(unet(io["x"], io["t"], io["embed"]), io["v"]) < 1e-4
    assert equal_state_dicts(cloob.state_dict(), haiku_pickle_state_dict(fixtures / "cloob.pkl"))


def test_off_writes_nothing_and_downloads_keep_their_place(fixtures, tmp_path, monkeypatch):
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setenv("CCLD_CACHE_DIR", "off")
    assert converted_dir() is None and hub.cache_dir() == tmp_path / "hf" / "ccld"
    load_unet(fixtures / "unet_lightning.ckpt")
    load_cloob(fixtures / "cloob.pkl", fixtures / "cloob.json")
    assert not (tmp_path / "hf").exists()


def test_the_folder_comes_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.delenv("CCLD_CACHE_DIR", raising=False)
    assert hub.cache_dir() == tmp_path / "hf" / "ccld"
    assert converted_dir() == tmp_path / "hf" / "ccld" / "converted"
    monkeypatch.setenv("CCLD_CACHE_DIR", str(tmp_path / "mine"))
    assert hub.cache_dir() == tmp_path / "mine"
    assert converted_dir() == tmp_path / "mine" / "converted"


# ccld cache info / clear


def test_cache_info_and_clear_keep_downloads(fixtures, cache, capsys):
    load_cloob(fixtures / "cloob.pkl", fixtures / "cloob.json").encode_text("a castle")
    download = cache / "cloob_laion_400m_vit_b_16_16_epochs-0123.pkl"
    download.write_bytes(b"a download")
    leftover = cache / "converted" / ".cloob-0123.999.abcdef01.tmp"  # a killed writer's
    leftover.mkdir()
    (leftover / "weights.safetensors").write_bytes(b"half")
    assert main(["cache", "info"]) == 0
    out = capsys.readouterr().out
    (entry,) = entries(cache)
    assert str(cache) in out and entry.name in out and str(fixtures / "cloob.pkl") in out
    assert "unfinished" in out and "2 entries, 13.2 MB" in out
    assert main(["cache", "clear"]) == 0
    assert "removed 2 entries (13.2 MB)" in capsys.readouterr().out
    assert list((cache / "converted").iterdir()) == [] and download.read_bytes() == b"a download"
    assert main(["cache", "info"]) == 0
    assert "0 entries, 0.0 MB" in capsys.readouterr().out


def test_cache_commands_when_off(monkeypatch, capsys):
    monkeypatch.setenv("CCLD_CACHE_DIR", "off")
    assert main(["cache", "info"]) == 0 and "off" in capsys.readouterr().out
    assert main(["cache", "clear"]) == 0 and "nothing to clear" in capsys.readouterr().out


# The safetensors files


def test_entries_are_standard_safetensors(source, cache):
    state, _ = load_converted("thing", [source], [], CountingConvert())
    (entry,) = entries(cache)
    assert equal_state_dicts(load_file(entry / "weights.safetensors"), state)


def test_mapping_reads_files_of_the_safetensors_library(tmp_path):
    tensors = {"f64": torch.randn(3, dtype=torch.float64), "bf16": torch.randn(2, 5).bfloat16(),
               "i8": torch.arange(5, dtype=torch.int8), "flag": torch.tensor(True),
               "none": torch.zeros(0), "f32": torch.randn(4, 4)}
    save_file(tensors, tmp_path / "lib.safetensors")
    assert equal_state_dicts(map_safetensors(tmp_path / "lib.safetensors"), tensors)


def test_malformed_safetensors_are_refused(tmp_path):
    path = tmp_path / "x.safetensors"
    save_file({"a": torch.ones(4), "b": torch.ones(2)}, path)
    data = path.read_bytes()
    assert b"[16,24]" in data  # b's offsets
    for broken, why in [(data[:-4], "header describes"), (data[:6], "shorter"),
                        (b"\xff" * 8 + data[8:], "runs past"),
                        (data.replace(b"[16,24]", b"[16,28]"), "do not fit")]:
        path.write_bytes(broken)
        with pytest.raises(ValueError, match=why):
            read_safetensors_header(path)


# CLOOB: a tower is read when it is used


@pytest.fixture
def cloob_io(fixtures):
    return load_file(fixtures / "cloob_io.safetensors")


def test_text_prompts_never_read_the_image_tower(fixtures, cache, cloob_io):
    cloob = load_cloob(fixtures / "cloob.pkl", fixtures / "cloob.json").to("cpu")
    with torch.inference_mode():  # as the pipeline runs it
        cloob.encode_text(["a castle"])
        text_embeds = cloob.text_encoder(cloob_io["tokens"])
    assert max_rel_err(text_embeds, cloob_io["text_embeds"]) < 1e-4
    assert all(p.is_meta for p in cloob.image_encoder.parameters())
    assert not any(p.is_meta or p.is_inference() for p in cloob.text_encoder.parameters())
    with torch.inference_mode():
        image_embeds = cloob.encode_image(cloob_io["images"])
    assert max_rel_err(image_embeds, cloob_io["image_embeds"]) < 1e-4
    assert not any(p.is_meta for p in cloob.parameters())


def test_image_prompts_never_read_the_text_tower(fixtures, cache, cloob_io):
    cloob = load_cloob(fixtures / "cloob.pkl", fixtures / "cloob.json")
    with torch.no_grad():
        assert max_rel_err(cloob.encode_image(cloob_io["images"]), cloob_io["image_embeds"]) < 1e-4
    assert all(p.is_meta for p in cloob.text_encoder.parameters())


def test_moves_wait_for_a_towers_weights(fixtures, cache, cloob_io):
    cloob = load_cloob(fixtures / "cloob.pkl", fixtures / "cloob.json").to(torch.float64)
    assert cloob.device == torch.device("cpu")
    with torch.no_grad():
        embeds = cloob.text_encoder(cloob_io["tokens"].to(cloob.device))
    assert embeds.dtype == torch.float64 and max_rel_err(embeds, cloob_io["text_embeds"]) < 1e-4
    assert all(p.is_meta for p in cloob.image_encoder.parameters())
    assert cloob.image_encoder.load_weights().embed.weight.dtype == torch.float64


def test_state_dict_holds_both_towers_used_or_not(fixtures, cache):
    cloob = load_cloob(fixtures / "cloob.pkl", fixtures / "cloob.json")
    cloob.encode_text(["a castle"])
    assert equal_state_dicts(cloob.state_dict(), haiku_pickle_state_dict(fixtures / "cloob.pkl"))


def test_loading_a_state_dict_into_an_unused_tower_is_not_overwritten_later(fixtures, cache,
                                                                            cloob_io):
    cloob = load_cloob(fixtures / "cloob.pkl", fixtures / "cloob.json")
    zeros = {k: torch.zeros_like(v) for k, v in haiku_pickle_state_dict(fixtures / "cloob.pkl").items()}
    cloob.load_state_dict(zeros)
    assert all(float(p.abs().sum()) == 0 for p in cloob.parameters())


def test_loading_draws_no_random_numbers(fixtures, cache, monkeypatch):
    drawn = []

    def counting_method(name, draw):
        def wrapper(tensor, *args, **kwargs):
            if not tensor.is_meta:
                drawn.append(name)
            return draw(tensor, *args, **kwargs)
        return wrapper

    def counting_factory(name, factory):
        def wrapper(*args, **kwargs):
            tensor = factory(*args, **kwargs)
            if not tensor.is_meta:
                drawn.append(name)
            return tensor
        return wrapper

    for name in ("uniform_", "normal_", "random_", "bernoulli_", "exponential_"):
        monkeypatch.setattr(torch.Tensor, name, counting_method(name, getattr(torch.Tensor, name)))
    for name in ("randn", "rand", "randint", "randperm"):
        monkeypatch.setattr(torch, name, counting_factory(name, getattr(torch, name)))
    torch.nn.Linear(2, 2)
    torch.randn(2)
    assert drawn == ["uniform_", "uniform_", "randn"]  # the counting works
    drawn.clear()
    for _ in ("converting", "cached"):
        load_unet(fixtures / "unet.ckpt")
        cloob = load_cloob(fixtures / "cloob.pkl", fixtures / "cloob.json")
        cloob.state_dict()  # both towers take up their weights
    assert drawn == []


# The background publisher: a first run goes on while its conversions are synced and published


@pytest.fixture
def slow_writer(cache, monkeypatch):
    """Background publishing on, each waiting for `release.set()` before it publishes."""
    import threading

    monkeypatch.setattr(weights_cache, "BACKGROUND_WRITES", True)
    release = threading.Event()
    publish = weights_cache._publish

    def waiting_publish(*args):
        assert release.wait(30)
        publish(*args)

    monkeypatch.setattr(weights_cache, "_publish", waiting_publish)
    yield release
    release.set()
    weights_cache.finish_writes()


@on_linux
def test_a_first_load_gets_the_written_copy_before_the_entry_is_published(source, cache,
                                                                           slow_writer):
    convert = CountingConvert()
    state, metadata = load_converted("thing", [source], ["a: 1"], convert)
    assert equal_state_dicts(state, convert()[0]) and metadata == {"config": [1, 2], "name": "x"}
    assert entries(cache) == []  # not yet published
    (tmp,) = temporaries(cache)
    assert all(mapped_file(t) == str(tmp / "weights.safetensors") for t in state.values()
               if t.numel())  # the converted tensors are not kept: the written copy serves
    slow_writer.set()
    weights_cache.finish_writes()
    (entry,) = entries(cache)
    assert equal_state_dicts(map_safetensors(entry / "weights.safetensors"), state)
    assert temporaries(cache) == []
    assert equal_state_dicts(state, convert()[0])  # the mapping outlives the rename


def test_a_load_of_an_entry_being_published_waits_for_it(source, cache, slow_writer):
    import threading

    convert = CountingConvert()
    first, _ = load_converted("thing", [source], [], convert)
    threading.Timer(0.2, slow_writer.set).start()
    second, _ = load_converted("thing", [source], [], convert)  # joins the publisher, then maps
    assert convert.calls == 1 and equal_state_dicts(first, second)
    (entry,) = entries(cache)
    assert all(mapped_file(t) == str(entry / "weights.safetensors") for t in second.values()
               if t.numel())


@on_linux
def test_a_first_cloob_load_holds_only_the_written_copy(fixtures, cache, slow_writer, cloob_io):
    """A text-only first run keeps neither tower's conversion in memory."""
    cloob = load_cloob(fixtures / "cloob.pkl", fixtures / "cloob.json")
    with torch.no_grad():
        cloob.encode_text(["a castle"])
    (tmp,) = temporaries(cache)
    assert all(mapped_file(p) == str(tmp / "weights.safetensors")
               for p in cloob.text_encoder.parameters())
    assert callable(cloob.image_encoder._deferred[0])  # read from the pickle again if needed
    slow_writer.set()
    weights_cache.finish_writes()
    assert len(entries(cache)) == 1
    assert equal_state_dicts(cloob.state_dict(), haiku_pickle_state_dict(fixtures / "cloob.pkl"))


def test_the_converter_is_imported_early_only_for_a_conversion_to_come(fixtures, cache):
    from ccld.models.autoencoder import import_converter_early, load_autoencoder

    assert import_converter_early(fixtures / "autoencoder.ckpt")  # nothing converted yet
    load_autoencoder(fixtures / "autoencoder.ckpt")
    weights_cache.finish_writes()
    assert not import_converter_early(fixtures / "autoencoder.ckpt")  # the cache has it
    assert not import_converter_early(fixtures)  # a folder: nothing to convert
    assert not import_converter_early(fixtures / "missing.ckpt")  # the loader says what is wrong


@on_linux
def test_a_bf16_pipeline_maps_its_rounded_unet_weights(model_files, fixtures, cache):
    """A reduced-precision pipeline stores the U-Net's rounded copies, not a float32 copy of the
    .ckpt (which it maps as it is), and later ones map them: no float32 weight is read."""
    from ccld import CCLDPipeline

    first = CCLDPipeline.from_files(**model_files, precision="bf16")
    weights_cache.finish_writes()
    stored = {e.name.split("-")[0]: e / "weights.safetensors" for e in entries(cache)}
    assert "unet_bfloat16" in stored and "unet" not in stored
    second = CCLDPipeline.from_files(**model_files, precision="bf16")
    weight = second.unet.net[0].main[0].weight
    assert weight.dtype == torch.bfloat16
    assert weight.is_contiguous(memory_format=torch.channels_last)
    assert mapped_file(weight) == str(stored["unet_bfloat16"])
    assert equal_state_dicts(second.unet.state_dict(), load_unet(fixtures / "unet.ckpt").state_dict())
    io = load_file(fixtures / "unet_io.safetensors")
    with first.autocast(), second.autocast():
        assert torch.equal(first.unet(io["x"], io["t"], io["embed"]),
                           second.unet(io["x"], io["t"], io["embed"]))


def test_entries_an_older_converter_made_from_the_same_file_are_removed(source, cache,
                                                                          monkeypatch):
    """Kinds change with converters (one CLOOB entry became two): what an older converter made
    from a file is removed when a newer one stores something from that file."""
    current = weights_cache.CONVERTER_VERSION
    monkeypatch.setattr(weights_cache, "CONVERTER_VERSION", current - 1)
    load_converted("thing", [source], [], CountingConvert())
    (old,) = entries(cache)
    monkeypatch.setattr(weights_cache, "CONVERTER_VERSION", current)
    load_converted("renamed_thing", [source], [], CountingConvert())
    (new,) = entries(cache)
    assert new != old and new.name.startswith("renamed_thing-")
