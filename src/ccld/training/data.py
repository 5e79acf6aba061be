"""Training data: image sources, the reference preprocessing, and the encoded latent cache.

Sources (`open_image_source`):
- a folder of images, searched recursively (sorted, so the order is the same on every machine);
- a `.txt` path list, one image per line, as JD-P's trainer reads (relative paths are taken
  relative to the list's folder);
- parquet files in the Hugging Face WikiArt layout (`huggan/wikiart`): an `image` column of
  `{'bytes': ..., 'path': ...}` structs (or plain bytes) beside label columns, which are ignored;
  a `.parquet` file, a folder of them, or a hub dataset id when online.

Preprocessing is the reference trainer's: RGB, short side resized to `size` with Lanczos, center
crop; CLOOB sees a bicubic resize of that crop to its own input size. An unreadable image is
skipped and counted, never a crash.

The latent cache (`ccld encode-dataset`) is a folder of safetensors shards holding, per image, the
autoencoder posterior (`mean`, `logvar`) and the CLOOB image embedding (`embed`), plus an
`index.json` listing the finished shards. Training samples the posterior from it every step, which
is the same distribution as encoding on the fly.
"""

from __future__ import annotations

import bisect
import io
import json
import logging
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F
from torch.utils.data import Dataset, Sampler

from ..errors import CCLDError

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
CACHE_FORMAT = "ccld-latent-cache"
CACHE_VERSION = 1
CACHE_INDEX = "index.json"
LOGVAR_RANGE = (-30.0, 20.0)  # the clamp of LDM's DiagonalGaussianDistribution


# Image sources

class ImageSource:
    """An indexed list of images; `read(i)` gives an RGB PIL image, or raises CCLDError."""

    def __init__(self, description: str, paths: list[str] | None = None,
                 parquet_files: list[str] | None = None, parquet_rows: np.ndarray | None = None,
                 image_column: str = "image"):
        self.description = description
        self.paths = paths
        self.parquet_files = parquet_files
        # one row per item: (file number, row group, row within the group)
        self.parquet_rows = parquet_rows
        self.image_column = image_column
        self._row_group_key = None  # the last row group read, kept because reads are mostly in order
        self._row_group = None

    def __len__(self) -> int:
        return len(self.paths) if self.paths is not None else len(self.parquet_rows)

    def name(self, i: int) -> str:
        """What item i is, for messages: its path, or its parquet file and row."""
        if self.paths is not None:
            return self.paths[i]
        f, g, r = (int(v) for v in self.parquet_rows[i])
        return f"{self.parquet_files[f]} (row group {g}, row {r})"

    def read_blocks(self) -> np.ndarray | None:
        """Per item, the number of the block it is read with: its parquet row group, which is
        decoded whole for any one of its rows. None where items are read one by one (files)."""
        if self.parquet_rows is None:
            return None
        _, blocks = np.unique(self.parquet_rows[:, :2], axis=0, return_inverse=True)
        return blocks.reshape(-1)

    def read(self, i: int):
        from ..io.images import load_image

        if self.paths is not None:
            return load_image(self.paths[i])
        f, g, r = (int(v) for v in self.parquet_rows[i])
        if self._row_group_key != (f, g):
            import pyarrow.parquet as pq

            table = pq.ParquetFile(self.parquet_files[f]).read_row_group(
                g, columns=[self.image_column])
            self._row_group = table.column(self.image_column).to_pylist()
            self._row_group_key = (f, g)
        value = self._row_group[r]
        data = value.get("bytes") if isinstance(value, dict) else value
        if not isinstance(data, (bytes, bytearray)):
            raise CCLDError(f"{self.name(i)}: no image bytes in column {self.image_column!r}")
        return decode_image_bytes(bytes(data), self.name(i))

    def __getstate__(self):
        # DataLoader workers get their own copy; the cached row group is not worth sending
        state = dict(self.__dict__)
        state["_row_group_key"] = state["_row_group"] = None
        return state


def decode_image_bytes(data: bytes, name: str):
    """An RGB image from encoded bytes, with the same checks and conversions as `load_image`."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    from ..io.images import _READ_ERRORS, MAX_PIXELS, _to_rgb, open_image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with open_image(io.BytesIO(data), name) as im:
                if im.width * im.height > MAX_PIXELS:
                    raise CCLDError(f"{name}: the image is {im.width}x{im.height}, more than the "
                                    f"{MAX_PIXELS / 1e6:.0f} megapixel limit")
                im.load()
                return _to_rgb(ImageOps.exif_transpose(im))
    except CCLDError:
        raise
    except UnidentifiedImageError:
        raise CCLDError(f"{name}: not an image format ccld can read") from None
    except _READ_ERRORS as e:
        detail = " ".join(str(e).split())[:120] or type(e).__name__
        raise CCLDError(f"{name}: the image could not be read (damaged or truncated: {detail})") from None


def list_image_folder(folder: Path) -> list[str]:
    return sorted(str(p) for p in folder.rglob("*")
                  if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def read_path_list(path: Path) -> list[str]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise CCLDError(f"{path}: cannot read the path list ({type(e).__name__}); give a UTF-8 "
                        "text file with one image path a line") from None
    paths = []
    for line in lines:
        line = line.strip()
        if line:
            p = Path(line).expanduser()
            paths.append(str(p if p.is_absolute() else path.parent / p))
    return paths


def parquet_source(files: list[Path], description: str, image_column: str = "image") -> ImageSource:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise CCLDError("reading parquet datasets needs pyarrow; pip install 'ccld[train]' "
                        "(or pip install pyarrow)") from None
    rows = []
    for f_index, path in enumerate(files):
        try:
            meta = pq.ParquetFile(path)
        except (OSError, ValueError) as e:
            detail = " ".join(str(e).split())[:120]
            raise CCLDError(f"{path}: not a readable parquet file ({detail}); download it again") from None
        names = meta.schema_arrow.names
        if image_column not in names:
            raise CCLDError(f"{path}: no {image_column!r} column (it has {', '.join(names)}); pass "
                            "--image-column with the column that holds the encoded images")
        for g in range(meta.num_row_groups):
            n = meta.metadata.row_group(g).num_rows
            rows.append(np.stack([np.full(n, f_index), np.full(n, g), np.arange(n)], axis=1))
    table = np.concatenate(rows) if rows else np.zeros([0, 3], dtype=np.int64)
    return ImageSource(description, parquet_files=[str(f) for f in files],
                       parquet_rows=table.astype(np.int64), image_column=image_column)


def hub_parquet_files(repo_id: str) -> list[Path]:
    """The parquet files of a Hugging Face dataset repo, downloaded into the hub cache."""
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(repo_id, repo_type="dataset", allow_patterns=["*.parquet"])
    except Exception as e:  # offline, no such repo, HTTP errors: all the user's to fix
        reason = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise CCLDError(f"{repo_id}: no such local file or folder, and could not get the dataset "
                        f"{repo_id} from the hub ({reason}); check the path, or the network for a "
                        "hub dataset (or download its parquet files and pass their folder)") from None
    return sorted(Path(folder).rglob("*.parquet"))


def open_image_source(spec: str | os.PathLike, image_column: str = "image") -> ImageSource:
    """An image folder, a `.txt` path list, parquet file(s), or a hub dataset id (`owner/name`)."""
    path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix == ".parquet":
            source = parquet_source([path], str(path.resolve()), image_column)
        elif path.suffix.lower() in IMAGE_SUFFIXES:
            raise CCLDError(f"{path}: a single image; give the folder that holds the images")
        else:
            source = ImageSource(str(path.resolve()), paths=read_path_list(path))
    elif path.is_dir():
        if (path / CACHE_INDEX).is_file():
            raise CCLDError(f"{path}: an encoded latent cache, not images; pass the original "
                            "images here")
        images = list_image_folder(path)
        if images:
            source = ImageSource(str(path.resolve()), paths=images)
        else:
            parquets = sorted(path.rglob("*.parquet"))
            if not parquets:
                raise CCLDError(f"{path}: no images ({', '.join(IMAGE_SUFFIXES)}) or parquet files "
                                "in this folder or below; check the path")
            source = parquet_source(parquets, str(path.resolve()), image_column)
    elif str(spec).count("/") == 1 and not str(spec).startswith((".", "/", "~")):
        files = hub_parquet_files(str(spec))
        if not files:
            raise CCLDError(f"the hub dataset {spec} has no parquet files; give a dataset in the "
                            "WikiArt layout (huggan/wikiart) or local images")
        source = parquet_source(files, f"hub:{spec}", image_column)
    else:
        raise CCLDError(f"{spec}: no such file or folder; give an image folder, a .txt path list, "
                        "parquet files or a hub dataset id such as huggan/wikiart")
    if len(source) == 0:
        raise CCLDError(f"{spec}: holds no images; check the path")
    return source


# Preprocessing

def prepare_pixels(image, size: int) -> torch.Tensor:
    """[3, size, size] in [0, 1]: short side to `size` (Lanczos), center crop, as the reference."""
    from ..io.images import pil_to_tensor, resize_and_center_crop

    return pil_to_tensor(resize_and_center_crop(image, size))


def cloob_input(pixels: torch.Tensor, cloob_size: int) -> torch.Tensor:
    """The reference trainer's CLOOB input: a bicubic resize of the [0, 1] crop (on the CPU
    for MPS, which lacks bicubic resizing before torch 2.5)."""
    if pixels.device.type == "mps":
        return cloob_input(pixels.cpu(), cloob_size).to(pixels.device)
    return F.interpolate(pixels, (cloob_size, cloob_size), mode="bicubic", align_corners=False)


def sample_posterior(mean: torch.Tensor, logvar: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """A sample of the autoencoder's diagonal Gaussian posterior, given standard normal noise."""
    std = torch.exp(0.5 * logvar.float().clamp(*LOGVAR_RANGE))
    return mean.float() + std * noise


class ImageDataset(Dataset):
    """Preprocessed pixels of an image source; an unreadable image is replaced by the next
    readable one (so every batch is full and every process does the same work) and counted."""

    def __init__(self, source: ImageSource, size: int):
        self.source = source
        self.size = size

    def __len__(self):
        return len(self.source)

    def __getitem__(self, i):
        n = len(self.source)
        for skipped in range(min(n, 1000)):
            j = (i + skipped) % n
            try:
                pixels = prepare_pixels(self.source.read(j), self.size)
            except CCLDError as e:
                logger.warning(f"skipping an unreadable image: {e}")
                continue
            return {"pixels": pixels, "skipped": skipped}
        raise CCLDError(f"{self.source.description}: {min(n, 1000)} unreadable images in a row "
                        f"from item {i}; check the data")


class EncodeItems(Dataset):
    """Items for `ccld encode-dataset`: pixels, or the reason an image could not be read."""

    def __init__(self, source: ImageSource, size: int, start: int, stop: int):
        self.source, self.size, self.start, self.stop = source, size, start, stop

    def __len__(self):
        return self.stop - self.start

    def __getitem__(self, k):
        i = self.start + k
        try:
            return {"index": i, "pixels": prepare_pixels(self.source.read(i), self.size)}
        except CCLDError as e:
            return {"index": i, "error": str(e)}


def collate_encode_items(items: list[dict]) -> dict:
    good = [it for it in items if "pixels" in it]
    return {
        "index": torch.tensor([it["index"] for it in good], dtype=torch.long),
        "pixels": (torch.stack([it["pixels"] for it in good]) if good
                   else torch.zeros([0, 3, 1, 1])),
        "failed": [(it["index"], it["error"]) for it in items if "error" in it],
    }


# The latent cache

def shard_name(k: int) -> str:
    return f"shard-{k:06d}.safetensors"


def is_latent_cache(path: str | os.PathLike) -> bool:
    return (Path(path).expanduser() / CACHE_INDEX).is_file()


def read_cache_index(folder: Path) -> dict:
    path = folder / CACHE_INDEX
    try:
        index = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CCLDError(f"{path}: unreadable latent cache index ({type(e).__name__}); run "
                        "`ccld encode-dataset` again with the same --out to rebuild it") from None
    if not isinstance(index, dict) or index.get("format") != CACHE_FORMAT:
        raise CCLDError(f"{path}: not a ccld latent cache index; point at a folder written by "
                        "`ccld encode-dataset`")
    if index.get("version") != CACHE_VERSION:
        raise CCLDError(f"{path}: latent cache version {index.get('version')}, this ccld reads "
                        f"version {CACHE_VERSION}; encode the data again")
    return index


class LatentDataset(Dataset):
    """Items of an encoded cache: `mean`, `logvar` [4, h, w] and `embed` [d], read lazily."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder).expanduser()
        self.index = read_cache_index(self.folder)
        if not self.index.get("complete"):
            done = len(self.index.get("shards", []))
            total = self.index.get("num_shards", "?")
            raise CCLDError(f"{self.folder}: the latent cache is incomplete ({done} of {total} "
                            "shards); run `ccld encode-dataset` again with the same options to "
                            "finish it")
        self.shards = [s for s in self.index["shards"] if s["count"] > 0]
        for s in self.shards:
            if not (self.folder / s["file"]).is_file():
                raise CCLDError(f"{self.folder / s['file']}: missing shard of the latent cache; "
                                "run `ccld encode-dataset` again with the same options")
        self.starts = np.cumsum([0] + [s["count"] for s in self.shards]).tolist()
        self.latent_shape = tuple(self.index["latent_shape"])
        self.embed_dim = int(self.index["embed_dim"])
        self._handles = {}

    def __len__(self):
        return self.starts[-1]

    def _handle(self, k: int):
        if k not in self._handles:
            from safetensors import safe_open

            self._handles[k] = safe_open(str(self.folder / self.shards[k]["file"]), framework="pt")
        return self._handles[k]

    def __getitem__(self, i):
        k = bisect.bisect_right(self.starts, i) - 1
        local = i - self.starts[k]
        f = self._handle(k)
        return {name: f.get_slice(name)[local:local + 1][0].float()
                for name in ("mean", "logvar", "embed")}

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_handles"] = {}  # file handles stay with the process that opened them
        return state


# Sharding and order

class ShardedStream(Sampler):
    """An endless, reproducible stream of item indices for one process of `world` processes.

    Epoch e is a permutation seeded by (seed, e), cut into `world` consecutive parts of equal
    length, one per process, so processes never see the same item within an epoch. `start` skips
    the first `start` indices of this process's stream: how a resumed run continues where it
    stopped.

    `blocks` (per item, the number of the block it is read with; see `ImageSource.read_blocks`)
    keeps each block together: the blocks come in a random order, each one's items shuffled
    within it, so a process decodes every parquet row group it reads once per epoch instead of
    once per item (each loader worker that gets some of its items decodes it once).
    """

    def __init__(self, num_items: int, rank: int = 0, world: int = 1, seed: int = 0,
                 start: int = 0, blocks: np.ndarray | None = None):
        if num_items < world:
            raise CCLDError(f"{num_items} training items cannot be shared by {world} processes; "
                            "use more data or fewer processes")
        self.num_items, self.rank, self.world = num_items, rank, world
        self.seed, self.start = seed, start
        self.per_rank = num_items // world
        self.blocks = None if blocks is None else torch.as_tensor(blocks, dtype=torch.long)

    def epoch_indices(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(int(np.random.SeedSequence(
            [self.seed, epoch]).generate_state(1)[0]))
        order = torch.randperm(self.num_items, generator=g)
        if self.blocks is not None:
            # sorted by (the block's place, a random rank within it): whole blocks, shuffled
            place = torch.randperm(int(self.blocks.max()) + 1, generator=g)
            order = torch.argsort(place[self.blocks] * self.num_items + order)
        return order[self.rank * self.per_rank:(self.rank + 1) * self.per_rank]

    def __iter__(self):
        epoch, offset = divmod(self.start, self.per_rank)
        while True:
            yield from self.epoch_indices(epoch)[offset:].tolist()
            epoch, offset = epoch + 1, 0


@dataclass
class TrainingData:
    """What training reads: a latent cache, or images encoded on the fly by `encoder`."""
    dataset: Dataset
    latent_shape: tuple
    description: str
    cached: bool
    read_blocks: np.ndarray | None = None  # items read together (see ShardedStream)

    @property
    def num_items(self) -> int:
        return len(self.dataset)


def open_training_data(spec: str | os.PathLike, image_size: int = 256,
                       image_column: str = "image") -> TrainingData:
    """A latent cache folder as it is, or any image source for encoding on the fly."""
    if is_latent_cache(spec):
        dataset = LatentDataset(spec)
        if len(dataset) == 0:
            raise CCLDError(f"{spec}: the latent cache holds no images; encode a dataset with "
                            "readable images")
        return TrainingData(dataset, dataset.latent_shape, f"latent cache {spec}", True)
    check_image_size(image_size)
    source = open_image_source(spec, image_column)
    return TrainingData(ImageDataset(source, image_size), (4, image_size // 8, image_size // 8),
                        source.description, False, source.read_blocks())


def check_image_size(size: int) -> None:
    if size < 64 or size % 64:
        raise CCLDError(f"--image-size must be a positive multiple of 64 (got {size}): the "
                        "autoencoder halves it three times and the U-Net three more")


def num_shards(num_items: int, shard_size: int) -> int:
    return math.ceil(num_items / shard_size)


@torch.no_grad()
def encode_pixels(autoencoder, cloob, pixels: torch.Tensor):
    """`(mean, logvar, embed)` of images in [0, 1]: the frozen encoders' view of a batch; with no
    CLOOB (for an objective that reads no embeddings) `embed` is empty, [n, 0]."""
    from ..models.autoencoder import encode_moments

    mean, logvar = encode_moments(autoencoder, pixels * 2 - 1)
    if cloob is None:
        return mean.float(), logvar.float(), mean.new_zeros([mean.shape[0], 0], dtype=torch.float32)
    size = cloob.config["image_encoder"]["image_size"]
    embed = cloob.encode_image(cloob_input(pixels.to(mean.device), size))
    return mean.float(), logvar.float(), embed.float()
