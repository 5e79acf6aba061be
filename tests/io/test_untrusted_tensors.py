"""Tensors from files ccld did not write, through the one reading layer (`ccld.io.checkpoints`):

- every floating dtype loads, converted once to float32 (the fp32 fixtures' bits unchanged),
  and any other dtype is refused by name: the file, the tensor, its dtype;
- nothing a file merely claims is allocated: expanded (stride-0) views and deflate bombs are
  refused from their shapes and zip directory, at a bounded peak memory (measured in a child);
- the CLOOB pickle reader builds only checked numeric arrays, and runs nothing else;
- weights and latent scales that are not finite (a scale also: above 0) are refused at load,
  named, instead of failing at sampling with advice about the guidance.
"""

import collections
import io
import json
import os
import pickle
import re
import resource
import shutil
import struct
import subprocess
import sys
import zipfile
import zlib

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from ccld import CCLDPipeline
from ccld.errors import CCLDError
from ccld.io.checkpoints import CheckedWeights, checked_weights, load_array_pickle, load_torch_file
from ccld.models.autoencoder import decode_latents, load_autoencoder
from ccld.models.cloob import load_cloob
from ccld.models.unet import (
    _EMBED_KEY,
    _WIDTH_KEYS,
    CCLDUNet,
    infer_unet_config,
    load_unet,
    unet_weights,
)
from conftest import generate_with_files as run
from conftest import max_rel_err, one_error_line

try:  # numpy 2 (numpy 1 has only numpy.core)
    from numpy._core.multiarray import _reconstruct, scalar
    from numpy._core.numeric import _frombuffer
except ImportError:  # pragma: no cover
    from numpy.core.multiarray import _reconstruct, scalar
    from numpy.core.numeric import _frombuffer

FLOATING = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64}


def one_line(capsys, *fragments):
    return one_error_line(capsys, fragments, never=("Traceback", "went non-finite"))


@pytest.fixture(scope="session")
def unet_sd(fixtures) -> dict:
    return torch.load(fixtures / "unet.ckpt", weights_only=True)


@pytest.fixture(scope="session")
def unet_io(fixtures) -> dict:
    return load_file(fixtures / "unet_io.safetensors")


def velocity(unet, unet_io):
    with torch.no_grad():
        return unet(unet_io["x"], unet_io["t"], unet_io["embed"])


@pytest.fixture(scope="session")
def fp32_velocity(fixtures, unet_io):
    return velocity(load_unet(fixtures / "unet.ckpt"), unet_io)


def half_cloob_pickle(fixtures, path, dtype=np.float16):
    obj = load_array_pickle(fixtures / "cloob.pkl")
    for tree in obj["params"]:
        for module in tree.values():
            for name in module:
                module[name] = module[name].astype(dtype)
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)  # the release's protocol
    return path


@pytest.fixture(scope="session")
def half_files(fixtures, unet_sd, tmp_path_factory) -> dict:
    """The fixture models saved in half precision, as `CCLDPipeline.from_files` takes them."""
    folder = tmp_path_factory.mktemp("half")
    torch.save({k: v.half() for k, v in unet_sd.items()}, folder / "unet.ckpt")
    ae = torch.load(fixtures / "autoencoder.ckpt", weights_only=True)
    ae["state_dict"] = {k: v.half() for k, v in ae["state_dict"].items()}
    torch.save(ae, folder / "autoencoder.ckpt")
    shutil.copy(fixtures / "autoencoder.yaml", folder / "autoencoder.yaml")
    return {"unet": folder / "unet.ckpt", "autoencoder": folder / "autoencoder.ckpt",
            "cloob": half_cloob_pickle(fixtures, folder / "cloob.pkl"),
            "cloob_config": fixtures / "cloob.json"}


# 1. Every floating dtype loads, as float32; any other dtype is refused by name


@pytest.mark.parametrize("name,suffix", [("fp16", ".ckpt"), ("fp16", ".safetensors"),
                                         ("bf16", ".ckpt"), ("fp64", ".safetensors")])
def test_a_unet_of_any_floating_dtype_loads_as_float32(unet_sd, tmp_path, name, suffix):
    """Each weight the file's value, as float32: bf16 and fp64 copies hold the fixture's
    (bf16-representable) weights exactly, so they compute what fp32 does bit for bit."""
    dtype = FLOATING[name]
    sd = {k: v.to(dtype).contiguous() for k, v in unet_sd.items()}
    path = tmp_path / f"unet_{name}{suffix}"
    if suffix == ".ckpt":
        torch.save(sd, path)  # a bare state dict, like the releases
    else:
        save_file(sd, str(path))
    weights = load_unet(path).state_dict()
    if dtype == torch.float16:
        assert all(w.dtype == torch.float32 and torch.equal(w, unet_sd[k].half().float())
                   for k, w in weights.items())
    else:
        assert all(w.dtype == torch.float32 and torch.equal(w, unet_sd[k])
                   for k, w in weights.items())
    if suffix == ".ckpt":  # converted once: what the cache holds (and maps from now on)
        stored, _ = unet_weights(path)
        assert isinstance(stored, CheckedWeights)
        assert {t.dtype for t in stored.values()} == {torch.float32}


def test_fp32_weights_are_taken_as_they_are_and_fp16_paints_within_rounding(
        fixtures, unet_sd, unet_io, fp32_velocity, half_files):
    checked = checked_weights(unet_sd, "unet.ckpt", "U-Net checkpoint")
    assert isinstance(checked, CheckedWeights)
    assert all(checked[k] is v for k, v in unet_sd.items())  # not even copied: the same bits
    unet = load_unet(fixtures / "unet.ckpt")
    assert all(torch.equal(v, unet_sd[k]) for k, v in unet.state_dict().items())
    assert max_rel_err(fp32_velocity, unet_io["v"]) < 1e-4  # the reference's, as ever
    half = velocity(load_unet(half_files["unet"]), unet_io)
    assert max_rel_err(half, fp32_velocity) < 1e-4  # measured: 1.7e-6


def test_half_precision_models_paint_in_every_precision(half_files, fixture_pipeline, fixtures):
    """An fp16 U-Net, autoencoder and CLOOB: loaded as float32, painting in fp32 what the fp32
    files paint (within rounding), then in bf16 both when moved (.to) and as given."""
    pipe = CCLDPipeline.from_files(**half_files)
    for net in (pipe.unet, pipe.autoencoder, pipe.cloob):
        assert {t.dtype for t in net.state_dict().values()} == {torch.float32}
    kw = {"steps": 2, "size": 64, "seed": 3}
    assert max_rel_err(pipe.generate_latents("a lighthouse", **kw),
                       fixture_pipeline.generate_latents("a lighthouse", **kw)) < 1e-3
    for pipe in (pipe.to(precision="bf16"),
                 CCLDPipeline.from_files(**half_files, precision="bf16")):
        assert pipe.precision == "bf16"
        image = np.asarray(pipe("a lighthouse", progress=False, **kw)[0])
        assert image.shape == (64, 64, 3) and image.std() > 0
    io_ = load_file(fixtures / "autoencoder_io.safetensors")
    with torch.no_grad():
        decoded = decode_latents(load_autoencoder(half_files["autoencoder"]), io_["z"])
    assert max_rel_err(decoded, io_["decoded"]) < 1e-4  # measured: 5e-6


def test_cloob_in_other_precisions(fixtures, half_files, tmp_path):
    reference = load_file(fixtures / "cloob_io.safetensors")
    half = load_cloob(half_files["cloob"], fixtures / "cloob.json")  # a pickle of fp16 arrays
    with torch.no_grad():
        text = half.text_encoder(reference["tokens"])
    assert text.dtype == torch.float32
    assert max_rel_err(text, reference["text_embeds"]) < 1e-4  # measured: 2e-7
    fp32 = load_cloob(fixtures / "cloob.pkl", fixtures / "cloob.json")
    sd = fp32.state_dict()
    with torch.no_grad():
        expected = fp32.image_encoder(fp32.normalize(reference["images"]))
    for name in ("bf16", "fp64"):  # safetensors conversions; bf16-representable: exact
        save_file({k: v.to(FLOATING[name]).contiguous() for k, v in sd.items()},
                  str(tmp_path / f"cloob_{name}.safetensors"))
        other = load_cloob(tmp_path / f"cloob_{name}.safetensors", fixtures / "cloob.json")
        with torch.no_grad():
            assert torch.equal(other.image_encoder(other.normalize(reference["images"])), expected)


def architecture_only(unet_sd, **changes) -> dict:
    """The tensors the U-Net's architecture is read from, with `changes`: enough for a file
    refused before its weights are fitted to the net (and 2 MB, not 95)."""
    keys = [*_WIDTH_KEYS, _EMBED_KEY, "autoencoder_scale"]
    return {**{k: unet_sd[k] for k in keys}, **changes}


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.uint8,
                                   torch.complex64])
def test_a_unet_weight_that_is_not_floating_point_is_refused_by_name(unet_sd, tmp_path, dtype):
    bias = unet_sd["net.0.main.0.bias"].to(dtype)
    torch.save(architecture_only(unet_sd, **{"net.0.main.0.bias": bias}), tmp_path / "bad.ckpt")
    name = str(dtype).removeprefix("torch.")
    with pytest.raises(CCLDError, match=rf"bad\.ckpt: its tensor 'net\.0\.main\.0\.bias' is "
                                        rf"{name}, not floating-point weights"):
        load_unet(tmp_path / "bad.ckpt")


def test_an_int_unet_is_refused_on_the_command_line(unet_sd, model_flags, tmp_path, capsys):
    torch.save({k: v.long() if k == "net.0.main.0.weight" else v for k, v in unet_sd.items()},
               tmp_path / "int.ckpt")
    assert run(model_flags, tmp_path, unet=tmp_path / "int.ckpt") == 2
    one_line(capsys, "int.ckpt", "'net.0.main.0.weight' is int64, not floating-point weights")


def test_int_weights_of_the_autoencoder_and_cloob_are_refused_by_name(fixtures, tmp_path):
    ae = torch.load(fixtures / "autoencoder.ckpt", weights_only=True)
    ae["state_dict"]["decoder.conv_in.weight"] = ae["state_dict"]["decoder.conv_in.weight"].int()
    torch.save(ae, tmp_path / "ae.ckpt")
    shutil.copy(fixtures / "autoencoder.yaml", tmp_path / "ae.yaml")
    with pytest.raises(CCLDError, match=r"ae\.ckpt: its tensor 'decoder\.conv_in\.weight' is "
                                        r"int32, not floating-point"):
        load_autoencoder(tmp_path / "ae.ckpt")
    obj = load_array_pickle(fixtures / "cloob.pkl")
    module = next(iter(obj["params"][1]))
    name = next(iter(obj["params"][1][module]))
    obj["params"][1][module][name] = obj["params"][1][module][name].astype(np.int32)
    (tmp_path / "int.pkl").write_bytes(pickle.dumps(obj, protocol=2))
    with pytest.raises(CCLDError, match=rf"int\.pkl: its tensor '{module}/{name}' is int32, "
                                        "not floating-point"):
        load_cloob(tmp_path / "int.pkl", fixtures / "cloob.json")


# 2. Nothing a file claims is allocated before it is checked

LIMITS = {resource.RLIMIT_AS: 12 << 30, resource.RLIMIT_FSIZE: 2 << 30}  # a net for a bug


def peak_memory_of(args, tmp_path) -> tuple[int, float, str]:
    """(exit status, peak resident memory in MB, stderr) of `python -m ccld ARGS` in a child
    (its own rusage, from wait4), under limits that keep a regression from taking the machine
    or its disk."""
    def limit():
        for which, value in LIMITS.items():
            resource.setrlimit(which, (value, value))

    with open(tmp_path / "stderr", "w+") as err:
        child = subprocess.Popen([sys.executable, "-m", "ccld", *args], stdout=subprocess.DEVNULL,
                                 stderr=err, preexec_fn=limit,
                                 env={**os.environ, "CCLD_CACHE_DIR": str(tmp_path / "cache")})
        _, status, usage = os.wait4(child.pid, 0)
        err.seek(0)
        return os.waitstatus_to_exitcode(status), usage.ru_maxrss / 1024, err.read()


def expanded_unet(base: int) -> dict:
    """Every U-Net weight of a net `base` channels wide as a view of one zero: 4 bytes each."""
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in CCLDUNet(base, (1, 1, 2, 2)).state_dict().items()}
    return {k: torch.zeros(1).expand(s) if len(s) else torch.tensor(3.25)
            for k, s in shapes.items()}


def test_expanded_views_claiming_billions_of_weights_allocate_nothing(model_flags, tmp_path):
    sd = expanded_unet(2048)
    assert sum(v.numel() for v in sd.values()) > 7.6e9
    torch.save(sd, tmp_path / "expanded.ckpt")
    assert (tmp_path / "expanded.ckpt").stat().st_size < 120_000
    flags = dict(zip(model_flags[::2], model_flags[1::2]), **{"--unet": str(tmp_path / "expanded.ckpt")})
    for args in (["generate", "x", "--steps", "1", "-q", "--out", str(tmp_path / "out"),
                  *[x for kv in flags.items() for x in kv]],
                 ["info", str(tmp_path / "expanded.ckpt")]):
        status, peak_mb, err = peak_memory_of(args, tmp_path)
        lines = err.strip().splitlines()
        assert status == 2 and len(lines) == 1, (status, err[-2000:])
        assert "expanded.ckpt: refused to load" in lines[0] and "expand()" in lines[0]
        assert peak_mb < 1500, peak_mb
    assert not list(tmp_path.glob("cache/converted/*"))  # nothing written either


def test_a_net_weight_that_repeats_its_elements_is_refused_by_name(unet_sd, tmp_path):
    """One expanded weight in a genuine U-Net: the file claims little more than it holds, but
    the net would take a tensor its data does not hold."""
    sd = dict(unet_sd)
    sd["net.4.main.1.main.0.weight"] = torch.zeros(1).expand(sd["net.4.main.1.main.0.weight"].shape)
    torch.save(sd, tmp_path / "one.ckpt")
    with pytest.raises(CCLDError, match=r"one\.ckpt: refused to load: its tensor "
                                        r"'net\.4\.main\.1\.main\.0\.weight' claims \[64, 64, 3, 3\]"):
        load_unet(tmp_path / "one.ckpt")
    a = torch.arange(10.0)
    with pytest.raises(CCLDError, match="'y' claims .* shares its data with another"):
        checked_weights({"x": a[:6], "y": a[4:]}, "overlap", "test")
    tied = checked_weights({"x": a, "y": a.view(10)}, "tied", "test")  # the same view: fine
    assert tied["x"] is a


def deflated_zeros(n: int, chunk: int = 1 << 20) -> bytes:
    """A raw deflate stream of n zero bytes, made in milliseconds: after a full flush, every
    further chunk of zeros compresses to the same bytes."""
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    first = c.compress(bytes(chunk)) + c.flush(zlib.Z_FULL_FLUSH)
    steady = c.compress(bytes(chunk)) + c.flush(zlib.Z_FULL_FLUSH)
    return first + steady * (n // chunk - 1) + c.flush()


def zip_file(members) -> bytes:
    """A zip of (name, data as stored, size unpacked, crc, method) written by hand: zipfile
    cannot store data that was compressed elsewhere. (The bomb's CRC is not computed: it
    would take seconds, and nothing reads that far.)"""
    out, central = io.BytesIO(), []
    for name, data, size, crc, method in members:
        offset, raw = out.tell(), name.encode()
        out.write(struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, method, 0, 0, crc, len(data),
                              size, len(raw), 0) + raw + data)
        central.append(struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0, method, 0, 0,
                                   crc, len(data), size, len(raw), 0, 0, 0, 0, 0, offset) + raw)
    start, directory = out.tell(), b"".join(central)
    out.write(directory + struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(members), len(members),
                                      len(directory), start, 0))
    return out.getvalue()


def deflate_bomb(n: int) -> bytes:
    """A torch.save zip of one n-byte tensor whose member is n zeros, deflated a thousandfold."""
    storage = object()

    class Tensor:
        def __reduce__(self):
            return (torch._utils._rebuild_tensor_v2,
                    (storage, 0, (n,), (1,), False, collections.OrderedDict()))

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            return ("storage", torch.ByteStorage, "0", "cpu", n) if obj is storage else None

    data_pkl = io.BytesIO()
    Pickler(data_pkl, protocol=2).dump({"w": Tensor()})
    template = io.BytesIO()
    torch.save({"w": torch.zeros(1, dtype=torch.uint8)}, template)
    members = []
    with zipfile.ZipFile(template) as z:
        for info in z.infolist():
            data = data_pkl.getvalue() if info.filename.endswith("/data.pkl") else z.read(info)
            if info.filename.endswith("/data/0"):
                members.append((info.filename, deflated_zeros(n), n, 0, zipfile.ZIP_DEFLATED))
            else:
                members.append((info.filename, data, len(data), zlib.crc32(data), 0))
    return zip_file(members)


def test_a_deflate_bomb_is_refused_from_its_zip_directory(tmp_path):
    (tmp_path / "bomb.ckpt").write_bytes(deflate_bomb(3 << 30))  # 3 GiB from 3 MB
    assert (tmp_path / "bomb.ckpt").stat().st_size < 4e6
    status, peak_mb, err = peak_memory_of(["info", str(tmp_path / "bomb.ckpt")], tmp_path)
    lines = err.strip().splitlines()
    assert status == 2 and len(lines) == 1, (status, err[-2000:])
    assert "bomb.ckpt: refused to load: its compressed member 'archive/data/0'" in lines[0]
    assert peak_mb < 1500, peak_mb  # it unpacked 3.3 GB


def test_a_checkpoint_zipped_again_with_compression_still_loads(fixtures, tmp_path):
    """PyTorch cannot map a compressed zip: it is read instead, within the cap."""
    with (zipfile.ZipFile(fixtures / "autoencoder.ckpt") as zin,
          zipfile.ZipFile(tmp_path / "deflated.ckpt", "w", zipfile.ZIP_DEFLATED) as zout):
        for info in zin.infolist():
            zout.writestr(info.filename, zin.read(info), compresslevel=1)
    expected = torch.load(fixtures / "autoencoder.ckpt", weights_only=True)["state_dict"]
    got = load_torch_file(tmp_path / "deflated.ckpt", mmap=True)["state_dict"]
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], v) for k, v in expected.items())


def test_the_architecture_a_file_claims_is_bounded_and_of_the_unet_kind():
    with torch.device("meta"):
        sd = CCLDUNet(8, (1, 1, 2, 2), embed_dim=16).state_dict()
    for key, shape, fragment in [
            ("net.0.main.0.weight", (20000, 20, 3, 3), "20000 channels wide, more than 16384"),
            ("net.0.main.0.weight", (8, 7, 3, 3), "not the U-Net's [width, 20, 3, 3]"),
            ("mapping.0.main.0.weight", (1024,), "not the U-Net's [1024, embed_dim + 128]"),
            ("distilled_timesteps", (10 ** 6,), "not 1 to 1000 steps")]:
        bad = {**sd, key: torch.empty(shape, device="meta")}
        with pytest.raises(CCLDError, match=rf"odd\.ckpt: .*{re.escape(fragment)}"):
            infer_unet_config(bad, "odd.ckpt")


# 3. The CLOOB pickle reader: numpy's own array pickles, each array checked as it is built


class Reduced:
    """Pickles as `func(*args)` (then BUILD with `state`, if given): a hand-made pickle."""

    def __init__(self, func, args, state=None):
        self.func, self.args, self.state = func, args, state

    def __reduce__(self):
        return (self.func, self.args) if self.state is None else (self.func, self.args, self.state)


class Planted:
    def __reduce__(self):
        return (os.system, ("touch PWNED_BY_CHECKPOINT",))


def with_leaf(fixtures, tmp_path, leaf, protocol=2) -> tuple:
    """The fixture CLOOB pickle with its text projection's weight replaced by `leaf`."""
    obj = load_array_pickle(fixtures / "cloob.pkl")
    module = "text_encoder/proj"
    shape = obj["params"][1][module]["w"].shape
    obj["params"][1][module]["w"] = leaf(shape) if callable(leaf) else leaf
    path = tmp_path / "crafted.pkl"
    path.write_bytes(pickle.dumps(obj, protocol=protocol))
    return path, shape


def test_an_array_without_its_data_is_refused_not_loaded_as_uninitialised_memory(
        fixtures, model_flags, tmp_path, capsys):
    path, shape = with_leaf(fixtures, tmp_path,
                            lambda shape: Reduced(_reconstruct, (np.ndarray, shape, b"f")))
    assert run(model_flags, tmp_path, cloob=path) == 2  # it painted, from garbage weights
    one_line(capsys, "crafted.pkl: refused to load: the pickle builds a numpy array by "
                     f"_reconstruct(ndarray, {shape!r}, b'f')", "uninitialised memory")


F4 = np.dtype("f4")


@pytest.mark.parametrize("leaf,protocol,fragment", [
    # numpy.ndarray called itself: uninitialised memory of any size
    (lambda shape: Reduced(np.ndarray, (shape, "f4")), 2, "calls numpy.ndarray(...) itself"),
    # an object array made by _reconstruct alone, no numpy.dtype involved
    (lambda shape: Reduced(_reconstruct, (np.ndarray, (4,), b"O")), 2, "(4,), b'O')"),
    # numpy's empty array given too little data, or a list of objects as data
    (lambda shape: Reduced(_reconstruct, (np.ndarray, (0,), b"b"), (1, shape, F4, False, b"ab")),
     2, "of data, not the"),
    (lambda shape: Reduced(_reconstruct, (np.ndarray, (0,), b"b"), (1, (2,), F4, False, [1, 2])),
     2, "list data, not bytes"),
    # numpy's empty array that is never given its data
    (lambda shape: Reduced(_reconstruct, (np.ndarray, (0,), b"b")), 2,
     "never given its data"),
    # protocol 5's _frombuffer, too little data; a scalar of the wrong size
    (lambda shape: Reduced(_frombuffer, (bytearray(8), F4, shape, "C")), 5, "of data, not the"),
    (lambda shape: Reduced(scalar, (np.dtype("f8"), b"\x00")), 2, "1 bytes of data, not the 8"),
    # a number type with fields, set by BUILD
    (lambda shape: Reduced(np.dtype, ("f4", False, True), (3, "<", None, ("a",), {"a": 1}, 4,
                                                           1, 0)), 2, "gives numpy.dtype the state"),
])
def test_hand_made_array_pickles_are_refused_as_they_are_built(fixtures, tmp_path, leaf,
                                                               protocol, fragment):
    path, _ = with_leaf(fixtures, tmp_path, leaf, protocol)
    with pytest.raises(CCLDError, match="crafted.pkl: refused to load: the pickle ") as e:
        load_array_pickle(path)
    assert fragment in str(e.value)


@pytest.mark.parametrize("leaf", [
    Planted(),  # a call of its own
    Reduced(_reconstruct, (Planted(), (0,), b"b")),  # as the array type numpy builds
    Reduced(_reconstruct, (np.ndarray, (0,), b"b"), (1, (2,), F4, False, Planted())),  # as data
    Reduced(collections.OrderedDict, (), {"x": Planted()}),  # as an attribute
])
def test_a_pickle_that_would_run_code_is_refused_and_runs_nothing(fixtures, tmp_path,
                                                                  monkeypatch, leaf):
    monkeypatch.chdir(tmp_path)
    path, _ = with_leaf(fixtures, tmp_path, leaf)
    with pytest.raises(CCLDError, match=r"refused to load: the pickle asks for (posix|os)\.system, "
                                        "which could run code"):
        load_cloob(path, fixtures / "cloob.json")
    assert not (tmp_path / "PWNED_BY_CHECKPOINT").exists()


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_numpys_own_pickles_of_every_protocol_still_load(tmp_path, protocol):
    arrays = {"w": np.arange(12, dtype="f4").reshape(3, 4), "big_endian": np.arange(3, dtype=">f8"),
              "fortran": np.asfortranarray(np.ones((2, 3), "f2")), "empty": np.zeros((0, 4), "f4"),
              "large": np.random.default_rng(0).random((300, 300), dtype="f4")}
    obj = {"params": ({"m": arrays}, {}), "step": np.int64(7), "scale": np.float32(0.5),
           "ordered": collections.OrderedDict(a=np.zeros(2, "f4"))}
    (tmp_path / "p.pkl").write_bytes(pickle.dumps(obj, protocol=protocol))
    got = load_array_pickle(tmp_path / "p.pkl")
    for k, a in arrays.items():
        assert np.array_equal(got["params"][0]["m"][k], a) and got["params"][0]["m"][k].shape == a.shape
    assert got["step"] == 7 and got["scale"] == np.float32(0.5) and list(got["ordered"]) == ["a"]
    assert np.dtype("f4").byteorder == "="  # numpy's own number types untouched


# 4. What is not finite is refused at load, named


def test_nan_weights_are_refused_at_load_naming_the_tensor(unet_sd, model_files, model_flags,
                                                          tmp_path, capsys):
    sd = dict(unet_sd)
    sd["net.0.main.4.weight"] = sd["net.0.main.4.weight"].clone()
    sd["net.0.main.4.weight"][0, 0, 0, :2] = float("nan")
    torch.save(sd, tmp_path / "nan.ckpt")
    assert run(model_flags, tmp_path, unet=tmp_path / "nan.ckpt") == 2
    one_line(capsys, "nan.ckpt: its tensor 'net.0.main.4.weight' holds 2 NaN or infinite values")
    sd["net.0.main.4.weight"][0, 0, 0, :2] = float("inf")
    save_file(sd, str(tmp_path / "inf.safetensors"))
    with pytest.raises(CCLDError, match=r"inf\.safetensors: its tensor 'net\.0\.main\.4\.weight'"):
        CCLDPipeline.from_files(**{**model_files, "unet": tmp_path / "inf.safetensors"})


@pytest.mark.parametrize("scale", [float("nan"), 0.0, -2.0, float("inf")])
def test_a_latent_scale_that_is_not_positive_and_finite_is_refused_naming_where(
        unet_sd, tmp_path, scale):
    torch.save(architecture_only(unet_sd, autoencoder_scale=torch.tensor(scale)),
               tmp_path / "scale.ckpt")
    with pytest.raises(CCLDError, match=rf"scale\.ckpt: its autoencoder_scale buffer \(the latent "
                                        rf"scale\) is {scale!r}, not a positive finite number"):
        load_unet(tmp_path / "scale.ckpt")


def test_a_bad_latent_scale_on_the_command_line_and_in_a_pipeline_folder(
        unet_sd, model_flags, fixture_pipeline, tmp_path, capsys):
    torch.save({**unet_sd, "autoencoder_scale": torch.tensor(float("nan"))}, tmp_path / "s.ckpt")
    assert run(model_flags, tmp_path, unet=tmp_path / "s.ckpt") == 2
    one_line(capsys, "s.ckpt: its autoencoder_scale buffer (the latent scale) is nan")
    folder = fixture_pipeline.save_pretrained(tmp_path / "m")
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    save_file({**load_file(weights), "autoencoder_scale": torch.tensor(0.0)}, str(weights))
    with pytest.raises(CCLDError, match=r"m/unet: its autoencoder_scale buffer .* is 0\.0"):
        CCLDPipeline.from_pretrained(folder)


def test_nan_in_the_autoencoder_and_cloob_is_refused_naming_the_tensor(fixtures, tmp_path):
    ae = torch.load(fixtures / "autoencoder.ckpt", weights_only=True)
    ae["state_dict"]["decoder.conv_in.weight"][0, 0, 0, 0] = float("nan")
    torch.save(ae, tmp_path / "ae.ckpt")
    shutil.copy(fixtures / "autoencoder.yaml", tmp_path / "ae.yaml")
    with pytest.raises(CCLDError, match=r"ae\.ckpt: its tensor 'decoder\.conv_in\.weight' holds 1 "
                                        "NaN or infinite value "):
        load_autoencoder(tmp_path / "ae.ckpt")  # under the file's own (LDM) name
    path, _ = with_leaf(fixtures, tmp_path, lambda shape: np.full(shape, np.inf, "f4"))
    with pytest.raises(CCLDError, match=r"crafted\.pkl: its tensor 'text_encoder\.proj\.weight'"):
        load_cloob(path, fixtures / "cloob.json")
    # an image tower's weights are read (and checked) when first used, every time till fixed
    sd = load_cloob(fixtures / "cloob.pkl", fixtures / "cloob.json").state_dict()
    sd["image_encoder.proj.bias"][3] = float("nan")
    save_file(sd, str(tmp_path / "c.safetensors"))
    cloob = load_cloob(tmp_path / "c.safetensors", fixtures / "cloob.json")
    cloob.encode_text(["fine"])
    for _ in range(2):
        with pytest.raises(CCLDError, match=r"c\.safetensors: its tensor 'image_encoder\.proj\.bias'"):
            cloob.encode_image(torch.rand(1, 3, 64, 64))


def test_a_tiny_decoder_with_nan_weights_or_an_infinite_input_scale(tmp_path):
    from ccld.models.tiny_decoder import (
        TinyDecoder,
        TinyDecoderConfig,
        tiny_decoder_from_state_dict,
    )

    config = TinyDecoderConfig(decoder_block_out_channels=(8, 8), num_decoder_blocks=(1, 1))
    sd = TinyDecoder(config).state_dict()
    sd["decoder.layers.0.weight"][0, 0, 0, 0] = float("nan")
    with pytest.raises(CCLDError, match="tiny: its tensor 'decoder.layers.0.weight' holds 1 NaN"):
        tiny_decoder_from_state_dict(config, sd, "tiny")
    half = {k: v.half() for k, v in TinyDecoder(config).state_dict().items()}
    assert tiny_decoder_from_state_dict(config, half).decoder.layers[0].weight.dtype == torch.float32
    with pytest.raises(CCLDError, match="input_scale inf is not a positive finite number"):
        TinyDecoderConfig.from_dict({**json.loads(json.dumps(config.to_dict())),
                                     "input_scale": float("inf")})
