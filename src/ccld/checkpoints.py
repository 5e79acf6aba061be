"""Reading checkpoint files safely, whatever format they were released in.

No file read here can run code. PyTorch files go through `torch.load(weights_only=True)`; the
CLOOB release is a plain pickle of numpy arrays, read by an unpickler that admits only numpy
arrays, dtypes and plain containers. Every failure becomes a one-line `CCLDError` naming the file
and what to do.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import pickle
import re
import zipfile
from pathlib import Path

import torch

from .errors import CCLDError

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


def load_torch_file(path: str | os.PathLike, what: str = "checkpoint") -> dict:
    """Loads a `torch.save` file with `weights_only=True`: tensors and containers, never code."""
    path = _require_file(path, what)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # weights_only refuses anything but tensors and plain containers, which is exactly a
        # file that would run code (or a format that is not a checkpoint at all).
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        refused = re.search(r"GLOBAL (\S+)", str(e))
        if refused:
            raise CCLDError(f"{path}: refused to load: the file asks for {refused.group(1)}, "
                            "which could run code; a checkpoint holds only tensors, so use a "
                            "trusted release file or a safetensors conversion") from None
        raise CCLDError(f"{path}: not a readable {what} (corrupt or truncated: {first}); "
                        "download it again") from None
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


def load_state_file(path: str | os.PathLike, what: str = "checkpoint") -> dict:
    """Loads a safetensors or torch file by its suffix (torch for anything else)."""
    if str(path).endswith(SAFETENSORS_SUFFIXES):
        return load_safetensors_file(path, what)
    return load_torch_file(path, what)


class _ArraysOnlyUnpickler(pickle.Unpickler):
    """Admits numpy arrays, dtypes, scalars and plain containers; refuses every other global."""

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

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"forbidden global {module}.{name}")
        if module.startswith("numpy.core") or module.startswith("numpy._core"):
            import numpy
            # numpy 2 renamed numpy.core to numpy._core; numpy 1 has only the old name.
            new = module.replace("numpy.core", "numpy._core", 1) if module.startswith("numpy.core") else module
            if int(numpy.__version__.split(".")[0]) >= 2:
                module = new
            else:
                module = new.replace("numpy._core", "numpy.core", 1)
        return super().find_class(module, name)


def load_array_pickle(path: str | os.PathLike, what: str = "CLOOB checkpoint") -> dict:
    """Loads a pickle of numpy arrays in plain containers, refusing anything that could run code."""
    path = _require_file(path, what)
    data = path.read_bytes()
    try:
        obj = _ArraysOnlyUnpickler(io.BytesIO(data)).load()
    except pickle.UnpicklingError as e:
        if "forbidden global" in str(e):
            raise CCLDError(f"{path}: refused to load: the pickle asks for {str(e)[17:]}, which "
                            f"could run code; a {what} holds only numpy arrays") from None
        raise CCLDError(f"{path}: not a readable {what} (corrupt or truncated: {e}); "
                        "download it again") from None
    except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
            MemoryError, UnicodeDecodeError) as e:
        raise CCLDError(f"{path}: not a readable {what} (corrupt or truncated: "
                        f"{type(e).__name__}: {e}); download it again") from None
    if not isinstance(obj, dict):
        raise CCLDError(f"{path}: holds a {type(obj).__name__}, not a dict; "
                        f"this is not a {what}")
    return obj


# The CCLD U-Net: bare state dicts, Lightning training checkpoints, safetensors

# (base_channels, multipliers) of the published nets, used to name an inferred architecture the
# way its authors did; only the products base * multiplier matter to the weights.
KNOWN_UNET_ARCHITECTURES = [
    (192, (1, 1, 2, 2)),  # distilled WikiArt student
    (192, (4, 4, 8, 8)),  # WikiArt teacher, yfcc
    (128, (4, 4, 8, 8)),  # danbooru
]
_WIDTH_KEYS = (  # the first conv of each resolution level gives that level's width
    "net.0.main.0.weight",
    "net.4.main.1.main.0.weight",
    "net.4.main.9.main.1.main.0.weight",
    "net.4.main.9.main.9.main.1.main.0.weight",
)
_EMBED_KEY = "mapping.0.main.0.weight"


def unet_state_dict(obj: dict, path: str | os.PathLike = "checkpoint") -> dict:
    """The U-Net weights inside a loaded file: bare, or a Lightning checkpoint (EMA weights)."""
    if isinstance(obj.get("state_dict"), dict):
        sd = obj["state_dict"]
        for prefix in ("model_ema.", "model."):  # the EMA weights are the ones to sample with
            sub = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
            if sub:
                return sub
        obj = sd
    return obj


def infer_unet_config(sd: dict, path: str | os.PathLike = "checkpoint") -> dict:
    """base_channels, channel_multipliers and embed_dim from the tensor shapes alone."""
    missing = [k for k in (*_WIDTH_KEYS, _EMBED_KEY) if k not in sd]
    if missing:
        kind = describe_foreign_state_dict(sd)
        raise CCLDError(f"{path}: not a CCLD U-Net checkpoint ({kind}; no {missing[0]}); "
                        "pass the diffusion model file, e.g. model_student.ckpt")
    widths = [int(sd[k].shape[0]) for k in _WIDTH_KEYS]
    embed_dim = int(sd[_EMBED_KEY].shape[1]) - 128
    for base, mults in KNOWN_UNET_ARCHITECTURES:
        if [base * m for m in mults] == widths:
            break
    else:
        base = math.gcd(*widths)
        mults = tuple(w // base for w in widths)
    return {"base_channels": base, "channel_multipliers": list(mults), "embed_dim": embed_dim}


def describe_foreign_state_dict(sd: dict) -> str:
    keys = list(sd)
    if any(k.startswith(("encoder.", "decoder.")) for k in keys):
        return "it looks like an autoencoder"
    if "params" in sd:
        return "it looks like a CLOOB checkpoint"
    return f"{len(keys)} entries, first {keys[0]!r}" if keys else "it is empty"


def unet_from_state_dict(sd: dict, path: str | os.PathLike = "checkpoint"):
    from .models.unet import CCLDUNet

    config = infer_unet_config(sd, path)
    with torch.device("meta"):  # no wasted random init: every weight comes from the file
        unet = CCLDUNet(**config)
    sd = dict(sd)
    sd.setdefault("autoencoder_scale", torch.tensor(1.0))  # absent from some exports
    try:
        unet.load_state_dict(sd, strict=True, assign=True)
    except RuntimeError as e:
        detail = " ".join(str(e).split("\n\t")[1:2]).strip() or str(e).splitlines()[0]
        raise CCLDError(f"{path}: weights do not fit the inferred U-Net {config} ({detail[:200]}); "
                        "the file is damaged or not a CCLD U-Net") from None
    return unet.eval().requires_grad_(False)


def load_unet(path: str | os.PathLike):
    """A CCLD U-Net from a bare state dict, a Lightning checkpoint or a safetensors file."""
    obj = load_state_file(path, "U-Net checkpoint")
    return unet_from_state_dict(unet_state_dict(obj, path), path)


def describe_checkpoint(path: str | os.PathLike) -> dict:
    """What a file is: kind, architecture, parameter count and latent scale where it has one."""
    p = Path(path)
    if p.is_dir():
        if (p / "model_index.json").is_file():
            return {"kind": "ccld pipeline folder", "path": str(p),
                    **json.loads((p / "model_index.json").read_text())}
        raise CCLDError(f"{p}: a folder without model_index.json; give a checkpoint file or a "
                        "folder written by `ccld convert`")
    if p.suffix == ".pkl":
        obj = load_array_pickle(p)
        params = obj.get("params")
        if not (isinstance(params, (tuple, list)) and len(params) == 2):
            raise CCLDError(f"{p}: a pickle, but not a CLOOB checkpoint (no 'params' pair)")
        count = sum(int(a.size) for tree in params for mod in tree.values() for a in mod.values())
        return {"kind": "CLOOB checkpoint (Haiku pickle)", "path": str(p), "parameters": count,
                "image_modules": len(params[0]), "text_modules": len(params[1])}
    obj = load_state_file(p)
    lightning = isinstance(obj.get("state_dict"), dict)
    sd = unet_state_dict(obj, p)
    if _WIDTH_KEYS[0] in sd:
        config = infer_unet_config(sd, p)
        info = {"kind": "CCLD U-Net" + (" (Lightning checkpoint, EMA weights)" if lightning else ""),
                "path": str(p), **config,
                "parameters": sum(int(v.numel()) for k, v in sd.items() if k != "autoencoder_scale")}
        if "autoencoder_scale" in sd:
            info["autoencoder_scale"] = round(float(sd["autoencoder_scale"]), 6)
        if lightning and "global_step" in obj:
            info["global_step"] = int(obj["global_step"])
        return info
    if any(k.startswith("encoder.") for k in sd):
        return {"kind": "KL autoencoder (latent-diffusion format)", "path": str(p),
                "parameters": sum(int(v.numel()) for k, v in sd.items()
                                  if not k.startswith("loss."))}
    if any(k.startswith(("image_encoder.", "text_encoder.")) for k in sd):
        return {"kind": "CLOOB (PyTorch state dict)", "path": str(p),
                "parameters": sum(int(v.numel()) for v in sd.values())}
    raise CCLDError(f"{p}: not a checkpoint ccld knows ({describe_foreign_state_dict(sd)}); "
                    "expected a CCLD U-Net, an LDM autoencoder or a CLOOB checkpoint")


# Downloads: hub files through huggingface_hub, the CLOOB pickle from its URL

DEFAULT_UNET = ("huggan/distill-ccld-wa", "model_student.ckpt")  # the 105M distilled student
DEFAULT_AUTOENCODER = ("huggan/ccld_wa", "ae_model.ckpt", "ae_model.yaml")
DEFAULT_CLOOB = "cloob_laion_400m_vit_b_16_16_epochs"
TEACHER_REPO = "huggan/ccld_wa"  # the 1.2B WikiArt teacher, beside the autoencoder


def hub_download(repo_id: str, filename: str) -> Path:
    """A file of a Hugging Face hub repo, from the local cache or downloaded into it."""
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo_id, filename))
    except Exception as e:  # offline, no such repo/file, HTTP errors: all the user's to fix
        reason = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise CCLDError(f"could not get {filename} from the hub repo {repo_id} ({reason}); "
                        "check the network (or HF_HUB_OFFLINE), run `ccld download` while online, "
                        "or pass local files") from None


def hub_list_files(repo_id: str) -> list[str]:
    from huggingface_hub import list_repo_files

    try:
        return list_repo_files(repo_id)
    except Exception as e:
        reason = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise CCLDError(f"could not list the hub repo {repo_id} ({reason}); check the network "
                        "or pass local files") from None


def cache_dir() -> Path:
    """Where non-hub downloads (the CLOOB pickle) live: beside the Hugging Face hub cache."""
    from huggingface_hub.constants import HF_HUB_CACHE

    return Path(HF_HUB_CACHE).parent / "ccld"


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
