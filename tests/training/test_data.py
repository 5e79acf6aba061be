"""Training data: image folders, path lists and WikiArt-layout parquet, preprocessing, sharding,
and the latent cache written by `ccld encode-dataset`."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from ccld.apps.cli import main
from ccld.errors import CCLDError
from ccld.training.data import (
    ImageDataset,
    ShardedStream,
    open_image_source,
    open_training_data,
    prepare_pixels,
    sample_posterior,
)
from conftest import encoder_options


def readable(source) -> list[bool]:
    ok = []
    for i in range(len(source)):
        try:
            ok.append(source.read(i).mode == "RGB")
        except CCLDError as e:
            assert "\n" not in str(e)
            ok.append(False)
    return ok


def test_folder_is_searched_recursively_in_a_stable_order(image_sources):
    source = open_image_source(image_sources["folder"])
    names = [source.name(i) for i in range(len(source))]
    assert len(names) == 9 and names == sorted(names)
    assert str(image_sources["folder"] / "more" / "painting7.png") in names
    assert sum(readable(source)) == 8  # the corrupt PNG is found but cannot be read


def test_path_list_resolves_relative_paths_and_skips_blank_lines(image_sources):
    source = open_image_source(image_sources["list"])
    assert len(source) == 8 and all(readable(source))
    assert Path(source.name(0)).is_absolute()


def parquet(image_sources) -> Path:
    if image_sources["parquet"] is None:
        pytest.skip("pyarrow is not installed (pip install 'ccld[train]')")
    return image_sources["parquet"]


def test_wikiart_parquet_file_and_folder(image_sources):
    parquet(image_sources)
    by_file = open_image_source(image_sources["parquet"])
    by_folder = open_image_source(image_sources["parquet"].parents[1])  # found below data/
    assert len(by_file) == len(by_folder) == 9
    assert readable(by_file) == [True] * 8 + [False]
    assert np.array_equal(np.asarray(by_file.read(5)),
                          np.asarray(open_image_source(image_sources["list"]).read(5)))


def test_hub_dataset_id_reads_the_downloaded_parquet(image_sources, monkeypatch):
    import huggingface_hub

    parquet(image_sources)

    calls = []

    def fake_snapshot_download(repo_id, repo_type, allow_patterns):
        calls.append((repo_id, repo_type))
        return str(image_sources["parquet"].parents[1])

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    assert len(open_image_source("huggan/wikiart")) == 9
    assert calls == [("huggan/wikiart", "dataset")]

    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(CCLDError, match="could not get the dataset huggan/wikiart"):
        open_image_source("huggan/wikiart")


def test_bad_sources_are_one_line_errors(tmp_path, image_sources):
    parquet(image_sources)
    (tmp_path / "empty").mkdir()
    table = pytest.importorskip("pyarrow").table({"pixels": [b"x"]})
    pytest.importorskip("pyarrow.parquet").write_table(table, tmp_path / "other.parquet")
    cases = [(tmp_path / "missing", "no such file or folder"),
             (tmp_path / "empty", "no images"),
             (tmp_path / "other.parquet", "no 'image' column"),
             (image_sources["folder"] / "painting0.png", "a single image")]
    for spec, message in cases:
        with pytest.raises(CCLDError, match=message) as e:
            open_image_source(spec)
        assert "\n" not in str(e.value)


def test_training_images_drop_alpha_as_the_reference_does(tmp_path):
    from PIL import Image

    from ccld.training.data import decode_image_bytes

    (tmp_path / "images").mkdir()
    Image.new("RGBA", (8, 8), (200, 30, 0, 0)).save(tmp_path / "images" / "clear.png")
    from_folder = open_image_source(tmp_path / "images").read(0)
    from_bytes = decode_image_bytes((tmp_path / "images" / "clear.png").read_bytes(), "clear")
    for image in (from_folder, from_bytes):  # colour kept, not composited on white
        assert image.mode == "RGB" and image.getpixel((3, 3)) == (200, 30, 0)


def test_reference_preprocessing_and_skipping(image_sources):
    image = open_image_source(image_sources["list"]).read(1)  # 80x64
    pixels = prepare_pixels(image, 64)
    assert pixels.shape == (3, 64, 64) and 0 <= pixels.min() and pixels.max() <= 1
    dataset = ImageDataset(open_image_source(image_sources["folder"]), 64)
    names = [Path(dataset.source.name(i)).name for i in range(len(dataset))]
    corrupt = names.index("corrupt.png")
    item = dataset[corrupt]  # replaced by the next readable image, and counted
    assert item["skipped"] == 1
    assert torch.equal(item["pixels"], dataset[corrupt + 1]["pixels"])


def test_sharded_stream_splits_epochs_without_overlap_and_resumes():
    streams = [ShardedStream(10, rank, 3, seed=5) for rank in range(3)]
    firsts = [list(s.epoch_indices(0)) for s in streams]
    flat = sum(firsts, [])
    assert len(flat) == 9 and len(set(flat)) == 9  # 10 % 3 left out, no item twice
    assert list(streams[0].epoch_indices(1)) != firsts[0]  # reshuffled every epoch
    it = iter(ShardedStream(10, 1, 3, seed=5))
    whole = [next(it) for _ in range(8)]
    it = iter(ShardedStream(10, 1, 3, seed=5, start=5))
    assert [next(it) for _ in range(3)] == whole[5:]
    with pytest.raises(CCLDError):
        ShardedStream(2, 0, 3)


def test_sharded_stream_keeps_read_blocks_together_and_resumes():
    blocks = np.repeat(np.arange(6), [5, 3, 4, 4, 2, 6])  # 24 items in 6 parquet row groups
    streams = [ShardedStream(24, rank, 2, seed=1, blocks=blocks) for rank in range(2)]
    orders = []
    for epoch in range(3):
        parts = [s.epoch_indices(epoch).tolist() for s in streams]
        assert sorted(sum(parts, [])) == list(range(24))  # every item once, shared out
        for part in parts:  # each row group in one run: read once by each process
            runs = 1 + int(np.count_nonzero(np.diff(blocks[part])))
            assert runs == len(set(blocks[part].tolist())), blocks[part]
        orders.append(parts[0])
    assert orders[0] != orders[1] != orders[2]  # reshuffled every epoch, blocks and items
    it = iter(streams[1])
    whole = [next(it) for _ in range(30)]
    it = iter(ShardedStream(24, 1, 2, seed=1, start=17, blocks=blocks))
    assert [next(it) for _ in range(13)] == whole[17:]


def test_parquet_row_groups_are_decoded_once_per_epoch(fixtures, image_sources, tmp_path,
                                                       monkeypatch, capsys):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    images = sorted(Path(image_sources["folder"]).rglob("painting*.png")) * 2
    table = pa.table({"image": [{"bytes": p.read_bytes(), "path": p.name} for p in images]})
    pq.write_table(table, tmp_path / "art.parquet", row_group_size=4)  # 16 rows, 4 row groups
    reads = []
    read_row_group = pq.ParquetFile.read_row_group

    def counted(self, i, *args, **kwargs):
        reads.append(i)
        return read_row_group(self, i, *args, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "read_row_group", counted)
    # 4 batches of 4: one shuffled epoch of the 16 rows
    assert main(["autoencoder-scale", "--data", str(tmp_path / "art.parquet"), "--image-size",
                 "64", "--batches", "4", "--batch-size", "4", "--num-workers", "0",
                 *encoder_args(fixtures)]) == 0
    float(capsys.readouterr().out)
    assert sorted(reads) == [0, 1, 2, 3], reads


def test_posterior_sample_clamps_logvar_like_ldm():
    mean = torch.zeros(2, 4, 2, 2)
    noise = torch.ones_like(mean)
    assert torch.allclose(sample_posterior(mean, torch.full_like(mean, 50.0), noise),
                          torch.full_like(mean, float(np.exp(10.0))))
    assert torch.allclose(sample_posterior(mean + 1, torch.full_like(mean, -4.0), noise),
                          torch.full_like(mean, 1 + float(np.exp(-2.0))))


def test_autoencoder_scale_is_the_std_of_posterior_samples():
    from torch.utils.data import Dataset

    from ccld.training.commands import make_accelerator
    from ccld.training.data import TrainingData
    from ccld.training.encode import estimate_autoencoder_scale

    class Latents(Dataset):  # posterior means of std 2 around 1, posterior std 1.5
        def __init__(self):
            self.means = torch.randn(64, 4, 4, 4, generator=torch.Generator().manual_seed(0)) * 2 + 1

        def __len__(self):
            return 64

        def __getitem__(self, i):
            return {"mean": self.means[i], "logvar": torch.full([4, 4, 4], 2 * np.log(1.5)),
                    "embed": torch.zeros(8)}

    data = TrainingData(Latents(), (4, 4, 4), "synthetic latents", True)
    scale = estimate_autoencoder_scale(data, make_accelerator(), batches=16, batch_size=16)
    assert scale == pytest.approx((4 + 1.5 ** 2) ** 0.5, rel=0.05)


def encoder_args(fixtures):
    return encoder_options(fixtures / "autoencoder.ckpt", fixtures)  # the plain fixture model


def test_encode_dataset_writes_resumable_shards(fixtures, image_sources, tmp_path, capsys):
    parquet(image_sources)
    from ccld.models.autoencoder import encode_moments, load_autoencoder
    from ccld.models.cloob import load_cloob

    out = tmp_path / "cache"

    def encode(shard_size=4):
        return main(["encode-dataset", "--data", str(image_sources["parquet"]), "--out", str(out),
                     "--image-size", "64", "--shard-size", str(shard_size), "--batch-size", "3",
                     "--num-workers", "0", "-q", *encoder_args(fixtures)])

    assert encode() == 0
    index = json.loads((out / "index.json").read_text())
    assert index["complete"] and index["num_shards"] == 3 and index["num_encoded"] == 8
    assert [s["item"] for s in index["skipped"]] == [8]  # the corrupt row, counted
    assert "1 unreadable images skipped" in capsys.readouterr().out

    # the cache holds the encoders' outputs for the reference preprocessing
    data = open_training_data(out)
    assert data.cached and data.num_items == 8 and data.latent_shape == (4, 8, 8)
    source = open_image_source(image_sources["parquet"])
    pixels = prepare_pixels(source.read(5), 64)[None]
    ae = load_autoencoder(fixtures / "autoencoder.ckpt")
    cloob = load_cloob(fixtures / "cloob.pkl", fixtures / "cloob.json")
    mean, logvar = encode_moments(ae, pixels * 2 - 1)
    item = data.dataset[5]
    assert torch.allclose(item["mean"], mean[0], atol=1e-5)
    assert torch.allclose(item["logvar"], logvar[0], atol=1e-5)
    assert torch.allclose(item["embed"], cloob.encode_image(pixels)[0], atol=1e-5)  # 64px CLOOB

    # an interrupted run: the missing shard is encoded again, finished ones are kept
    finished = out / "shard-000000.safetensors"
    before = finished.stat().st_mtime_ns
    (out / "shard-000001.safetensors").unlink()
    assert encode() == 0
    assert finished.stat().st_mtime_ns == before
    assert json.loads((out / "index.json").read_text())["shards"] == index["shards"]

    # the latent scale of the cached data, as `ccld autoencoder-scale` measures it
    capsys.readouterr()
    assert main(["autoencoder-scale", "--data", str(out), "--batches", "8", "--batch-size", "4",
                 "--num-workers", "0"]) == 0
    measured = float(capsys.readouterr().out.strip())
    means = torch.stack([data.dataset[i]["mean"] for i in range(8)])
    logvars = torch.stack([data.dataset[i]["logvar"] for i in range(8)])
    assert measured == pytest.approx((means.var() + logvars.exp().mean()).sqrt().item(), rel=0.1)

    # the same folder with other settings is refused, not mixed
    assert encode(shard_size=5) == 2
    assert "different shard_size" in capsys.readouterr().err


def test_commands_print_info_on_stdout_and_warnings_on_stderr_once(fixtures, image_sources, capsys):
    # two commands in one Python process: the console handlers are not added twice
    runs = []
    for _ in range(2):
        assert main(["autoencoder-scale", "--data", str(image_sources["folder"]), "--image-size", "64",
                     "--batches", "2", "--batch-size", "8", "--num-workers", "0",
                     *encoder_args(fixtures)]) == 0
        runs.append(capsys.readouterr())
    assert runs[0] == runs[1]
    out, err = runs[0]
    float(out)  # the measured scale alone
    warnings = err.splitlines()
    assert warnings and all(w.startswith("ccld: warning: skipping an unreadable image: ")
                            and "corrupt.png" in w for w in warnings), err


def test_autoencoder_scale_of_images_never_fetches_cloob(fixtures, image_sources, monkeypatch,
                                                        capsys):
    from ccld.io import hub

    def offline(*args, **kwargs):
        raise CCLDError("could not download CLOOB: the network is unreachable")

    monkeypatch.setattr(hub, "download_cloob", offline)  # it measures the autoencoder alone
    assert main(["autoencoder-scale", "--data", str(image_sources["list"]), "--image-size", "64",
                 "--batches", "1", "--batch-size", "4", "--num-workers", "0",
                 "--autoencoder", str(fixtures / "autoencoder.ckpt")]) == 0
    float(capsys.readouterr().out)


def test_only_the_main_process_speaks(capsys):
    import logging

    from ccld.training.logs import setup_logging

    logger = logging.getLogger("ccld.training.test")
    try:
        setup_logging(main_process=False)
        logger.warning("from another process")
        assert capsys.readouterr() == ("", "")
    finally:
        setup_logging(main_process=True)
    logger.info("ccld: from the main process")
    assert capsys.readouterr() == ("ccld: from the main process\n", "")


def test_incomplete_cache_is_refused(fixtures, image_sources, tmp_path):
    out = tmp_path / "cache"
    assert main(["encode-dataset", "--data", str(image_sources["list"]), "--out", str(out),
                 "--image-size", "64", "--shard-size", "4", "--num-workers", "0", "-q",
                 *encoder_args(fixtures)]) == 0
    index = json.loads((out / "index.json").read_text())
    index["complete"] = False
    (out / "index.json").write_text(json.dumps(index))
    with pytest.raises(CCLDError, match="incomplete"):
        open_training_data(out)
    shutil.rmtree(out)
