"""A pipeline folder's JSON configs as untrusted input: typed, bounded, and nested no deeper
than a cap, each refusal one line naming the file and the field."""

import json
import re
import shutil

import pytest

from ccld import CCLDError, CCLDPipeline
from ccld.apps.cli import main


@pytest.fixture(scope="module")
def folder(model_files, tmp_path_factory):
    path = tmp_path_factory.mktemp("pipeline") / "m"
    CCLDPipeline.from_files(**model_files).save_pretrained(path)
    return path


def changed(folder, tmp_path, name, change):
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    path = copy / name
    value = json.loads(path.read_text())
    path.write_text(change(value) if callable(change) else change)
    return copy


def edit(**fields):
    return lambda value: json.dumps({**value, **fields})


@pytest.mark.parametrize("name, change, message", [
    ("model_index.json", edit(latent_scale="abc"), "latent_scale must be a number above 0"),
    ("model_index.json", edit(latent_scale=0), "latent_scale must be a number above 0"),
    ("model_index.json", edit(latent_scale=-2.5), "latent_scale must be a number above 0"),
    ("model_index.json", "[1, 2, 3]", "a JSON list, not the pipeline index's object"),
    ("model_index.json", "[" * 5000 + "]" * 5000, "nested 5000 levels deep (at most 32)"),
    ("unet/config.json", edit(channel_multipliers=[]), "channel_multipliers is [], not a list"),
    ("unet/config.json", edit(base_channels=0), "base_channels is 0, not a whole number from 8"),
    ("unet/config.json", edit(base_channels=100000), "base_channels is 100000"),
    ("unet/config.json", edit(base_channels="abc"), "base_channels is 'abc'"),
    ("unet/config.json", edit(guidance_range=[8, "x"]), "guidance_range is [8, 'x']"),
    ("unet/config.json", '{"base_channels": 1' + "0" * 5000 + "}", "a number of 5001 digits"),
    ("unet/config.json", "not json", "not JSON"),
])
def test_a_bad_folder_config_is_named_by_file_and_field(folder, tmp_path, capsys, name, change,
                                                        message):
    copy = changed(folder, tmp_path, name, change)
    with pytest.raises(CCLDError, match=re.escape(message)):
        CCLDPipeline.from_pretrained(copy)
    assert main(["generate", "x", "--model", str(copy), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and name in err and "Traceback" not in err


def test_an_oversized_config_is_refused_before_it_is_read_whole(folder, tmp_path):
    copy = changed(folder, tmp_path, "unet/config.json", " " * (2 << 20) + "{}")
    with pytest.raises(CCLDError, match="more than 1 MiB, not a U-Net config"):
        CCLDPipeline.from_pretrained(copy)
