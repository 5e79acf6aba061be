"""Reading checkpoint files safely, whatever format they were released in.

No file read here can run code. PyTorch files go through `torch.load(weights_only=True)`; the
CLOOB release is a plain pickle of numpy arrays, read by an unpickler that admits only what such
a pickle needs (numeric arrays, each checked as it is built, number types, plain containers).
Every failure becomes a one-line `CCLDError` naming the file and what to do.

Nothing a file merely claims is allocated: a zip's members are checked against the file's size
before PyTorch unpacks any (a deflate bomb unpacks to gigabytes), and every tensor a file holds
against the data it has (an expanded, stride-0 view of one number claims as many elements as
it likes) before a loader lays any out.

`checked_weights` is the one gate between a file's tensors and a net: the weights every loader
gives a net (and the converted-weights cache stores) are floating-point tensors of any precision,
converted once to float32 (what the nets hold; reduced precisions round from it), and finite.
Any other tensor is refused by name: the file, the tensor, what is wrong with it.
"""

from __future__ import annotations

import math
import os
import pickle
import re
import struct
import warnings
import zipfile
from pathlib import Path

import torch

from ..errors import CCLDError, give

SAFETENSORS_SUFFIXES = (".safetensors",)


def _require_file(path: str | os.PathLike, what: str) -> Path:
    path = Path(path).expanduser()
    if path.is_dir():
        raise CCLDError(f"{path}: is a folder, not a {what} file; give the path of the file itself")
    if path.exists() and not path.is_file():
        raise CCLDError(f"{path}: not a regular file (a device, pipe or socket); give the path "
                        f"of the {what} file")
    if not path.is_file():
        raise CCLDError(f"{path}: no such {what} file; check the path, or run `ccld download` "
                        "to fetch the published models")
    if path.stat().st_size == 0:
        raise CCLDError(f"{path}: the {what} file is empty; download it again")
    return path


# What a file is by its first bytes, for saying so when it is not what a flag wants
_MAGIC = [(b"\x89PNG", "a PNG image"), (b"\xff\xd8\xff", "a JPEG image"), (b"GIF8", "a GIF image"),
          (b"RIFF", "a RIFF (WebP/WAV) file"), (b"%PDF", "a PDF document"),
          (b"PK\x03\x04", "a zip archive"), (b"\x80", "a Python pickle"),
          (b"{", "JSON text"), (b"[", "JSON text")]


def sniff_file(path: Path) -> str | None:
    """'a PNG image', 'a Python pickle', 'JSON text', ... from a file's first bytes, or None."""
    try:
        with open(path, "rb") as f:
            head = f.read(8).lstrip()
    except OSError:
        return None
    return next((kind for magic, kind in _MAGIC if head.startswith(magic)), None)


# The weights a net takes: floating point, as float32, finite

FLOATING_DTYPES_IN_WORDS = "fp16, bf16, fp32 or fp64"


class CheckedWeights(dict):
    """A state dict `checked_weights` made: float32, finite. Checking it again costs nothing,
    and the converted-weights cache keeps the mark for the entries it stores from one."""


def _dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def refuse_weight_type(source, key: str, dtype, what: str) -> CCLDError:
    """The one refusal of a weight that is not floating point (torch or numpy dtype)."""
    return CCLDError(f"{source}: its tensor {key!r} is {_dtype_name(dtype)}, not floating-point "
                     f"weights ({FLOATING_DTYPES_IN_WORDS}); this is not a {what} ccld can use")


def require_tensors(state_dict: dict, source, what: str, prefix: str = "") -> None:
    """One line naming the first entry of a state dict that is not a floating-point tensor
    (cheap: no tensor's data is read). `prefix` goes before the keys in messages."""
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            raise CCLDError(f"{source}: its entry {prefix + key!r} is a {type(value).__name__}, "
                            f"not a tensor; this is not a {what} ccld can use")
        if not value.dtype.is_floating_point:
            raise refuse_weight_type(source, prefix + key, value.dtype, what)


def _first_non_finite(tensors: dict) -> str | None:
    """The first key whose tensor holds a NaN or an infinity, or None. A sum is NaN or infinite
    where any element is, and costs one read of the data (`isfinite` writes a mask: 10x
    slower on a CPU); the sums are checked together (one synchronisation, not one per tensor),
    and only where that fails is any tensor looked at element by element, since finite values
    can also add up past float32's range."""
    keys = [k for k, t in tensors.items() if t.numel() and not t.is_meta]
    if not keys:
        return None
    with torch.inference_mode(False), torch.no_grad():
        sums = torch.stack([tensors[k].sum().cpu() for k in keys])
        if bool(torch.isfinite(sums).all()):
            return None
        return next((k for k, total in zip(keys, sums.tolist())
                     if not math.isfinite(total) and not bool(torch.isfinite(tensors[k]).all())),
                    None)


def checked_weights(state_dict: dict, source, what: str, prefix: str = "") -> CheckedWeights:
    """The weights of `state_dict` as a net takes them: every value a floating-point tensor
    (any precision: converted once to float32, layout kept; float32 ones as they are, so fp32
    files give the same bits) and finite, else one line naming the file and the first tensor
    that is not (`prefix` goes before the keys in messages). A `CheckedWeights` comes back as
    it is. The finiteness check (see `_first_non_finite`), measured on a state dict of the
    published student's shapes (105 M weights, 402 MiB, an AMD EPYC with 2 threads, shared):
    0.03 to 0.05 s, memory-mapped or in memory, where `isfinite(t).all()` per tensor takes 1.7
    to 2.7 s and a `bool()` of each tensor's sum 0.03 to 0.06 s."""
    if isinstance(state_dict, CheckedWeights):
        return state_dict
    require_tensors(state_dict, source, what, prefix)
    require_held(state_dict, source, prefix)  # before anything is read, converted or copied
    out, converted = CheckedWeights(), {}
    for key, value in state_dict.items():
        if value.dtype != torch.float32:
            view = _view_key(value)  # a view several keys share is converted once
            if view not in converted:
                converted[view] = value.detach().to(torch.float32)
            value = converted[view]
        out[key] = value
    bad_key = _first_non_finite(out)
    if bad_key is not None:
        value = out[bad_key]
        bad = int((~torch.isfinite(value)).sum())
        raise CCLDError(f"{source}: its tensor {prefix + bad_key!r} holds {bad} NaN or infinite "
                        f"value{'s' if bad != 1 else ''} (of {value.numel()}): the weights are "
                        "damaged (or from a training run that diverged); use another copy or an "
                        "earlier checkpoint")
    return out


def require_held(state_dict: dict, source, prefix: str = "") -> None:
    """Every tensor's data holds what it claims, and no two claim the same data: else laying
    them out (converting, copying, even summing them) would allocate or read what the file
    only claims. A view of one number expanded to any shape (stride 0) costs a file 4 bytes:
    112 KB of them claim billions of weights. Cheap: only shapes and storages are looked at.
    (Identical views, such as tied weights, count once.)"""
    seen, claimed = set(), {}
    for key, t in state_dict.items():
        nbytes = t.numel() * t.element_size()
        if not nbytes or t.is_meta:
            continue
        view = _view_key(t)
        if view in seen:
            continue
        seen.add(view)
        storage = t.untyped_storage()
        held = storage.nbytes() - t.storage_offset() * t.element_size()
        total = claimed[storage.data_ptr()] = claimed.get(storage.data_ptr(), 0) + nbytes
        if nbytes > held or total > storage.nbytes():
            how = ("repeats its elements, as expand() makes" if nbytes > held
                   else "shares its data with another tensor's")
            raise CCLDError(f"{source}: refused to load: its tensor {prefix + key!r} claims "
                            f"{list(t.shape)} ({_in_words(nbytes)}) from {_in_words(max(held, 0))} "
                            f"of data (a view that {how}); save the weights as .contiguous() "
                            "tensors")


def _view_key(t: torch.Tensor) -> tuple:
    """What makes two tensors the same view of the same data."""
    return (t.untyped_storage().data_ptr() if not t.is_meta else id(t), t.storage_offset(),
            tuple(t.shape), t.stride(), t.dtype, t.device)


def require_latent_scale(value, source, where: str) -> float:
    """A latent scale (a checkpoint's `autoencoder_scale`, a config's `latent_scale`) as a float,
    refused unless it is one finite number above 0: latents divided by it would paint nothing."""
    try:
        scale = float(value.reshape(-1)[0]) if (isinstance(value, torch.Tensor)
                                                and value.numel() == 1) else float(value)
    except (TypeError, ValueError, RuntimeError):
        scale = None
    if scale is None or isinstance(value, bool) or not (math.isfinite(scale) and scale > 0):
        shown = (value.tolist() if isinstance(value, torch.Tensor) and value.numel() <= 4
                 else list(value.shape) if isinstance(value, torch.Tensor) else value)
        raise CCLDError(f"{source}: its {where} (the latent scale) is {shown!r:.60}, not a "
                        "positive finite number; the file is damaged or was saved wrong: use "
                        "another copy, or export it again")
    return scale


# What a file holds against what it claims

# How many times its size a zip's compressed members may unpack to, and a file's tensors may
# claim. torch.save stores tensors uncompressed; weights that someone zipped again compress by
# 2x at best (random bits hardly at all), while a deflate bomb unpacks a thousandfold.
MAX_UNPACKED_RATIO = 16


def _in_words(nbytes: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if nbytes >= scale:
            return f"{nbytes / scale:,.1f} {unit}"
    return f"{nbytes} bytes"


def _zip_budget(path: Path, size: int, what: str) -> tuple[int, bool]:
    """(the bytes a zip-format file's members unpack to, whether any is compressed), read from
    its directory before anything is unpacked; CCLDError for more than the file can hold."""
    try:
        with zipfile.ZipFile(path) as z:
            members = z.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        raise CCLDError(f"{path}: not a readable {what} (corrupt or truncated: "
                        f"{str(e)[:120] or type(e).__name__}); download it again") from None
    unpacked = sum(m.file_size for m in members)
    compressed = [m for m in members if m.compress_type != zipfile.ZIP_STORED]
    if not compressed:
        if unpacked > size or any(m.file_size != m.compress_size for m in members):
            raise CCLDError(f"{path}: refused to load: its zip directory claims "
                            f"{_in_words(unpacked)} of members in a file of {_in_words(size)}; "
                            "the file is damaged: download it again")
        return unpacked, False
    if unpacked > MAX_UNPACKED_RATIO * size:
        biggest = max(compressed, key=lambda m: m.file_size)
        raise CCLDError(f"{path}: refused to load: its compressed member {biggest.filename!r} "
                        f"would unpack to {_in_words(biggest.file_size)} (all of them "
                        f"{_in_words(unpacked)}) from a {_in_words(size)} file, more than "
                        f"{MAX_UNPACKED_RATIO}x (a zip bomb, or not a checkpoint); save the "
                        f"weights again with torch.save, which does not compress")
    return unpacked, True


def _tensors_in(obj, name: str = ""):
    """(where, tensor) of every tensor in a loaded file's containers."""
    stack = [(name, obj)]
    while stack:
        where, value = stack.pop()
        if isinstance(value, torch.Tensor):
            yield where, value
        elif isinstance(value, dict):
            stack.extend((f"{where}.{k}" if where else str(k), v) for k, v in value.items())
        elif isinstance(value, (list, tuple)):
            stack.extend((f"{where}.{i}" if where else str(i), v) for i, v in enumerate(value))


def _check_claims(obj, path: Path, budget: int) -> None:
    """The distinct tensor views of a whole file claim at most `MAX_UNPACKED_RATIO` times the
    `budget` bytes it holds. A file may claim more than it holds: training checkpoints keep
    constant tensors as expanded views of one number (the fixture Lightning file's raw weights,
    all zeros: it claims 2x its size), which no loader lays out; but a file of them claiming
    billions of weights is refused before anyone counts them. The weights a net takes hold
    all they claim (`require_held`)."""
    seen, claimed = set(), 0
    for _, t in _tensors_in(obj):
        view = _view_key(t)
        if view not in seen:
            seen.add(view)
            claimed += t.numel() * t.element_size()
    if claimed > MAX_UNPACKED_RATIO * budget:
        raise CCLDError(f"{path}: refused to load: its tensors claim {_in_words(claimed)} "
                        f"from {_in_words(budget)} of data, more than {MAX_UNPACKED_RATIO}x "
                        "(views that repeat their elements, as expand() makes); save the "
                        "weights as .contiguous() tensors")


def load_torch_file(path: str | os.PathLike, what: str = "checkpoint", mmap: bool = False) -> dict:
    """Loads a `torch.save` file with `weights_only=True`: tensors and containers, never code.

    `mmap` maps a zip-format file (every `torch.save` since PyTorch 1.6) instead of reading it:
    a tensor's bytes are read only when used, and processes share the pages they read.

    What the file claims is checked against what it holds, before any of it is laid out: a
    zip's members against the file's size (from its directory, before PyTorch unpacks any; a
    compressed zip, which PyTorch cannot map, is read), then its tensors together against the
    bytes it holds (`_check_claims`). The weights a loader gives a net are then held to their
    data exactly (`checked_weights`)."""
    path = _require_file(path, what)
    kind = sniff_file(path)
    if kind not in (None, "a zip archive", "a Python pickle"):
        raise CCLDError(f"{path}: {kind}, not a PyTorch {what}; check which file you passed")
    size = path.stat().st_size
    zipped = zipfile.is_zipfile(path)
    budget, compressed = _zip_budget(path, size, what) if zipped else (size, False)
    try:
        with warnings.catch_warnings():  # torch's own advice is never ours (see below)
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True,
                             mmap=mmap and zipped and not compressed)
    except pickle.UnpicklingError as e:
        # weights_only refuses anything but tensors and plain containers, which is exactly a
        # file that would run code (or a format that is not a checkpoint at all). torch's
        # message suggests weights_only=False, which ccld never does: it is not repeated.
        refused = re.search(r"GLOBAL (\S+)", str(e))
        if refused and refused.group(1).startswith("numpy"):
            raise CCLDError(f"{path}: a pickle of numpy arrays (like the CLOOB release), not a "
                            f"PyTorch {what}; if it is CLOOB, pass it with {give('cloob')}") from None
        if refused:
            raise CCLDError(f"{path}: refused to load: the file asks for {refused.group(1)}, "
                            "which could run code; a checkpoint holds only tensors, so use a "
                            "trusted release file or a safetensors conversion") from None
        if kind == "a Python pickle":
            raise CCLDError(f"{path}: not a readable {what} (a plain Python pickle, not a PyTorch "
                            "checkpoint); pass the checkpoint file itself") from None
        raise CCLDError(f"{path}: not a readable {what} (corrupt or truncated); download it "
                        "again") from None
    except (EOFError, zipfile.BadZipFile, RuntimeError, ValueError, OSError) as e:
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CCLDError(f"{path}: not a readable {what} (corrupt or truncated: {detail[:120]}); "
                        "download it again") from None
    if not isinstance(obj, dict):
        raise CCLDError(f"{path}: holds a {type(obj).__name__}, not a state dict; "
                        f"this is not a {what} file")
    _check_claims(obj, path, budget)
    return obj


def load_safetensors_file(path: str | os.PathLike, what: str = "checkpoint") -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = _require_file(path, what)
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CCLDError(f"{path}: not a readable safetensors file ({e}); "
                        "convert or download it again") from None


def map_safetensors_file(path: str | os.PathLike, what: str = "checkpoint") -> dict:
    """The tensors of a safetensors file, memory-mapped (read on use, never copied whole).

    The file must not be rewritten in place while they are in use (replacing it by a rename,
    as ccld's writers do, is fine).
    """
    from .tensor_files import map_safetensors

    path = _require_file(path, what)
    try:
        return map_safetensors(path)
    except (OSError, ValueError) as e:
        raise CCLDError(f"{path}: not a readable safetensors file ({e}); "
                        "convert or download it again") from None


def load_state_file(path: str | os.PathLike, what: str = "checkpoint", mmap: bool = False) -> dict:
    """Loads a safetensors or torch file by its suffix (torch for anything else; `mmap`: see
    `load_torch_file`)."""
    if str(path).endswith(SAFETENSORS_SUFFIXES):
        return load_safetensors_file(path, what)
    return load_torch_file(path, what, mmap=mmap)


class _PayloadFreeMemo(dict):
    """An unpickler memo that does not keep large data blocks alive.

    A pickler memoizes everything it writes, so an unpickler's memo holds every array's raw-data
    string (and the argument tuples around it) until the whole pickle is read: twice the arrays'
    size at the peak. Numpy pickles never refer back to a data block, so blocks are left out;
    their slot stays taken (protocol 4's MEMOIZE counts slots), and a pickle that does refer back
    to one is refused as unreadable.
    """

    LARGE = 1 << 16  # bytes; smaller blocks are not worth the bookkeeping

    @classmethod
    def _is_payload(cls, value) -> bool:
        if isinstance(value, (str, bytes, bytearray)):
            return len(value) > cls.LARGE
        return isinstance(value, tuple) and any(
            isinstance(v, (str, bytes, bytearray)) and len(v) > cls.LARGE for v in value)

    def __setitem__(self, key, value):
        super().__setitem__(key, _DROPPED if self._is_payload(value) else value)

    def __getitem__(self, key):
        value = super().__getitem__(key)
        if value is _DROPPED:
            raise KeyError(key)  # the unpickler reports "Memo value not found"
        return value


_DROPPED = object()


class _Refused(pickle.UnpicklingError):
    """Something a pickle of numeric arrays never holds; the text says what, after "the pickle"."""


def _numpy_core(name: str):
    """A module of numpy's core by its numpy 2 name (numpy 1 has only numpy.core.*)."""
    import importlib

    try:
        return importlib.import_module(f"numpy._core.{name}")
    except ImportError:
        return importlib.import_module(f"numpy.core.{name}")


def _numeric(dtype):
    """`dtype` if it is a plain number type (bool, int, float, complex), else refused: an object
    array is built from pointers in the file (reading an element can crash the process or run
    code), and weights are never strings, records or sub-arrays."""
    import numpy

    if not isinstance(dtype, numpy.dtype):
        raise _Refused(f"gives a {type(dtype).__name__} where a numpy array needs its number type")
    if dtype.kind not in "biufc" or dtype.fields is not None or dtype.subdtype is not None:
        raise _Refused(f"holds an array of type {dtype.str!r}, not numbers (such arrays can "
                       "crash the reader or run code)")
    return dtype


def _shape(shape) -> tuple:
    if not (isinstance(shape, tuple) and len(shape) <= 32
            and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape)):
        raise _Refused(f"gives an array the shape {shape!r:.60}, not a tuple of sizes")
    return shape


def _sized(data, dtype, shape, what: str):
    """`data` if it is exactly the bytes an array of `shape` and `dtype` needs."""
    if not isinstance(data, (bytes, bytearray)):
        raise _Refused(f"gives {what} {type(data).__name__} data, not bytes (an object array's "
                       "elements, or no data at all)")
    needed = math.prod(shape) * dtype.itemsize
    if len(data) != needed:
        raise _Refused(f"gives a {dtype.name} {what} of shape {list(shape)} {len(data):,} bytes "
                       f"of data, not the {needed:,} it needs")
    return data


class _NdarrayType:
    """Stands for numpy.ndarray, which a pickle names only as the type `_reconstruct` makes:
    called, it would make an array of uninitialised memory of any size the file asks."""

    def __call__(self, *args, **kwargs):
        raise _Refused("calls numpy.ndarray(...) itself, which makes an array of uninitialised "
                       "memory")

    __new__ = None  # NEWOBJ on it fails too


_NDARRAY = object.__new__(_NdarrayType)


class _ArraysOnlyUnpickler(pickle._Unpickler):
    """Admits exactly what a pickle of numpy arrays in plain containers needs (numpy's own
    reduce of an array, a dtype and a scalar, in pickle protocols 2 to 5), checking each array
    as it is built: its type a number type, its data exactly shape x itemsize bytes. Everything
    else, and every other global, is refused by name before it is built.

    A numpy array pickles as `_reconstruct(ndarray, (0,), b'b')` (an empty array), then BUILD
    with (version, shape, dtype, fortran, data): numpy's `__setstate__` is given that state only
    once checked, and an array that never gets one is refused (it would be uninitialised
    memory). Protocol 5 pickles an array as `_frombuffer(data, dtype, shape, order)`.

    The pure-Python unpickler, because only its memo can be replaced (see `_PayloadFreeMemo`)
    and its BUILD overridden; the file is read opcode by opcode, and the arrays' data in
    blocks, at C speed either way.
    """

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, file):
        super().__init__(file)
        self.memo = _PayloadFreeMemo()
        self._unfilled: dict[int, object] = {}  # id -> arrays _reconstruct made, awaiting BUILD
        self._globals = {
            ("numpy", "ndarray"): _NDARRAY,
            ("numpy", "dtype"): self._dtype,
            ("numpy.core.multiarray", "_reconstruct"): self._reconstruct,
            ("numpy.core.multiarray", "scalar"): self._scalar,
            ("numpy.core.numeric", "_frombuffer"): self._frombuffer,
            ("_codecs", "encode"): self._encode,
            ("__builtin__", "bytes"): self._empty_bytes,  # protocol 2's b'' (a 0-size array's)
            ("builtins", "bytes"): self._empty_bytes,
            ("collections", "OrderedDict"): self._ordered_dict,
        }

    def find_class(self, module, name):
        # numpy 2 renamed numpy.core to numpy._core; pickles carry either name
        canonical = re.sub(r"^numpy\._core\.", "numpy.core.", module)
        found = self._globals.get((canonical, name))
        if found is None:
            raise _Refused(f"asks for {module}.{name}, which could run code")
        return found

    # The globals, each checking its arguments

    @staticmethod
    def _dtype(name, align=False, copy=True, *rest):
        import numpy

        if (rest or not isinstance(name, str) or len(name) > 8
                or not all(isinstance(a, (bool, int)) for a in (align, copy))):
            raise _Refused(f"asks for numpy.dtype{(name, align, copy, *rest)!r:.80}, not a "
                           "number type")
        try:  # always a copy: BUILD may set its byte order, which must not change numpy's own
            dtype = numpy.dtype(name, bool(align), True)
        except (TypeError, ValueError):
            raise _Refused(f"asks for numpy.dtype({name!r}), which is no number type") from None
        return _numeric(dtype)

    def _reconstruct(self, subtype=None, shape=None, dtype=None, *rest):
        if rest or subtype is not _NDARRAY or shape != (0,) or dtype not in (b"b", "b"):
            shown = "ndarray" if subtype is _NDARRAY else type(subtype).__name__
            raise _Refused(f"builds a numpy array by _reconstruct({shown}, {shape!r:.40}, "
                           f"{dtype!r:.20}) (numpy's own pickles give (0,) and b'b', then the "
                           "data): its values would be uninitialised memory")
        import numpy

        array = _numpy_core("multiarray")._reconstruct(numpy.ndarray, (0,), b"b")
        self._unfilled[id(array)] = array
        return array

    @staticmethod
    def _scalar(dtype=None, data=None, *rest):
        dtype = _numeric(dtype)
        if rest:
            raise _Refused("gives a numpy scalar more than its type and data")
        return _numpy_core("multiarray").scalar(dtype, _sized(data, dtype, (), "scalar"))

    @staticmethod
    def _frombuffer(data=None, dtype=None, shape=None, order=None, *rest):
        dtype, shape = _numeric(dtype), _shape(shape)
        if rest or order not in ("C", "F"):
            raise _Refused(f"builds a numpy array in order {order!r:.20}, not 'C' or 'F'")
        return _numpy_core("numeric")._frombuffer(_sized(data, dtype, shape, "array"), dtype,
                                                  shape, order)

    @staticmethod
    def _encode(text=None, encoding="utf-8", *rest):
        # protocol 2 spells bytes as _codecs.encode(str, 'latin1')
        if rest or not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
            raise _Refused(f"asks for _codecs.encode of a {type(text).__name__} as "
                           f"{encoding!r:.20}, not bytes spelt in latin-1")
        return text.encode("latin-1")

    @staticmethod
    def _empty_bytes(*args):
        if args:
            raise _Refused("asks for bytes(...) of something, not empty bytes")
        return b""

    @staticmethod
    def _ordered_dict(*args):
        if args:
            raise _Refused("builds an OrderedDict from arguments, not items")
        import collections

        return collections.OrderedDict()

    # BUILD: an array's data and a dtype's byte order, nothing else

    def load_build(self):
        import numpy

        state = self.stack.pop()
        inst = self.stack[-1]
        if id(inst) in self._unfilled and self._unfilled[id(inst)] is inst:
            if not (isinstance(state, tuple) and len(state) in (4, 5)
                    and (len(state) == 4 or state[0] == 1)):
                raise _Refused(f"gives a numpy array the state {type(state).__name__} "
                               f"{state!r:.60}, not (version, shape, dtype, fortran, data)")
            shape, dtype, fortran, data = state[-4:]
            shape, dtype = _shape(shape), _numeric(dtype)
            if not isinstance(fortran, (bool, int)):
                raise _Refused("gives a numpy array an order that is not a flag")
            _sized(data, dtype, shape, "array")
            inst.__setstate__(state)
            del self._unfilled[id(inst)]
        elif isinstance(inst, numpy.dtype):
            if not (isinstance(state, tuple) and len(state) in (8, 9) and state[0] in (3, 4)
                    and state[1] in ("<", ">", "|", "=") and state[2:5] == (None, None, None)
                    and state[5:7] == (-1, -1) and (len(state) == 8 or state[8] is None)):
                raise _Refused(f"gives numpy.dtype the state {state!r:.80}, not a plain number "
                               "type's")
            inst.__setstate__(state)
            _numeric(inst)
        else:
            raise _Refused(f"sets the state of a {type(inst).__name__}, which a pickle of "
                           "arrays never does")

    dispatch[pickle.BUILD[0]] = load_build

    def load(self):
        obj = super().load()
        if self._unfilled:
            raise _Refused("holds a numpy array that is never given its data (its values would "
                           "be uninitialised memory)")
        return obj


def load_array_pickle(path: str | os.PathLike, what: str = "CLOOB checkpoint") -> dict:
    """Loads a pickle of numpy arrays in plain containers, refusing anything that could run code.

    Read from the file as it goes: the peak memory is the arrays themselves, plus one array's
    data in transit.
    """
    path = _require_file(path, what)
    kind = sniff_file(path)
    if kind not in (None, "a Python pickle"):
        raise CCLDError(f"{path}: {kind}, not a pickle; give the {what} (.pkl release file)")
    try:
        with open(path, "rb") as f:
            unpickler = _ArraysOnlyUnpickler(f)
            obj = unpickler.load()
            # Its memo holds every array: an unpickler caught in a reference cycle (a C
            # unpickler with Python hooks can be) would keep them all until the garbage
            # collector runs, after the caller has converted and dropped them.
            unpickler.memo.clear()
    except _Refused as e:
        raise CCLDError(f"{path}: refused to load: the pickle {e}; a {what} holds only numpy "
                        "arrays of numbers") from None
    except pickle.UnpicklingError as e:
        raise CCLDError(f"{path}: not a readable {what} (corrupt or truncated: {e}); "
                        "download it again") from None
    except OSError as e:
        raise CCLDError(f"{path}: cannot read the {what} ({e.strerror or e})") from None
    except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
            MemoryError, UnicodeDecodeError, OverflowError, struct.error) as e:
        raise CCLDError(f"{path}: not a readable {what} (corrupt or truncated: "
                        f"{type(e).__name__}: {e}); download it again") from None
    if not isinstance(obj, dict):
        raise CCLDError(f"{path}: holds a {type(obj).__name__}, not a dict; "
                        f"this is not a {what}")
    return obj


def describe_foreign_state_dict(sd: dict) -> str:
    """What a state dict that is not the expected kind looks like, naming the flag it wants."""
    keys = list(sd)
    if isinstance(sd.get("state_dict"), dict):  # a Lightning checkpoint: look inside
        keys = [k.partition(".")[2] for k in sd["state_dict"]]
    if any(k.startswith("net.0.main.0.") for k in keys):
        return f"it looks like a CCLD U-Net: pass it with {give('unet')}"
    if any(k.startswith(("encoder.", "decoder.")) for k in keys):
        return f"it looks like an autoencoder: pass it with {give('autoencoder')}"
    if "params" in sd or any(k.startswith(("image_encoder.", "text_encoder.")) for k in keys):
        return f"it looks like a CLOOB checkpoint: pass it with {give('cloob')}"
    return f"{len(keys)} entries, first {keys[0]!r}" if keys else "it is empty"
