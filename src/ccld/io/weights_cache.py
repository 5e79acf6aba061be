"""The converted-weights cache: release files converted once, memory-mapped afterwards.

The released checkpoints are slow to read (the CLOOB Haiku pickle, torch `.ckpt` files, a
Lightning checkpoint's optimizer state) and need converting on every load. `load_converted` does
that once per file and keeps the converted state dict as a safetensors file under
`converted_dir()`; later loads memory-map it, so its pages come from the page cache on demand and
never occupy anonymous memory (nor are they read at all for parts of a model that go unused).

What a converter hands over is stored as it is; the weights the nets take come checked
(`ccld.io.checkpoints.checked_weights`: float32, finite), and their entry records that, so an
entry mapped later (its bytes verified, see below) is not read through to check it again.

An entry is a folder `converted/<kind>-<key>/` holding `weights.safetensors` and `entry.json`.
The key is a hash of the kind, `CONVERTER_VERSION`, each source file's size, mtime and a hash of
its first and last MiB, and the given config texts, so a changed file or config never meets a
stale entry. The JSON records the weights file's size and a hash of all of it (xxh3-128),
checked at every load; an entry that does not match (a half-written, truncated, overwritten or
damaged one) is thrown away and rebuilt, never trusted. Writers build an entry under a unique
temporary name and publish it with one rename, so concurrent processes never see a partial one.
A first run writes a new entry's weights at once and goes on with them memory-mapped from there;
a background thread waits for the disk and publishes the entry while the run paints.

Where: `CCLD_CACHE_DIR`, by default a `ccld` folder beside the Hugging Face hub cache (where the
CLOOB pickle is downloaded too). `CCLD_CACHE_DIR=off` turns the converted cache off (downloads
still go to the default folder). A cache folder that cannot be written costs speed, never a load:
the converted weights are then used from memory, with one warning line on stderr.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from .._version import __version__
from .checkpoints import CheckedWeights
from .files import TEMP_SUFFIX, fsync_folder, temporary_name
from .tensor_files import map_safetensors, read_safetensors_header, write_safetensors  # noqa: F401

# bump when any converter's output changes: every entry is then rebuilt (4: weights of any
# floating dtype stored as float32, checked finite)
CONVERTER_VERSION = 4

ENV_VAR = "CCLD_CACHE_DIR"
OFF = "off"
WEIGHTS_FILE = "weights.safetensors"
ENTRY_FILE = "entry.json"
ENTRY_FORMAT = 2  # the layout of entry.json (2: the weights' whole-file hash)
HEAD_TAIL_BYTES = 1 << 20  # how much of each end of a file its fingerprint hashes
ABANDONED_AFTER_S = 6 * 3600  # a temporary this old belongs to a killed process

StateDict = dict[str, torch.Tensor]


# Where


def cache_root() -> Path:
    """`CCLD_CACHE_DIR`, or the `ccld` folder beside the Hugging Face hub cache (also where
    `CCLD_CACHE_DIR=off` leaves downloads)."""
    value = os.environ.get(ENV_VAR, "").strip()
    if value and value.lower() != OFF:
        return Path(value).expanduser()
    from huggingface_hub.constants import HF_HUB_CACHE

    return Path(HF_HUB_CACHE).parent / "ccld"


def converted_dir() -> Path | None:
    """The folder of converted copies, or None when `CCLD_CACHE_DIR=off`."""
    if os.environ.get(ENV_VAR, "").strip().lower() == OFF:
        return None
    return cache_root() / "converted"


# Safetensors files, written and memory-mapped without a copy in memory


# Entries


def _head_tail_sha256(path: Path, size: int) -> str:
    """A hash of a file's size and first and last MiB: cheap, and changed by any truncation,
    append or rewrite of the ends (the size and mtime catch the rest)."""
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(HEAD_TAIL_BYTES))
        if size > HEAD_TAIL_BYTES:
            f.seek(max(HEAD_TAIL_BYTES, size - HEAD_TAIL_BYTES))
            h.update(f.read(HEAD_TAIL_BYTES))
    return h.hexdigest()


def _content_hash(path: Path) -> str:
    """xxh3-128 of a whole file: what an entry's weights are checked against at every load, so
    that damage anywhere in them (not only at their ends) gets the entry rebuilt. It reads the
    file at memory speed (about 0.07 s for a painting's 760 MB of entries, see
    benchmarks/notes/cache.md), through a mapping, so a file in the page cache is not copied."""
    import mmap

    import xxhash

    digest = xxhash.xxh3_128()
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size:
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
                digest.update(mapped)
    return digest.hexdigest()


def _fingerprint(path: Path) -> dict:
    st = path.stat()
    return {"path": os.path.abspath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
            "head_tail_sha256": _head_tail_sha256(path, st.st_size)}


def _key(kind: str, fingerprints: list[dict], configs: Sequence[str | bytes]) -> str:
    # the path is left out: a file that moves (same size, mtime and bytes) keeps its entry
    described = {
        "kind": kind, "converter_version": CONVERTER_VERSION,
        "sources": [{k: v for k, v in fp.items() if k != "path"} for fp in fingerprints],
        "configs": [hashlib.sha256(c.encode() if isinstance(c, str) else bytes(c)).hexdigest()
                    for c in configs],
    }
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:32]


def _read_entry_json(folder: Path) -> dict | None:
    try:
        entry = json.loads((folder / ENTRY_FILE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return entry if isinstance(entry, dict) else None


def _open_entry(folder: Path, key: str) -> tuple[StateDict, dict] | None:
    """The entry's (memory-mapped state dict, metadata), or None if it is missing or does not
    check out (then it must be rebuilt)."""
    entry = _read_entry_json(folder)
    weights = folder / WEIGHTS_FILE
    try:
        if (entry is None or entry.get("format") != ENTRY_FORMAT or entry.get("key") != key
                or not isinstance(entry.get("weights"), dict)):
            return None
        if (weights.stat().st_size != entry["weights"].get("size")
                or _content_hash(weights) != entry["weights"].get("xxh3_128")):
            return None
        return _marked(map_safetensors(weights), entry.get("checked_weights") is True), \
            entry.get("metadata", {})
    except (OSError, ValueError):
        return None


def _marked(state: StateDict, checked: bool) -> StateDict:
    """`state` marked as `checked_weights` made it, where it did (see the module docstring)."""
    return CheckedWeights(state) if checked else state


def _discard(folder: Path) -> None:
    """Removes an entry (or a temporary) so that no reader can open it half-deleted: it is
    renamed away first. Failures are left for the next writer or `ccld cache clear`."""
    doomed = temporary_name(folder)
    try:
        os.rename(folder, doomed)
    except OSError:
        return
    shutil.rmtree(doomed, ignore_errors=True)


def _write_weights(converted: Path, name: str, state: StateDict,
                   channels_last: Sequence[str]) -> Path:
    """Writes the weights of a new entry into a new private temporary folder (returned), with no
    syncing: the bytes reach the page cache, which is all this run's mapping of them needs.
    Renaming that folder later is what publishes the entry (`_publish`)."""
    converted.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(converted / name)
    try:
        tmp.mkdir()
        with open(tmp / WEIGHTS_FILE, "wb") as f:
            write_safetensors(f, state, channels_last)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tmp


def _publish(converted: Path, name: str, tmp: Path, entry: dict) -> None:
    """Makes the written weights in `tmp` durable, adds entry.json, and publishes the entry as
    converted/name in one rename; OSError if that fails (the temporary is then removed)."""
    try:
        weights = tmp / WEIGHTS_FILE
        with open(weights, "rb+") as f:
            os.fsync(f.fileno())  # before the rename: a published entry is never half on disk
        size = weights.stat().st_size
        entry = {**entry, "weights": {"file": WEIGHTS_FILE, "size": size,
                                      "xxh3_128": _content_hash(weights)}}
        with open(tmp / ENTRY_FILE, "w") as f:
            json.dump(entry, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        _remove_outdated(converted, entry)
        os.rename(tmp, converted / name)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if _read_entry_json(converted / name) is None:
            raise
        # else another process published the same entry first: theirs serves as well
    fsync_folder(converted)


def _remove_outdated(converted: Path, new: dict) -> None:
    """Deletes entries that can never be used again: those of the same kind made from the same
    source paths when the files there were different (since changed), those an older converter
    made from the same paths (whatever their kind: kinds come and go with converters), and
    temporaries that killed processes left long ago."""
    now = time.time()
    paths = [s["path"] for s in new["sources"]]
    for folder in converted.iterdir():
        if folder.name.endswith(TEMP_SUFFIX):
            try:
                if now - folder.stat().st_mtime > ABANDONED_AFTER_S:
                    shutil.rmtree(folder, ignore_errors=True)
            except OSError:
                pass
            continue
        old = _read_entry_json(folder)
        if not (old and isinstance(old.get("sources"), list)):
            continue
        same_paths = [s.get("path") for s in old["sources"] if isinstance(s, dict)] == paths
        if same_paths and (old.get("converter_version") != CONVERTER_VERSION
                           or (old.get("kind") == new["kind"]
                               and old["sources"] != new["sources"])):
            _discard(folder)


_warned_unwritable = False


def _warn_unwritable(converted: Path, error: OSError) -> None:
    global _warned_unwritable
    if not _warned_unwritable:
        _warned_unwritable = True
        print(f"ccld: warning: cannot write the converted-weights cache in {converted} "
              f"({error.strerror or error}); converting on every load instead (set {ENV_VAR} to "
              f"a writable folder, or to {OFF})", file=sys.stderr)


# Whether a new entry is made durable and published by a background thread while the caller goes
# on (the default; see `load_converted`).
BACKGROUND_WRITES = True
_writers: dict[Path, threading.Thread] = {}  # entry folder -> the thread publishing it
_writers_lock = threading.Lock()


def load_converted(kind: str, sources: Sequence[Path], configs: Sequence[str | bytes],
                   convert: Callable[[], tuple[StateDict, dict]],
                   channels_last: Callable[[str, torch.Tensor], bool] | None = None,
                   maps_sources: bool = False) -> tuple[StateDict, dict]:
    """(state dict, JSON-able metadata): from the cache (memory-mapped) when an entry for exactly
    these sources and configs exists, else convert() and store the result.

    `kind` names the converter ("unet", "cloob", ...); `configs` are the texts of every config
    the conversion depends on. Errors from `convert` (the user's CCLDErrors) pass through, and
    nothing is stored for them.

    A new entry's weights are written at once, straight from the converted tensors, and what
    comes back is already the memory-mapped written copy: the converted tensors are freed, and
    a first run holds its weights as a second run does. Waiting for the disk (fsync) and
    publishing the entry (entry.json, one rename) happen in a background thread
    (`BACKGROUND_WRITES`), which needs no CPU to speak of, so the caller's computing goes on at
    full speed: `finish_writes` waits for it, as does the interpreter before it exits, and so
    does a later load of the same entry. (Copying a GB is CPU work: done in a thread it would
    compete with the painting for the cores, which costs more on a small machine than it
    saves.)

    `channels_last(name, tensor)` picks the 4-d tensors to store in channels-last order: loads
    map them as channels-last views, which a net running channels-last uses without a copy
    (with the cache off, they keep the converter's layout). `maps_sources`: the converter
    returns views of memory-mapped source files; should the cache be unwritable, they are then
    copied out, since one view left would keep a whole release file resident.
    """
    where = _entry_place(kind, sources, configs)
    if where is None:
        state, metadata = convert()
        return state, json.loads(json.dumps(metadata))
    converted, name, key, fingerprints = where
    found = _open_entry(converted / name, key)
    if found is not None:
        return found
    if (converted / name).exists():
        _discard(converted / name)  # damaged: rebuilt below
    state, metadata = convert()
    metadata = json.loads(json.dumps(metadata))  # what a cached load returns, tuples as lists
    checked = isinstance(state, CheckedWeights)
    entry = {"format": ENTRY_FORMAT, "kind": kind, "key": key,
             "converter_version": CONVERTER_VERSION, "ccld_version": __version__,
             "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "sources": fingerprints,
             "metadata": metadata, "checked_weights": checked}
    layout = [k for k, v in state.items() if channels_last and v.dim() == 4 and channels_last(k, v)]
    tmp = None
    try:
        tmp = _write_weights(converted, name, state, layout)
        written = map_safetensors(tmp / WEIGHTS_FILE)
    except (OSError, ValueError) as e:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            _warn_unwritable(converted, e)
        # used from memory, laid out as a stored copy would be
        copy = torch.Tensor.clone if maps_sources else torch.Tensor.contiguous
        return _marked({k: copy(v, memory_format=torch.channels_last) if k in layout
                        else v.clone() if maps_sources else v for k, v in state.items()},
                       checked), metadata
    del state
    _return_freed_memory()
    written = _marked(written, checked)
    if not BACKGROUND_WRITES:
        _publish_or_warn(converted, name, tmp, entry)
        return written, metadata
    publisher = threading.Thread(target=_publish_or_warn, args=(converted, name, tmp, entry),
                                 name=f"ccld cache publisher {name}")  # exit waits for it
    with _writers_lock:
        _writers[converted / name] = publisher
    publisher.start()
    return written, metadata


def open_converted(kind: str, sources: Sequence[Path],
                   configs: Sequence[str | bytes]) -> tuple[StateDict, dict] | None:
    """What `load_converted` would map from the cache, or None where there is no sound entry
    (or no cache): for a caller that converts lazily, part by part."""
    where = _entry_place(kind, sources, configs)
    if where is None:
        return None
    converted, name, key, _ = where
    return _open_entry(converted / name, key)


def _entry_place(kind: str, sources: Sequence[Path], configs: Sequence[str | bytes]):
    """(converted folder, entry name, key, source fingerprints) once any entry being published
    there is published; None with the cache off or a source unreadable (the converter then
    says so in the user's terms)."""
    if not kind.isidentifier() or not kind.islower():
        raise ValueError(f"cache kind {kind!r}: use a lower-case identifier")
    converted = converted_dir()
    if converted is None:
        return None
    try:
        fingerprints = [_fingerprint(Path(p).expanduser()) for p in sources]
    except OSError:
        return None
    key = _key(kind, fingerprints, configs)
    name = f"{kind}-{key}"
    _wait_for_writer(converted / name)
    return converted, name, key, fingerprints


def _publish_or_warn(converted: Path, name: str, tmp: Path, entry: dict) -> None:
    """`_publish`, one warning line if it fails: the caller has its weights either way (mapped
    from the temporary, which stays readable while mapped), so a cache that fails costs speed
    only."""
    try:
        _publish(converted, name, tmp, entry)
    except OSError as e:
        _warn_unwritable(converted, e)
    except Exception as e:
        print(f"ccld: warning: could not write the converted-weights cache ({type(e).__name__}: "
              f"{str(e)[:160]}); converting on every load instead", file=sys.stderr)


def _wait_for_writer(folder: Path) -> None:
    with _writers_lock:
        writer = _writers.get(folder)
    if writer is not None:
        writer.join()
        with _writers_lock:
            if _writers.get(folder) is writer:
                del _writers[folder]


def finish_writes() -> None:
    """Waits until every entry this process started writing is published (or given up)."""
    with _writers_lock:
        folders = list(_writers)
    for folder in folders:
        _wait_for_writer(folder)


def _return_freed_memory() -> None:
    """Hands freed heap memory back to the system. glibc keeps what a conversion freed (hundreds
    of MB of arrays) for reuse, so the process would go on holding it beside the weights it
    maps, which is what a peak is made of."""
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            ctypes.CDLL(None).malloc_trim(0)
        except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
            pass


# Inspecting and clearing (`ccld cache info`, `ccld cache clear`)


@dataclass
class CacheEntry:
    folder: Path
    kind: str  # "unet", "cloob", ...; "unfinished" for a temporary, "damaged" without entry.json
    sources: list[str]
    size: int  # bytes on disk
    created: str


def _folder_size(folder: Path) -> int:
    total = 0
    for p in folder.rglob("*"):
        try:
            total += p.stat().st_size if p.is_file() else 0
        except OSError:
            pass
    return total


def cache_entries() -> list[CacheEntry]:
    """Every entry (and leftover temporary) in the converted folder, oldest first."""
    converted = converted_dir()
    if converted is None or not converted.is_dir():
        return []
    entries = []
    for folder in sorted(converted.iterdir()):
        if not folder.is_dir():
            continue
        entry = _read_entry_json(folder) or {}
        kind = ("unfinished" if folder.name.endswith(TEMP_SUFFIX)
                else entry.get("kind", "damaged"))
        sources = [str(s.get("path")) for s in entry.get("sources", []) if isinstance(s, dict)]
        entries.append(CacheEntry(folder, str(kind), sources, _folder_size(folder),
                                  str(entry.get("created", ""))))
    return sorted(entries, key=lambda e: e.created)


def clear_converted() -> tuple[int, int]:
    """Empties the converted folder (never the downloads beside it): (entries removed, bytes)."""
    converted = converted_dir()
    if converted is None or not converted.is_dir():
        return 0, 0
    removed = freed = 0
    for path in list(converted.iterdir()):
        if path.is_symlink():  # the link goes; what it points to is not the cache's to delete
            path.unlink(missing_ok=True)
            removed += not os.path.lexists(path)
            continue
        size = _folder_size(path) if path.is_dir() else path.stat().st_size
        if path.is_dir():
            _discard(path)
        else:
            path.unlink(missing_ok=True)
        if not path.exists():
            removed += 1
            freed += size
    return removed, freed
