"""Reading checkpoint files safely, whatever format they were released in.

No file read here can run code. PyTorch files go through `torch.load(weights_only=True)`; the
CLOOB release is a plain pickle of numpy arrays, read by an unpickler that admits only numpy
arrays, dtypes and plain containers. Every failure becomes a one-line `CCLDError` naming the file
and what to do.
"""

from __future__ import annotations

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


def require_tensors(state_dict: dict, source, what: str) -> None:
    """One line naming the first entry of a state dict that is not a tensor."""
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            raise CCLDError(f"{source}: its entry {key!r} is a {type(value).__name__}, not a "
                            f"tensor; this is not a {what} ccld can use")


def load_torch_file(path: str | os.PathLike, what: str = "checkpoint", mmap: bool = False) -> dict:
    """Loads a `torch.save` file with `weights_only=True`: tensors and containers, never code.

    `mmap` maps a zip-format file (every `torch.save` since PyTorch 1.6) instead of reading it:
    a tensor's bytes are read only when used, and processes share the pages they read."""
    path = _require_file(path, what)
    kind = sniff_file(path)
    if kind not in (None, "a zip archive", "a Python pickle"):
        raise CCLDError(f"{path}: {kind}, not a PyTorch {what}; check which file you passed")
    try:
        with warnings.catch_warnings():  # torch's own advice is never ours (see below)
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True,
                             mmap=mmap and zipfile.is_zipfile(path))
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
    from .weights_cache import map_safetensors

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


def _numeric_dtype(*args, **kwargs):
    """numpy.dtype for numbers and booleans only: an object array is built from pointers in the
    file (reading an element can crash the process), and weights are never strings or records."""
    import numpy

    dtype = numpy.dtype(*args, **kwargs)
    if dtype.kind not in "biufc":
        raise pickle.UnpicklingError(f"forbidden array type {dtype.str!r}")
    return dtype


class _ArraysOnlyUnpickler(pickle._Unpickler):
    """Admits numpy arrays, dtypes, scalars and plain containers; refuses every other global.

    The pure-Python unpickler, because only its memo can be replaced (see `_PayloadFreeMemo`);
    the file is read opcode by opcode, and the arrays' data in blocks, at C speed either way.
    """

    ALLOWED = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("_codecs", "encode"),  # protocol-2 pickles spell bytes as _codecs.encode(str, 'latin1')
        ("collections", "OrderedDict"),
    }

    def __init__(self, file):
        super().__init__(file)
        self.memo = _PayloadFreeMemo()

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"forbidden global {module}.{name}")
        if (module, name) == ("numpy", "dtype"):
            return _numeric_dtype
        if module.startswith("numpy.core") or module.startswith("numpy._core"):
            import numpy
            # numpy 2 renamed numpy.core to numpy._core; numpy 1 has only the old name.
            new = (module.replace("numpy.core", "numpy._core", 1) if module.startswith("numpy.core")
                   else module)
            if int(numpy.__version__.split(".")[0]) >= 2:
                module = new
            else:
                module = new.replace("numpy._core", "numpy.core", 1)
        return super().find_class(module, name)


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
    except pickle.UnpicklingError as e:
        if "forbidden array type" in str(e):
            raise CCLDError(f"{path}: refused to load: the pickle holds an array of type "
                            f"{str(e)[21:]}, not numbers (such arrays can crash the reader or run "
                            f"code); a {what} holds only numeric arrays") from None
        if "forbidden global" in str(e):
            raise CCLDError(f"{path}: refused to load: the pickle asks for {str(e)[17:]}, which "
                            f"could run code; a {what} holds only numpy arrays") from None
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
