"""One pass of the frozen encoders over a dataset (`ccld encode-dataset`), and the latent scale.

The cache stores each image's posterior moments, not a sample: training draws a fresh sample of
the posterior every time it sees the image, exactly as encoding on the fly would, without running
the autoencoder and CLOOB again. Shards cover fixed ranges of the source's items and appear only
once complete (atomic rename), so an interrupted run resumes at the first missing shard; with
several processes each encodes every world-size-th shard.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from ..errors import CCLDError, give
from ..io.files import atomic_write, remove_stale_temporaries
from .checkpointing import save_safetensors
from .data import (
    CACHE_FORMAT,
    CACHE_INDEX,
    CACHE_VERSION,
    EncodeItems,
    ImageSource,
    ShardedStream,
    TrainingData,
    check_image_size,
    collate_encode_items,
    encode_pixels,
    num_shards,
    read_cache_index,
    sample_posterior,
    shard_name,
)
from .engine import derive_seed

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# what must match for an existing cache folder to be continued rather than refused
IDENTITY_KEYS = ("source", "num_items", "shard_size", "image_size", "dtype", "autoencoder", "cloob")


def shard_metadata(folder: Path, k: int) -> dict | None:
    """The metadata of finished shard k, or None if it is not there (or unreadable)."""
    from safetensors import SafetensorError, safe_open

    path = folder / shard_name(k)
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        return {"file": path.name, "first": int(meta["first"]), "stop": int(meta["stop"]),
                "count": int(meta["count"]), "skipped": json.loads(meta["skipped"])}
    except (SafetensorError, OSError, KeyError, ValueError):
        return None


def write_index(folder: Path, identity: dict, total_shards: int, extra: dict) -> dict:
    shards = [m for m in (shard_metadata(folder, k) for k in range(total_shards)) if m]
    skipped = [{"item": i, "reason": reason} for m in shards for i, reason in m["skipped"]]
    index = {"format": CACHE_FORMAT, "version": CACHE_VERSION, **identity, **extra,
             "num_shards": total_shards, "complete": len(shards) == total_shards,
             "num_encoded": sum(m["count"] for m in shards), "num_skipped": len(skipped),
             "shards": [{k: m[k] for k in ("file", "first", "stop", "count")} for m in shards],
             "skipped": skipped}
    atomic_write(folder / CACHE_INDEX, lambda f: f.write(json.dumps(index, indent=1).encode()),
                 "latent cache index")
    return index


@dataclass(frozen=True)
class Encoding:
    """How `encode_dataset` encodes: the images' size in pixels, images per encoder batch, images
    per shard, the stored moments' dtype (a name of DTYPES) and the loader's worker processes."""
    image_size: int = 256
    batch_size: int = 32
    shard_size: int = 2048
    dtype: str = "float32"
    num_workers: int = 4

    def __post_init__(self):
        check_image_size(self.image_size)
        for name, value in (("batch_size", self.batch_size), ("shard_size", self.shard_size)):
            if value < 1:
                raise CCLDError(f"{give(name)} must be at least 1 (got {value})")
        if self.dtype not in DTYPES:
            raise CCLDError(f"{give('dtype')} must be one of {', '.join(DTYPES)}")


@torch.no_grad()
def encode_dataset(source: ImageSource, out: Path, encoders: tuple, accelerator,
                   encoding: Encoding = Encoding(), *, models: dict | None = None,
                   progress: bool = True) -> dict:
    """Encodes `source` into shards in `out` with `encoders` (the autoencoder and CLOOB);
    returns the index. Safe to run again to resume."""
    from tqdm.auto import tqdm

    acc = accelerator
    out = Path(out)
    autoencoder, cloob = encoders
    image_size, batch_size, shard_size = encoding.image_size, encoding.batch_size, encoding.shard_size
    dtype, num_workers = encoding.dtype, encoding.num_workers
    identity = {"source": source.description, "num_items": len(source), "shard_size": shard_size,
                "image_size": image_size, "dtype": dtype, **(models or {})}
    identity.setdefault("autoencoder", None)
    identity.setdefault("cloob", None)
    if (out / CACHE_INDEX).is_file():
        old = read_cache_index(out)
        differ = [k for k in IDENTITY_KEYS if old.get(k) != identity.get(k)]
        if differ:
            raise CCLDError(f"{out}: holds an encoding with a different {differ[0]} "
                            f"({old.get(differ[0])!r}, now {identity.get(differ[0])!r}); use "
                            "another --out, or the same data, models and options to resume it")
    elif out.exists() and any(out.iterdir()):
        raise CCLDError(f"{out}: the folder exists and is not a latent cache; choose an empty "
                        "or new --out folder")
    total = num_shards(len(source), shard_size)
    latent_size = image_size // 8
    extra = {"latent_shape": [4, latent_size, latent_size],
             "embed_dim": int(cloob.config["d_embed"]),
             "cloob_image_size": int(cloob.config["image_encoder"]["image_size"])}
    acc.wait_for_everyone()  # every process has looked at the folder before anything is written
    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(out)
        write_index(out, identity, total, extra)
    acc.wait_for_everyone()

    todo = [k for k in range(total) if k % acc.num_processes == acc.process_index
            and shard_metadata(out, k) is None]
    device = acc.device
    autoencoder.to(device)
    cloob.to(device)
    bar = tqdm(total=sum(min(shard_size, len(source) - k * shard_size) for k in todo),
               desc="encoding", unit="img", disable=not (progress and acc.is_main_process))
    for k in todo:
        start, stop = k * shard_size, min((k + 1) * shard_size, len(source))
        loader = DataLoader(EncodeItems(source, image_size, start, stop), batch_size,
                            num_workers=num_workers, collate_fn=collate_encode_items)
        parts = {"mean": [], "logvar": [], "embed": [], "index": []}
        failed = []
        for batch in loader:
            failed += batch["failed"]
            for i, reason in batch["failed"]:
                logger.warning(f"skipping an unreadable image: {reason}")
            if len(batch["index"]):
                mean, logvar, embed = encode_pixels(autoencoder, cloob, batch["pixels"].to(device))
                parts["mean"].append(mean.to("cpu", DTYPES[dtype]))
                parts["logvar"].append(logvar.to("cpu", DTYPES[dtype]))
                parts["embed"].append(embed.cpu())
                parts["index"].append(batch["index"])
            bar.update(len(batch["index"]) + len(batch["failed"]))
        if not parts["index"]:  # a shard of unreadable images still records that it is done
            parts = {"mean": [torch.zeros([0, 4, latent_size, latent_size], dtype=DTYPES[dtype])],
                     "logvar": [torch.zeros([0, 4, latent_size, latent_size], dtype=DTYPES[dtype])],
                     "embed": [torch.zeros([0, extra["embed_dim"]])],
                     "index": [torch.zeros([0], dtype=torch.long)]}
        tensors = {name: torch.cat(chunks) for name, chunks in parts.items()}
        save_safetensors(tensors, out / shard_name(k), {
            "first": str(start), "stop": str(stop), "count": str(len(tensors["index"])),
            "skipped": json.dumps(failed)})
        if acc.is_main_process:
            write_index(out, identity, total, extra)
    bar.close()
    acc.wait_for_everyone()
    index = write_index(out, identity, total, extra) if acc.is_main_process else None
    acc.wait_for_everyone()
    return index if index is not None else read_cache_index(out)


@torch.no_grad()
def estimate_autoencoder_scale(data: TrainingData, accelerator, autoencoder=None,
                               batches: int = 32, batch_size: int = 64, seed: int = 0,
                               num_workers: int = 0) -> float:
    """The reference's latent scale: the square root of the mean, over `batches` batches, of
    the variance of posterior samples (all processes' batches together)."""
    from ..models.autoencoder import encode_moments

    acc = accelerator
    per_rank = data.num_items // acc.num_processes
    if per_rank < 1:
        raise CCLDError(f"{data.num_items} items cannot be shared by {acc.num_processes} processes")
    n = min(batch_size, per_rank)
    sampler = ShardedStream(data.num_items, acc.process_index, acc.num_processes,
                            derive_seed(seed, 2), blocks=data.read_blocks)
    loader = DataLoader(data.dataset, n, sampler=sampler, drop_last=True, num_workers=num_workers)
    generator = torch.Generator().manual_seed(derive_seed(seed, acc.process_index, 3))
    if autoencoder is not None:
        autoencoder.to(acc.device)
    total = torch.zeros((), dtype=torch.float64)  # on the CPU: MPS has no float64
    for _, batch in zip(range(batches), loader):
        if "pixels" in batch:
            mean, logvar = encode_moments(autoencoder, batch["pixels"].to(acc.device) * 2 - 1)
        else:
            mean, logvar = batch["mean"].to(acc.device), batch["logvar"].to(acc.device)
        noise = torch.randn(mean.shape, generator=generator).to(acc.device)
        total += sample_posterior(mean, logvar, noise).var().double().cpu()
    mean_variance = total / batches
    if acc.num_processes > 1:  # (MPS trains in one process)
        mean_variance = acc.reduce(mean_variance.to(acc.device), "mean")
    variance = mean_variance.item()
    if not math.isfinite(variance) or variance <= 0:
        raise CCLDError(f"the latents of {data.description} have variance {variance}; the "
                        "images or the autoencoder are broken")
    return math.sqrt(variance)
