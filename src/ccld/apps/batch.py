"""Prompt files: `ccld generate --prompts-file FILE`, many image sets in one run.

A prompt file holds one row (one image set) a line, either a `PROMPT[:WEIGHT]` text line or a
JSON object of `iter_images` keyword arguments (`{"prompts": ["a tree:2"], "seed": 7, "n": 4}`);
blank lines and `#` comments are skipped. The command's options are every row's defaults, and a
row's seed is its own `seed`, else `--seed` plus the row's position (0, 1, 2, ...).

Every image written is a line of OUT/manifest.jsonl, keyed by (row, the hash of everything that
shapes the row's pictures, image index). A rerun paints only the images not in the manifest, so
a run killed at any point resumes where it stopped and a finished one paints nothing; images
are never overwritten (new files take the next free number). A line is appended in one write and
fsynced; a torn last line (a crash mid-write) is skipped when read, and the next append starts a
new line after it.

Under `accelerate launch` or `torchrun` (WORLD_SIZE > 1) the pending images are split between the
processes without overlap, each on its own device; each process writes its own images and its
manifest lines into a part file of its own, which the first process merges into manifest.jsonl
when all are done (a part left by a killed run is read as done, and merged by the next run).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import CCLDError, python_words
from ..io.jsontext import JSONInputError, parse
from ..settings import ALIASES, Settings, options_from_dict

MANIFEST = "manifest.jsonl"
PART_GLOB = "manifest.rank*.jsonl"  # one process's lines, until the first process merges them
NOT_ROW_KEYS = ("batch_size", "precision", "channels_last", "index", "picture")  # the run's
MODEL_FILES = ("model", "unet", "autoencoder", "autoencoder_config", "cloob", "cloob_config")


@dataclass(frozen=True)
class Row:
    """One image set of a prompt file."""
    number: int  # its position among the rows, from 0
    line: int  # its line in the file, from 1
    name: str  # "FILE line N", as errors name it
    settings: Settings  # the command's options and the row's own
    stochastic: bool  # its sampler draws step noise: its pictures depend on its batches
    key: str  # the hash of what shapes its pictures (its number of images left out)

    @property
    def num_images(self) -> int:
        return self.settings.num_images

    def pending(self, done: set[tuple]) -> list[int]:
        """The indices of its images that `done` does not hold."""
        return [i for i in range(self.num_images) if (self.number, self.key, i) not in done]


def read_prompts_file(path: Path, defaults: dict, run: dict) -> list[Row]:
    """The rows of a prompt file, each with the command's settings `defaults` (by name) filled
    in, all checked before anything is painted; `run`: the options that shape every picture,
    hashed into each row's key. A row's seed is its own, else the command's plus its position."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise CCLDError(f"--prompts-file {path}: cannot read it ({getattr(e, 'strerror', None) or e}); "
                        "give a UTF-8 text file of prompts, one a line") from None
    base_seed = defaults.get("seed", 0)
    rows = []
    for line_number, line in enumerate(lines, 1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        name = f"{path} line {line_number}"
        try:
            values = parse_json_row(text) if text.startswith("{") else {"prompts": [text]}
            options = {**defaults, "seed": base_seed + len(rows), **values}
            settings = Settings.build(**options)
        except CCLDError as e:
            raise CCLDError(f"{name}: {e.worded(row_words)}") from None
        stochastic = is_stochastic(settings)
        rows.append(Row(len(rows), line_number, name, settings, stochastic,
                        row_key(settings, run, stochastic)))
    if not rows:
        raise CCLDError(f"--prompts-file {path}: no prompts in it; write one PROMPT[:WEIGHT] or "
                        "JSON object a line")
    return rows


def row_words(name: str, giving: bool, what: str = "") -> str:
    """A setting named as a row names it: by its key (`n` for num_images)."""
    return python_words({v: k for k, v in ALIASES.items()}.get(name, name), giving, what)


def parse_json_row(text: str) -> dict:
    """A JSON row's settings, by name (`options_from_dict`)."""
    try:
        values = parse(text, object_pairs_hook=_refuse_repeated_keys)
    except JSONInputError as e:
        raise CCLDError(f"{e}; write a JSON object per line, e.g. "
                        '{"prompts": ["a castle"], "seed": 3}') from None
    return options_from_dict(values, not_allowed=NOT_ROW_KEYS, who="a row may set")


def _refuse_repeated_keys(pairs: list) -> dict:
    keys = [key for key, _ in pairs]
    repeated = next((key for key in keys if keys.count(key) > 1), None)
    if repeated is not None:
        raise CCLDError(f"the key {repeated!r} is given twice; give it once")
    return dict(pairs)

def row_key(settings: Settings, run: dict, stochastic: bool) -> str:
    """The hash of what shapes a row's pictures: its settings and the run's models, precision
    and (for a stochastic sampler, whose pictures depend on it) batch size. The number of
    images is left out: asking for more paints only the new ones."""
    shaping = {k: v for k, v in settings.to_dict().items() if k != "num_images"}
    if not stochastic:
        run = {k: v for k, v in run.items() if k != "batch_size"}
    text = json.dumps({"row": shaping, "run": run}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def run_settings(args, device: str, batch_size: int | None) -> dict:
    """The run's options that shape every picture: its models (paths made absolute), decoder,
    and its precision and batch size as they resolve on `device` (`auto` paints fp16 on a GPU
    and bf16 or fp32 on a CPU: a run resumed on other hardware must not mix them)."""
    import torch

    from ..pipeline import resolve_precision

    settings = {}
    for option in (*MODEL_FILES, "decoder"):
        value = getattr(args, option, None)
        if option in MODEL_FILES and value is not None and Path(value).exists():
            value = os.path.abspath(value)  # the same file, however the command spells it
        settings[option] = value
    device = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                          "cpu" if device == "auto" else device)
    settings["precision"] = resolve_precision(args.precision or "auto", device)
    settings["batch_size"] = batch_size or (16 if device.type == "cuda" else 4)
    return settings


def is_stochastic(settings: Settings) -> bool:
    """Whether the row's sampler draws step noise (its pictures then depend on its batches)."""
    from .. import sampling
    from ..settings import DEFAULT_METHOD

    return bool(sampling.get_sampler(settings.method or DEFAULT_METHOD).eta(settings.eta))


# The manifest


def append_line(path: Path, entry: dict) -> None:
    """Appends `entry` as one JSON line in a single write, fsynced; after a torn last line (a
    crash mid-write) it starts a new line."""
    data = (json.dumps(entry) + "\n").encode()
    require_regular_file(path)
    try:
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0),
                     0o666)
        try:
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                data = b"\n" + data
            while data:
                data = data[os.write(fd, data):]
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as e:  # a torn line this leaves is skipped when read
        raise CCLDError(f"{path}: could not record {entry.get('file', 'an image')} in the "
                        f"manifest ({e.strerror or e}); free disk space and run the same "
                        "command again: it resumes where this run stopped") from None


def require_regular_file(path: Path) -> None:
    """Nothing but a regular file (or nothing) at a manifest's name: a symlink there would have
    the run read or append outside --out."""
    import stat

    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    except OSError as e:
        raise CCLDError(f"{path}: cannot look at the manifest ({e.strerror}); check the "
                        "folder's permissions") from None
    if not stat.S_ISREG(mode):
        kind = "a symlink" if stat.S_ISLNK(mode) else "not a regular file"
        raise CCLDError(f"{path}: {kind}; the manifest is a regular file inside --out, so "
                        "remove it (or pass another --out)")


def read_lines(path: Path) -> list[dict]:
    """The manifest entries of one file; lines that are not whole entries (a torn last line,
    a line edited by hand) are skipped, those other than a torn last line with a note."""
    require_regular_file(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return []
    except OSError as e:
        raise CCLDError(f"{path}: cannot read the manifest ({e.strerror}); check its permissions") from None
    entries, skipped = [], 0
    lines = raw.splitlines()
    for number, line in enumerate(lines, 1):
        try:
            entry = parse(line)
        except JSONInputError:
            entry = None
        if _is_entry(entry):
            entries.append(entry)
        elif line.strip() and not (number == len(lines) and not raw.endswith(b"\n")):
            skipped += 1  # (a torn last line, a crash mid-write, is expected: not noted)
    if skipped:
        print(f"ccld: note: {path}: skipped {skipped} line(s) that are not entries ccld "
              "writes; their images, if any, are painted again", file=sys.stderr)
    return entries


def _is_entry(entry) -> bool:
    """Whether a manifest line's value is an entry as `paint` writes them."""
    def whole(value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0

    return (isinstance(entry, dict) and whole(entry.get("row")) and whole(entry.get("index"))
            and isinstance(entry.get("key"), str) and len(entry["key"]) <= 64)


def entry_key(entry: dict) -> tuple:
    return entry["row"], entry["key"], entry["index"]


def done_images(out: Path) -> set[tuple]:
    """(row, key, index) of every image the manifest and any unmerged part record."""
    files = [out / MANIFEST, *sorted(out.glob(PART_GLOB))]
    return {entry_key(entry) for path in files for entry in read_lines(path)}


def merge_parts(out: Path) -> None:
    """Appends the parts' entries that manifest.jsonl lacks to it, then removes the parts."""
    parts = sorted(out.glob(PART_GLOB))
    if not parts:
        return
    recorded = {entry_key(entry) for entry in read_lines(out / MANIFEST)}
    for part in parts:
        for entry in read_lines(part):
            if entry_key(entry) not in recorded:
                append_line(out / MANIFEST, entry)
                recorded.add(entry_key(entry))
        part.unlink()


# Processes


@dataclass(frozen=True)
class Processes:
    """This process's place among those a launcher started (WORLD_SIZE, RANK, LOCAL_RANK)."""
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @classmethod
    def from_environment(cls, environ=os.environ) -> Processes:
        try:
            return cls(int(environ.get("RANK", 0)), int(environ.get("WORLD_SIZE", 1)),
                       int(environ.get("LOCAL_RANK", 0)))
        except ValueError:
            raise CCLDError("RANK, WORLD_SIZE and LOCAL_RANK must be whole numbers; start the "
                            "processes with accelerate launch or torchrun") from None

    def start(self) -> None:
        """Joins the other processes (gloo: only barriers pass between them). A single process
        imports no torch.distributed."""
        if self.world > 1:
            import torch.distributed as dist

            try:
                dist.init_process_group("gloo")
            except (ValueError, RuntimeError) as e:
                raise CCLDError(f"could not join the other {self.world - 1} processes "
                                f"({str(e).splitlines()[0][:120]}); start them with "
                                "accelerate launch or torchrun") from None

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def stop(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.destroy_process_group()

    def device(self, requested: str) -> str:
        """With several processes, `--device auto` (where there are GPUs) and `cuda` are this
        process's own GPU, cuda:LOCAL_RANK."""
        if self.world == 1 or requested not in ("auto", "cuda"):
            return requested
        import torch

        if requested == "auto" and not torch.cuda.is_available():
            return "cpu"
        count = torch.cuda.device_count()
        if self.local_rank >= count:  # before loading: the launcher would kill the others
            raise CCLDError(f"process {self.rank} has LOCAL_RANK {self.local_rank}, but this machine "
                            f"has {count} CUDA device(s); start at most {count} process(es) per "
                            "machine (accelerate launch --num_processes, torchrun "
                            "--nproc-per-node)")
        torch.cuda.set_device(self.local_rank)  # its own GPU for everything left unplaced
        return f"cuda:{self.local_rank}"

    def manifest(self, out: Path) -> Path:
        """Where this process appends its lines: manifest.jsonl, or with several its own part."""
        return out / (MANIFEST if self.world == 1 else f"manifest.rank{self.rank}.jsonl")


def shard(rows: list[Row], done: set[tuple], processes: Processes) -> list[tuple[Row, list[int]]]:
    """This process's share of the images not yet done, as (row, image indices). A
    deterministic row's images are shared out one by one; a stochastic row's stay together,
    as its pictures depend on how its images are batched."""
    units = []
    for row in rows:
        pending = row.pending(done)
        if row.stochastic:
            units += [(row, pending)] if pending else []
        else:
            units += [(row, [i]) for i in pending]
    mine: dict[int, tuple[Row, list[int]]] = {}
    for row, indices in units[processes.rank::processes.world]:
        mine.setdefault(row.number, (row, []))[1].extend(indices)
    return list(mine.values())


def generate_from_file(args, out: Path, options: dict) -> int:
    """`ccld generate --prompts-file`: paints the rows' images not yet in the manifest; the
    command's settings `options` are every row's defaults."""
    from ..training.commands import check_all_processes_started

    processes = Processes.from_environment()
    check_all_processes_started(processes.world)
    path = Path(args.prompts_file)
    defaults = {k: v for k, v in options.items() if k not in ("batch_size", "precision")}
    device = processes.device(args.device)
    rows = read_prompts_file(path, defaults, run_settings(args, device, options.get("batch_size")))
    processes.start()
    try:
        done = done_images(out)
        processes.barrier()  # everyone has read the manifest before anyone adds to it
        mine = shard(rows, done, processes)
        if mine:
            paint(args, out, mine, processes, device, options)
        processes.barrier()
        if processes.rank == 0:
            merge_parts(out)
            if not any(row.pending(done) for row in rows):
                print(f"ccld: nothing to paint: the {sum(row.num_images for row in rows)} images "
                      f"of {path} are all in {out / MANIFEST}", file=sys.stderr)
    finally:
        processes.stop()
    return 0


def paint(args, out: Path, mine: list[tuple[Row, list[int]]], processes: Processes,
          device: str, options: dict) -> None:
    """Paints this process's share, writing each image, then its manifest line, as it is done."""
    from ..io.images import next_index, save_numbered
    from .options import load_pipeline

    args.device = device
    pipe = load_pipeline(args, options.get("precision"))
    images = pipe.iter_many([row.settings for row, _ in mine],
                            wanted=[indices for _, indices in mine],
                            names=[row.name for row, _ in mine],
                            batch_size=options.get("batch_size"), progress=not args.quiet)
    manifest = processes.manifest(out)
    number = None
    for position, image in images:
        if number is None:  # made with the first picture: a run that paints none leaves none
            try:
                out.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise CCLDError(f"--out {out}: cannot create the folder ({e.strerror}); pass "
                                "another folder") from None
            number = next_index(out)
        row = mine[position][0]
        path, number = save_numbered(image, out, number)
        parameters = json.loads(image.info["parameters"])
        try:
            append_line(manifest, {"file": path.name, "row": row.number, "key": row.key,
                                   "index": parameters["index"], "line": row.line,
                                   "rank": processes.rank,
                                   "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                   "parameters": parameters})
        except BaseException:
            path.unlink(missing_ok=True)  # no picture the manifest does not record
            raise
        print(path)
        number += 1
