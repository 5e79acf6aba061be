"""The safetensors format, read and written without copies: files memory-mapped copy-on-write
(nothing is read until used), and written straight from each tensor's memory, 4-d tensors
optionally stored channels-last (see `write_safetensors`). The header is checked whole against
the file before any tensor is made.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path
from typing import BinaryIO, Sequence

import torch

from .jsontext import JSONInputError, parse

StateDict = dict[str, torch.Tensor]

# safetensors dtype names; the float8 types exist only in newer torch builds
SAFETENSORS_DTYPES = {
    name: dtype for name, dtype in {
        "F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
        "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
        "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
        "U16": getattr(torch, "uint16", None), "U32": getattr(torch, "uint32", None),
        "U64": getattr(torch, "uint64", None),
        "F8_E4M3": getattr(torch, "float8_e4m3fn", None),
        "F8_E5M2": getattr(torch, "float8_e5m2", None),
    }.items() if dtype is not None
}
_DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
_MAX_HEADER_BYTES = 100 << 20  # the limit the safetensors library itself sets

CHANNELS_LAST_KEY = "ccld_channels_last"  # __metadata__: the tensors stored channels-last


def write_safetensors(f: BinaryIO, tensors: StateDict, channels_last: Sequence[str] = ()) -> None:
    """Writes `tensors` in the safetensors format, each straight from its own memory: the
    safetensors library would want the channels-last ones as contiguous copies made all at once
    (a second copy of the kernels; see benchmarks/notes/cache.md).

    Larger elements come first, so every tensor starts at a multiple of its element size:
    `map_safetensors` can then view each in place. The 4-d tensors named in `channels_last` are
    stored in that memory order (as [N, H, W, C], listed in the header's metadata), so that
    `map_safetensors` gives them back as channels-last views: a net that runs channels-last then
    needs no copy of them.
    """
    channels_last = sorted(set(channels_last))
    stored = {k: v.detach().cpu() for k, v in tensors.items()}
    for name in channels_last:
        if stored[name].dim() != 4:
            raise ValueError(f"{name}: only 4-d tensors can be stored channels-last")
        stored[name] = stored[name].permute(0, 2, 3, 1)  # a view: copied, if at all, as written
    names = sorted(stored, key=lambda k: (-stored[k].element_size(), k))
    header, offset = {}, 0
    if channels_last:
        header["__metadata__"] = {CHANNELS_LAST_KEY: ",".join(channels_last)}
    for name in names:
        t = stored[name]
        if t.dtype not in _DTYPE_NAMES:
            raise TypeError(f"{name}: safetensors has no {t.dtype}")
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": _DTYPE_NAMES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as the format recommends
    f.write(struct.pack("<Q", len(raw)))
    f.write(raw)
    for name in names:
        t = stored[name].contiguous()
        f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))


def read_safetensors_header(path: Path) -> tuple[dict, int]:
    """(tensor name -> {dtype, shape, data_offsets}, where the data starts) of a safetensors
    file, checked against the file's size; ValueError saying what is wrong otherwise. The
    file's metadata, if any, is under "__metadata__"."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise ValueError("shorter than a safetensors header")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > min(size - 8, _MAX_HEADER_BYTES):
            raise ValueError(f"header length {header_len} runs past the end of the file")
        try:
            header = parse(f.read(header_len))  # depth- and digit-bounded
        except JSONInputError as e:
            raise ValueError(f"header: {e}") from None
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    metadata = header.get("__metadata__", {})
    if not isinstance(metadata, dict):
        raise ValueError("its __metadata__ is not a JSON object")
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = SAFETENSORS_DTYPES[info["dtype"]]
            shape = [int(n) for n in info["shape"]]
            begin, end = (int(n) for n in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{name}: unreadable header entry") from None
        if min(shape, default=0) < 0 or end - begin != math.prod(shape) * dtype.itemsize:
            raise ValueError(f"{name}: its offsets do not fit its shape and dtype")
        spans.append((begin, end))
    data_start = 8 + header_len
    covered = 0
    for begin, end in sorted(spans):
        if begin != covered:
            raise ValueError("the tensors do not tile the data (overlap or gap)")
        covered = end
    if data_start + covered != size:
        raise ValueError(f"the file has {size} bytes, its header describes {data_start + covered}")
    return header, data_start


def map_safetensors(path: str | os.PathLike) -> StateDict:
    """The tensors of a safetensors file, memory-mapped copy-on-write: nothing is read until
    used, and writing to a tensor never changes the file. ValueError for a malformed file."""
    path = Path(path)
    header, data_start = read_safetensors_header(path)
    metadata = header.pop("__metadata__", {})
    channels_last = set(filter(None, str(metadata.get(CHANNELS_LAST_KEY, "")).split(",")))
    size = path.stat().st_size
    try:
        storage = torch.UntypedStorage.from_file(str(path), shared=False, nbytes=size)
    except RuntimeError:  # a file system that cannot map files: read it instead
        storage = torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8).untyped_storage()
    data = torch.empty(0, dtype=torch.uint8).set_(storage)
    tensors = {}
    for name, info in header.items():
        begin, end = info["data_offsets"]
        dtype = SAFETENSORS_DTYPES[info["dtype"]]
        raw = data[data_start + begin:data_start + end]
        if (data_start + begin) % dtype.itemsize:  # only files written by other tools
            raw = raw.clone()
        tensor = raw.view(dtype).reshape(info["shape"])
        if name in channels_last and tensor.dim() == 4:  # stored as [N, H, W, C]
            tensor = tensor.permute(0, 3, 1, 2)
        tensors[name] = tensor
    return tensors
