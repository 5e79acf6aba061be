"""Where the published models live, and fetching them once into the local cache.

The U-Net and the autoencoder come from Hugging Face hub repos through `huggingface_hub` (its
cache, its offline mode); the CLOOB pickle from its release URL, kept only once its sha256 checks
out. Every failure is a one-line `CCLDError` saying what to do. A file in the cache is used
without asking the network; one that is not is fetched only after the server has answered a
connection within CONNECT_TIMEOUT seconds, so no network is said at once, not after a minute of
retries.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from ..errors import CCLDError, give

DEFAULT_UNET = ("huggan/distill-ccld-wa", "model_student.ckpt")  # the 105M distilled student
DEFAULT_AUTOENCODER = ("huggan/ccld_wa", "ae_model.ckpt", "ae_model.yaml")
DEFAULT_CLOOB = "cloob_laion_400m_vit_b_16_16_epochs"
TEACHER_REPO = "huggan/ccld_wa"  # the 1.2B WikiArt teacher, beside the autoencoder
# TAESD, the tiny decoder for Stable Diffusion's kl-f8 autoencoder (diffusers' AutoencoderTiny)
TAESD = ("madebyollin/taesd", "diffusion_pytorch_model.safetensors", "config.json")
# The latent scale the published WikiArt models' demos (the student's notebook, JD-P's
# cfg_sample.py for the teacher) decode with, whatever the checkpoint's buffer says.
PUBLISHED_LATENT_SCALE = 2.55
CONNECT_TIMEOUT = 5.0  # seconds a server has to accept a connection before we call it offline
OFFLINE_FIX = "run `ccld download` once while online, or pass local model files"


def _reason(e: Exception, limit: int = 160) -> str:
    """The first sentence of an exception's message, shortened at a word, never mid-word."""
    text = " ".join(str(e).split())
    if not text:
        return type(e).__name__
    sentence = text.split(". ")[0].rstrip(".")
    return sentence if len(sentence) <= limit else sentence[:limit].rsplit(" ", 1)[0] + " ..."


def check_reachable(url: str, what: str) -> None:
    """Returns when `url`'s server (or the proxy that reaches it) accepts a connection within
    CONNECT_TIMEOUT seconds; else a CCLDError "`what`: cannot reach ..." at once."""
    import socket
    import urllib.parse
    import urllib.request

    parts = urllib.parse.urlsplit(url)
    proxy = urllib.request.getproxies().get(parts.scheme)
    if proxy and not urllib.request.proxy_bypass(parts.hostname or ""):
        parts = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=CONNECT_TIMEOUT).close()
    except OSError as e:
        reason = (f"no answer in {CONNECT_TIMEOUT:g} s" if isinstance(e, TimeoutError)
                  else e.strerror or _reason(e))
        raise CCLDError(f"{what}: cannot reach {host}:{port} ({reason}); check the network, "
                        f"or {OFFLINE_FIX}") from None


def hub_download(repo_id: str, filename: str) -> Path:
    """A file of a Hugging Face hub repo: from the local cache if it is there, without asking
    the network; else downloaded into it, once the hub answers (see `check_reachable`)."""
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(hf_hub_download(repo_id, filename, local_files_only=True))
    except LocalEntryNotFoundError:
        pass  # not in the cache
    what = f"could not get {filename} from the hub repo {repo_id}"
    if constants.HF_HUB_OFFLINE:
        raise CCLDError(f"{what}: it is not in the cache and HF_HUB_OFFLINE is set; unset it, or "
                        f"{OFFLINE_FIX}")
    check_reachable(constants.ENDPOINT, what)
    try:
        return Path(hf_hub_download(repo_id, filename))
    except Exception as e:  # no such repo/file, HTTP errors: all the user's to fix
        raise CCLDError(f"{what} ({_reason(e)}); check the network, or {OFFLINE_FIX}") from None


def _unet_checkpoints(names) -> list[str]:
    """The U-Net checkpoints among a teacher repo's file names, best first: EMA weights (what
    sampling uses), then safetensors, then by name, so the choice never depends on listing order."""
    found = [n for n in names if n.endswith((".ckpt", ".safetensors"))
             and not Path(n).name.startswith("ae_model")]
    return sorted(found, key=lambda n: ("ema" not in n.lower(), not n.endswith(".safetensors"), n))


def teacher_checkpoint(repo_id: str = TEACHER_REPO) -> Path:
    """The teacher U-Net checkpoint of `repo_id`. A copy in the hub cache is used without asking
    the network (offline too); else the repo is listed once and its best checkpoint (see
    `_unet_checkpoints`) downloaded."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        snapshot = Path(snapshot_download(repo_id, local_files_only=True))
    except (LocalEntryNotFoundError, OSError, ValueError):
        snapshot = None  # nothing of this repo cached yet
    if snapshot is not None:
        cached = _unet_checkpoints(str(p.relative_to(snapshot)) for p in snapshot.rglob("*")
                                   if p.is_file())
        if cached:
            return snapshot / cached[0]
    names = _unet_checkpoints(hub_list_files(repo_id))
    if not names:
        raise CCLDError(f"the hub repo {repo_id} holds no U-Net checkpoint; pass a U-Net file "
                        "(--unet, or unet= in Python)")
    return hub_download(repo_id, names[0])


def hub_list_files(repo_id: str) -> list[str]:
    from huggingface_hub import constants, list_repo_files

    what = f"could not list the hub repo {repo_id}"
    if constants.HF_HUB_OFFLINE:
        raise CCLDError(f"{what}: HF_HUB_OFFLINE is set; unset it, or pass local model files")
    check_reachable(constants.ENDPOINT, what)
    try:
        return list_repo_files(repo_id)
    except Exception as e:
        raise CCLDError(f"could not list the hub repo {repo_id} ({_reason(e)}); check the network "
                        "or pass local files") from None


def cache_dir() -> Path:
    """Where non-hub downloads (the CLOOB pickle) live: ccld's cache folder, `CCLD_CACHE_DIR` or
    beside the Hugging Face hub cache (see `ccld.io.weights_cache`)."""
    from .weights_cache import cache_root

    return cache_root()


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def download_verified(url: str, dest: Path, sha256: str, progress: bool = True) -> Path:
    """Downloads url to dest unless a verified copy is there; the file appears only once verified."""
    import urllib.error
    import urllib.request

    from tqdm.auto import tqdm

    dest = Path(dest)
    if dest.is_file() and sha256_of(dest) == sha256:
        return dest
    check_reachable(url, f"could not download {url}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=60) as r, open(tmp, "wb") as f:
            total = int(r.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=dest.name,
                      disable=not progress) as bar:
                for block in iter(lambda: r.read(1 << 20), b""):
                    f.write(block)
                    bar.update(len(block))
    except (urllib.error.URLError, OSError, ValueError) as e:
        tmp.unlink(missing_ok=True)
        raise CCLDError(f"could not download {url} ({getattr(e, 'reason', e)}); check the "
                        f"network, or download it by hand and pass its path") from None
    got = sha256_of(tmp)
    if got != sha256:
        tmp.unlink(missing_ok=True)
        raise CCLDError(f"{url}: the download's sha256 is {got[:16]}..., not the {sha256[:16]}... "
                        "its name promises; the server sent a different or damaged file, try again")
    os.replace(tmp, dest)
    return dest


# The default files, each fetched on first use

def default_unet() -> Path:
    return hub_download(*DEFAULT_UNET)


def default_autoencoder() -> tuple[Path, Path]:
    """The published autoencoder's checkpoint and its yaml."""
    repo, ckpt, yaml = DEFAULT_AUTOENCODER
    return hub_download(repo, ckpt), hub_download(repo, yaml)


def taesd_files() -> tuple[Path, Path]:
    """TAESD's weights and config.json, side by side in the hub cache; fetched only when
    `--decoder taesd` asks for them."""
    repo, weights, config = TAESD
    return hub_download(repo, weights), hub_download(repo, config)


def builtin_cloob_name(config) -> str | None:
    """The built-in CLOOB a `cloob_config` value names, if it names one (not a JSON file/dict)."""
    if isinstance(config, str) and not config.endswith(".json"):
        return config
    return None


def download_cloob(name: str | None = None) -> Path:
    """The released CLOOB pickle for a built-in config, downloaded once and verified."""
    from ..models.cloob import BUILTIN_CONFIGS

    name = name or DEFAULT_CLOOB
    if name not in BUILTIN_CONFIGS:
        raise CCLDError(f"unknown CLOOB model {name!r}; choose from {', '.join(BUILTIN_CONFIGS)} "
                        f"or pass {give('cloob')} with {give('cloob_config')}")
    release = BUILTIN_CONFIGS[name]
    filename = release["url"].rpartition("/")[2]
    return download_verified(release["url"], cache_dir() / filename, release["sha256"])
