"""Compiled U-Net forwards on the CPU: built once per input shape by AOTInductor, kept in ccld's
cache, and loaded by every later process in milliseconds.

A package holds the compiled code only, not the weights: the U-Net's own tensors are handed to it
when it is loaded (`load_constants(..., user_managed=True)`), so the cache holds no second copy
of the weights and one package serves every checkpoint of the same architecture and layout.
A package is found by a key of everything its code depends on (see `package_key`); anything
else (another shape, a changed torch or CPU, a guidance input) runs the eager forward. Under
autocast (bf16 or fp16) the package is exported inside the same autocast, so it holds the casts
autocast would make.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

PACKAGE_FORMAT = 1  # bump when what a package is keyed by or holds changes
COMPILED_FOLDER = "compiled"


def compiled_dir() -> Path | None:
    """Where packages are kept: beside the converted weights; None when the cache is off."""
    from ..io.weights_cache import converted_dir

    converted = converted_dir()
    return None if converted is None else converted.parent / COMPILED_FOLDER


def cpu_identity() -> dict:
    """What the generated code was specialised for: the vector instructions torch dispatches to
    and the oneDNN ISA cap (`ONEDNN_MAX_CPU_ISA`, which emulates an older CPU)."""
    return {"capability": torch.backends.cpu.get_cpu_capability(),
            "onednn_max_isa": os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper() or None,
            "aten_capability": os.environ.get("ATEN_CPU_CAPABILITY", "").lower() or None}


def _tensor_spec(tensor: torch.Tensor) -> list:
    return [list(tensor.shape), list(tensor.stride()), str(tensor.dtype).removeprefix("torch.")]


def autocast_dtype() -> torch.dtype | None:
    """The dtype the CPU's autocast computes in here, or None where it is off."""
    return torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None


def package_key(unet: nn.Module, inputs: tuple[torch.Tensor, ...],
                autocast: torch.dtype | None = None) -> str:
    """The cache key of the package that runs `unet` on tensors like `inputs` under `autocast`:
    the package format, torch's version, the CPU, the net's config, every weight's name, shape,
    strides and dtype (its precision and layout), the inputs' shapes, strides and dtypes, and
    the autocast dtype."""
    weights = [[name, *_tensor_spec(t)] for name, t in _constants(unet).items()]
    described = {"format": PACKAGE_FORMAT, "torch": torch.__version__, "cpu": cpu_identity(),
                 "class": type(unet).__qualname__, "config": getattr(unet, "config", None),
                 "weights": weights, "inputs": [_tensor_spec(t) for t in inputs],
                 "autocast": None if autocast is None else str(autocast).removeprefix("torch.")}
    text = json.dumps(described, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def compiler_missing() -> str | None:
    """Why AOTInductor cannot build here (no C++ compiler), or None."""
    names = [os.environ.get("CXX"), "c++", "g++", "clang++"]
    if any(name and shutil.which(name) for name in names):
        return None
    return "no C++ compiler (c++, g++ or clang++) is on the PATH"


def _constants(unet: nn.Module) -> dict[str, torch.Tensor]:
    return {**dict(unet.named_parameters()), **dict(unet.named_buffers())}


class _Eager(nn.Module):
    """`unet` with its own forward, for export (the installed forward would recurse)."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, *inputs):
        return type(self.unet).forward(self.unet, *inputs)


def _load(path: Path, unet: nn.Module):
    """The package at `path` with `unet`'s tensors as its weights: a callable of the inputs."""
    # torch's own loader (`torch._inductor.aoti_load_package`) first imports torch._dynamo and
    # inductor, about 2 s on a small CPU; the C++ loader it wraps needs neither
    loader = torch._C._aoti.AOTIModelPackageLoader(str(path), "model", False, 1, -1)
    constants = {f"unet.{name}": tensor for name, tensor in _constants(unet).items()}
    wanted = loader.get_constant_fqns()
    # check_full_update: every constant the package names is given; user_managed: used in place
    loader.load_constants({name: constants[name] for name in wanted}, False, True, True, False)
    return lambda *inputs: loader.run(list(inputs))[0]


def _build(path: Path, unet: nn.Module, inputs: tuple[torch.Tensor, ...],
           autocast: torch.dtype | None = None) -> None:
    """Exports `unet` for `inputs` (under `autocast`) and compiles it, written to `path` whole
    or not at all."""
    import torch._inductor

    casts = contextlib.nullcontext() if autocast is None else torch.autocast("cpu", autocast)
    # export traces outside inference mode (the pipeline paints inside it)
    with torch.inference_mode(False), torch.no_grad(), casts:
        inputs = tuple(t.clone() for t in inputs)
        exported = torch.export.export(_Eager(unet), inputs)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".build-") as tmp:
        built = Path(tmp) / path.name
        torch._inductor.aoti_compile_and_package(
            exported, package_path=str(built),
            inductor_configs={"aot_inductor.package_constants_in_so": False})
        os.replace(built, path)


def first_line(error: BaseException) -> str:
    return (str(error).splitlines() or [""])[0][:120]


def _say(message: str) -> None:
    print(f"ccld: {message}", file=sys.stderr, flush=True)


class CompiledForwards:
    """Takes the place of `unet.forward`: the cached package for each input shape, loaded once.
    With `build` true, the first shape the cache lacks is compiled (reported) and stored; any
    other shape the cache lacks runs eager (a run's last, smaller batch is not worth a compile),
    as does any call the packages do not cover."""

    def __init__(self, unet: nn.Module, build: bool = False, say=_say):
        self.unet, self.build, self.say = unet, build, say
        self.folder = compiled_dir()
        self._session = None  # a temporary folder for packages when the cache is off
        # key -> (the weights it was given, the package's callable or None: eager)
        self._runs: dict[str, tuple[tuple, object]] = {}
        self._keys: dict[tuple, str] = {}  # (the weights, the inputs' specs) -> package_key
        self.compiled_calls = 0

    def eager(self, x, t, embed, guidance=None):
        return type(self.unet).forward(self.unet, x, t, embed, guidance)

    def __call__(self, x, t, embed, guidance=None):
        if guidance is not None or x.device.type != "cpu":
            return self.eager(x, t, embed, guidance)
        inputs, autocast = (x, t, embed), autocast_dtype()
        # a package uses the tensors it was loaded with in place: moved or re-laid-out weights
        # (`CCLDPipeline.to`) are handed to it again
        weights = tuple(t.data_ptr() for t in _constants(self.unet).values())
        seen = (weights, autocast,
                tuple(tuple(map(tuple, _tensor_spec(t)[:2])) + (t.dtype,) for t in inputs))
        if seen not in self._keys:
            self._keys[seen] = package_key(self.unet, inputs, autocast)
        key = self._keys[seen]
        if key not in self._runs or self._runs[key][0] != weights:
            self._runs[key] = weights, self._find(key, inputs, autocast)
        run = self._runs[key][1]
        if run is None:
            return self.eager(x, t, embed)
        self.compiled_calls += 1
        return run(*inputs)

    def _place(self, key: str) -> Path:
        folder = self.folder
        if folder is None:
            if self._session is None:
                self._session = tempfile.TemporaryDirectory(prefix="ccld-compiled-")
            folder = Path(self._session.name)
        return folder / f"unet-{key}.pt2"

    def _find(self, key: str, inputs: tuple[torch.Tensor, ...], autocast: torch.dtype | None):
        path = self._place(key)
        if path.is_file():
            try:
                return _load(path, self.unet)
            except (RuntimeError, KeyError, OSError) as e:  # damaged, or from another build
                then = "compiling it again" if self.build else "painting without it"
                self.say(f"the compiled U-Net {path.name} does not load ({first_line(e)}); {then}")
                path.unlink(missing_ok=True)
        if not self.build:
            return None
        missing = compiler_missing()
        if missing:
            self.say(f"not compiling the U-Net: {missing}; painting without it")
            self.build = False
            return None
        self.build = False  # one compile per process, for the run's (first) batch shape
        shape = "x".join(str(n) for n in inputs[0].shape)
        self.say(f"compiling the U-Net for {shape} latents (a minute or more, once: later runs "
                 "load it from the cache)")
        started = time.perf_counter()
        try:
            _build(path, self.unet, inputs, autocast)
            run = _load(path, self.unet)
        except Exception as e:  # a compiler failure must never cost the painting
            self.say(f"compiling the U-Net failed ({type(e).__name__}: {first_line(e)}); "
                     "painting without it")
            return None
        self.say(f"compiled the U-Net in {time.perf_counter() - started:.0f} s")
        return run


def packages() -> list[Path]:
    """The compiled packages in the cache (`ccld cache info` lists them, `clear` removes them)."""
    folder = compiled_dir()
    return sorted(folder.glob("unet-*.pt2")) if folder is not None and folder.is_dir() else []


def install(unet: nn.Module, build: bool = False, say=_say) -> CompiledForwards:
    """Makes `unet` run its cached compiled forwards (see `CompiledForwards`); its state dict
    and every other method are unchanged. `uninstall` undoes it."""
    forwards = CompiledForwards(unet, build, say)
    unet.forward = forwards
    return forwards


def uninstall(unet: nn.Module) -> None:
    if isinstance(unet.__dict__.get("forward"), CompiledForwards):
        del unet.forward


def installed(unet: nn.Module) -> CompiledForwards | None:
    forwards = unet.__dict__.get("forward")
    return forwards if isinstance(forwards, CompiledForwards) else None
