"""Shared test fixtures: the reference models and outputs in ../shared/fixtures."""

import atexit
import os
import shutil
import socket
import tempfile
import threading
import time
from pathlib import Path

# No test touches the user's caches: every cache this session's code and subprocesses could
# write (ccld's converted weights, the Hugging Face hub's, torch's, XDG's) is a folder of the
# session's own, set before anything reads it (huggingface_hub reads its at import, the launch
# environment below copies os.environ).
SESSION_CACHES = Path(tempfile.mkdtemp(prefix="ccld-test-caches-"))
atexit.register(shutil.rmtree, SESSION_CACHES, ignore_errors=True)
for _variable, _folder in {"CCLD_CACHE_DIR": "ccld", "HF_HOME": "huggingface",
                           "XDG_CACHE_HOME": "xdg", "TORCH_HOME": "torch"}.items():
    os.environ[_variable] = str(SESSION_CACHES / _folder)
os.environ.pop("HF_HUB_CACHE", None)  # (it would win over HF_HOME)
# The suite runs in one worker process per core (pytest-xdist, pyproject's addopts), each torch
# single-threaded, as are the processes the tests start: the fixture nets are small, and a
# second thread per worker would only spin against the other workers.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import huggingface_hub.constants as hf_constants  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from ccld.pipeline import sampling_defaults  # noqa: E402
from ccld.settings import Settings  # noqa: E402

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"


@pytest.fixture(scope="session")
def fixtures() -> Path:
    if not (FIXTURES / "README.md").is_file():
        pytest.skip(f"reference fixtures not found at {FIXTURES}; put the shared folder beside "
                    "the repo (../shared/fixtures) to run the numerical tests")
    return FIXTURES


# The Hugging Face hub, as a pre-filled offline cache: the real download code, no network

@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """An offline Hugging Face cache in tmp_path; returns a function that puts a file in it."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    cache = tmp_path / "hf" / "hub"
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)

    def put(repo_id, filename, data: bytes):
        repo = cache / f"models--{repo_id.replace('/', '--')}"
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / "main").write_text(commit)
        snap = repo / "snapshots" / commit
        snap.mkdir(parents=True, exist_ok=True)
        (snap / filename).write_bytes(data)
        return snap / filename
    return put


# Training data and models shared by the training and distillation tests
#
# Built once per session: the tests only read them. The imports are local to keep this section
# self-contained (and `ccld.apps.cli` unloaded for the tests that never need it).

QUIET = ["--demo-every", "0", "--num-workers", "0", "--no-tensorboard"]  # nothing but the run


@pytest.fixture
def one_thread():
    # tiny nets on a small shared machine: a second thread costs more than it gives
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def image_sources(tmp_path_factory) -> dict:
    """8 distinct small images of several sizes in a folder with a subfolder, one corrupt PNG
    beside them, a path list of the good ones, and a WikiArt-layout parquet of all of them (the
    corrupt one last; None without pyarrow): {"folder", "list", "parquet"}."""
    import numpy as np
    from PIL import Image

    root = tmp_path_factory.mktemp("images")
    images = root / "images"
    (images / "more").mkdir(parents=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(8):
        w, h = (80, 64) if i % 2 else (64, 96)
        blocks = rng.integers(0, 256, size=(h // 8, w // 8, 3), dtype=np.uint8)
        path = images / ("more" if i >= 4 else "") / f"painting{i}.png"
        Image.fromarray(blocks).resize((w, h), Image.NEAREST).save(path)
        paths.append(path)
    corrupt = images / "corrupt.png"
    corrupt.write_bytes(paths[0].read_bytes()[:60])  # a PNG cut short
    path_list = root / "train.txt"
    path_list.write_text("\n".join(str(p.relative_to(root)) for p in paths) + "\n\n")
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        return {"folder": images, "list": path_list, "parquet": None}
    rows = [{"bytes": p.read_bytes(), "path": p.name} for p in paths]
    rows.append({"bytes": b"not an image", "path": "broken.jpg"})
    table = pa.table({"image": rows, "artist": list(range(len(rows))),
                      "genre": [3] * len(rows), "style": [7] * len(rows)})
    parquet = root / "wikiart" / "data" / "train-00000-of-00001.parquet"
    parquet.parent.mkdir(parents=True)
    pq.write_table(table, parquet, row_group_size=3)
    return {"folder": images, "list": path_list, "parquet": parquet}


@pytest.fixture(scope="session")
def narrow_autoencoder(fixtures, tmp_path_factory) -> Path:
    """The fixture autoencoder with its posterior log-variance lowered by 14, so that, like the
    released KL-f8 model (and unlike random weights), the latents are mostly signal."""
    import shutil

    folder = tmp_path_factory.mktemp("narrow_autoencoder")
    ckpt = torch.load(fixtures / "autoencoder.ckpt", weights_only=True)
    ckpt["state_dict"]["quant_conv.bias"][4:] -= 14
    torch.save(ckpt, folder / "narrow.ckpt")
    shutil.copy(fixtures / "autoencoder.yaml", folder / "narrow.yaml")
    return folder / "narrow.ckpt"


def encoder_options(autoencoder: Path, fixtures: Path) -> list[str]:
    """The command line options of an autoencoder and the fixture CLOOB."""
    return ["--autoencoder", str(autoencoder), "--cloob", str(fixtures / "cloob.pkl"),
            "--cloob-config", str(fixtures / "cloob.json")]


@pytest.fixture(scope="session")
def latent_cache(image_sources, narrow_autoencoder, fixtures, tmp_path_factory) -> Path:
    """The 8 readable images of the folder, encoded at 64px by `ccld encode-dataset` with the
    narrow autoencoder: what the training and distillation runs train on."""
    from ccld.apps.cli import main

    out = tmp_path_factory.mktemp("latents") / "cache"
    assert main(["encode-dataset", "--data", str(image_sources["folder"]), "--out", str(out),
                 "--image-size", "64", "--num-workers", "0", "-q",
                 *encoder_options(narrow_autoencoder, fixtures)]) == 0
    return out


def state(path: Path) -> dict:
    """A checkpoint as `torch.load(weights_only=True)` reads it: tensors and plain values."""
    return torch.load(path, map_location="cpu", weights_only=True)


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


def generate_with_files(model_flags, tmp_path, *extra, **swap) -> int:
    """`ccld generate` on the fixture models with some of their files swapped (by option name:
    unet=PATH, cloob=PATH, ...) and `extra` options."""
    from ccld.apps.cli import main

    flags = dict(zip(model_flags[::2], model_flags[1::2]))
    flags.update({f"--{k.replace('_', '-')}": str(v) for k, v in swap.items()})
    return main(["generate", "a castle", "--steps", "1", "-q", "--out", str(tmp_path / "out"),
                 *extra, *[x for kv in flags.items() for x in kv]])


def one_error_line(capsys, fragments, never=("Traceback",)) -> str:
    """The one line the command wrote to stderr, holding every fragment and none of `never`."""
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    for fragment in fragments:
        assert fragment in err[0], err[0]
    assert not any(word in err[0] for word in never), err[0]
    return err[0]


@pytest.fixture(scope="session")
def fixture_pipeline(model_files):
    """One fp32 CPU pipeline of the fixture models, shared: tests must not change its settings
    (build your own from `model_files` to do that)."""
    from ccld import CCLDPipeline

    return CCLDPipeline.from_files(**model_files)


# The converted-weights cache: the session's own (SESSION_CACHES), inherited by subprocesses;
# tests of the cache itself point CCLD_CACHE_DIR at their tmp_path.


@pytest.fixture(autouse=True)
def cache_writes_finish_with_their_test():
    """A test's background cache writes end with it, never inside a later test (whose tmp_path
    or CCLD_CACHE_DIR they would not belong to)."""
    yield
    from ccld.io.weights_cache import finish_writes

    finish_writes()

# Several processes, as `accelerate launch` starts them (the training and batch tests)


def accelerate_launch(*options: str) -> list[str]:
    """The start of an `accelerate launch` command line, with everything it would ask about.
    `--multi_gpu --num_processes 2` is the working two-process CPU form: Accelerate's torchrun
    launcher starts both, and with no GPU they talk through gloo (`--cpu --num_processes 2`
    would need MPI)."""
    import sys

    accelerate = Path(sys.executable).parent / "accelerate"
    if not accelerate.is_file():
        pytest.skip("the accelerate launcher is not installed beside this Python")
    return [str(accelerate), "launch", *options, "--num_machines", "1", "--mixed_precision", "no",
            "--dynamo_backend", "no", "--main_process_port", str(free_port())]


LAUNCH_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
              "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


# Web app: ports and stand-in pipelines
# Shared by test_web.py and test_web_server.py (`from conftest import ...`, as max_rel_err is).


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

    def __init__(self, delay=0.0, tiny_decoder=None):
        self.delay = delay
        self.tiny_decoder = tiny_decoder  # anything but None: previews, as with a real one
        self.decoded_by = []  # "tiny", "linear" (previews) or "full", one entry per decode
        self.running = 0
        self.most_at_once = 0
        self.calls = 0
        self._lock = threading.Lock()

    @staticmethod
    def _settings(prompts, image_prompts, settings, options) -> Settings:
        """The settings as the real pipeline resolves them for a plain model."""
        return Settings.build(prompts, image_prompts, base=settings,
                              **options).resolved(sampling_defaults({}))

    def generate_latents(self, prompts=None, image_prompts=None, *, settings=None, callback=None,
                         **options):
        settings = self._settings(prompts, image_prompts, settings, options)
        with self._lock:
            self.running += 1
            self.calls += 1
            self.most_at_once = max(self.most_at_once, self.running)
        try:
            latents = torch.zeros(settings.num_images, 4, settings.height // 8, settings.width // 8)
            for i in range(settings.steps):
                time.sleep(self.delay / settings.steps)
                if callback:
                    callback({"i": i, "t": 1 - i / settings.steps, "x": latents, "pred": latents})
            return latents
        finally:
            with self._lock:
                self.running -= 1

    def decode(self, latents, latent_scale=None, *, full_decoder=False):
        tiny = self.tiny_decoder is not None and not full_decoder
        self.decoded_by.append("tiny" if tiny else "full")
        return torch.zeros(latents.shape[0], 3, latents.shape[2] * 8, latents.shape[3] * 8)

    def preview(self, latents, latent_scale=None):
        self.decoded_by.append("tiny" if self.tiny_decoder is not None else "linear")
        return torch.zeros(latents.shape[0], 3, latents.shape[2] * 8, latents.shape[3] * 8)

    def describe(self, prompts=None, image_prompts=None, *, settings=None, **options) -> dict:
        settings = self._settings(prompts, image_prompts, settings, options)
        tiny = self.tiny_decoder is not None and not settings.full_decoder
        return {**settings.to_dict(), "decoder": "tiny" if tiny else "full"}


def pytest_collection_modifyitems(items):
    """The docs' pages first: they run in the background of one worker (tests/project/
    test_docs.py) for about two minutes, which the other tests then overlap instead of trail."""
    items.sort(key=lambda item: "test_snippet_runs" not in item.nodeid)
