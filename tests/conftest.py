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


# Training data and models shared by the training and distillation tests
#
# Built once per session: the tests only read them. The imports are local to keep this section
# self-contained (and `ccld.cli` unloaded for the tests that never need it).

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
    from ccld.cli import main

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
