"""Shared test fixtures: the reference models and outputs in ../shared/fixtures."""

from pathlib import Path

import pytest
import torch

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"


@pytest.fixture(scope="session")
def fixtures() -> Path:
    if not (FIXTURES / "README.md").is_file():
        pytest.skip(f"reference fixtures not found at {FIXTURES}; put the shared folder beside "
                    "the repo (../shared/fixtures) to run the numerical tests")
    return FIXTURES


def max_rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest absolute error relative to the largest magnitude of the expected tensor."""
    return ((actual.float() - expected.float()).abs().max() / expected.float().abs().max()).item()


# The fixture models as the pipeline, the Python API and the CLI take them


@pytest.fixture(scope="session")
def model_files(fixtures) -> dict:
    """The four fixture model files as `CCLDPipeline.from_files` keyword arguments."""
    return {"unet": fixtures / "unet.ckpt", "autoencoder": fixtures / "autoencoder.ckpt",
            "cloob": fixtures / "cloob.pkl", "cloob_config": fixtures / "cloob.json"}


@pytest.fixture(scope="session")
def model_flags(model_files) -> list[str]:
    """The same files as `ccld generate` options: --unet ... --cloob-config ..."""
    return [arg for key, path in model_files.items()
            for arg in (f"--{key.replace('_', '-')}", str(path))]


@pytest.fixture(scope="session")
def fixture_pipeline(model_files):
    """One fp32 CPU pipeline of the fixture models, shared: tests must not change its settings
    (build your own from `model_files` to do that)."""
    from ccld import CCLDPipeline

    return CCLDPipeline.from_files(**model_files)


# The converted-weights cache: one per test session ---------------------------------------------
# Loads during the tests convert into a fresh folder of the session's own, never the user's cache
# (subprocesses inherit it). Tests of the cache itself point CCLD_CACHE_DIR at their tmp_path.


@pytest.fixture(scope="session", autouse=True)
def session_weights_cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CCLD_CACHE_DIR", str(tmp_path_factory.mktemp("ccld_cache")))
        yield


# Web app: ports and stand-in pipelines ---------------------------------------------------------
# Shared by test_web.py and test_web_server.py (`from conftest import ...`, as max_rel_err is).
# The imports stay in this section so that it reads, and merges, as one piece.

import socket  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

from ccld.pipeline import DEFAULT_GUIDANCE, DEFAULT_METHOD, DEFAULT_STEPS, DEFAULT_STRENGTH  # noqa: E402


def free_port() -> int:
    """A loopback TCP port that nothing listens on at the moment."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def api_client(url: str, downloads):
    """A Gradio API client of the app at `url`, saving results under `downloads`, quietly and with
    no analytics."""
    from gradio_client import Client

    return Client(url, verbose=False, download_files=str(downloads), analytics_enabled=False)


class FakePipe:
    """Stands in for the pipeline where only the plumbing matters; counts overlapping calls.

    Its methods take what `CCLDPipeline`'s take, keyword-only past the prompts as there, so a
    positional call from the web app fails here as it would against the real pipeline.
    """

    def __init__(self, delay=0.0):
        self.delay = delay
        self.running = 0
        self.most_at_once = 0
        self.calls = 0
        self._lock = threading.Lock()

    def generate_latents(self, prompts=(), image_prompts=(), *, num_images=1, steps=DEFAULT_STEPS,
                         method=DEFAULT_METHOD, guidance=DEFAULT_GUIDANCE, seed=0, eta=0.0,
                         init_image=None, strength=DEFAULT_STRENGTH, size=256, callback=None):
        with self._lock:
            self.running += 1
            self.calls += 1
            self.most_at_once = max(self.most_at_once, self.running)
        try:
            for i in range(steps):
                time.sleep(self.delay / steps)
                if callback:
                    callback({"i": i})
            return torch.zeros(num_images, 4, size // 8, size // 8)
        finally:
            with self._lock:
                self.running -= 1

    def decode(self, latents):
        return torch.zeros(latents.shape[0], 3, latents.shape[2] * 8, latents.shape[3] * 8)

    def describe(self, prompts, image_prompts, *, num_images, steps, method, guidance, seed, eta,
                 init_image, strength, latent_scale, size) -> dict:
        return {"prompts": [list(p) for p in prompts], "seed": seed, "steps": steps,
                "num_images": num_images, "method": method,
                "image_prompts": [[p.label, p.weight] for p in image_prompts]}
