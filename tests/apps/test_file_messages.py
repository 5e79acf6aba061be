"""Wrong files and failed writes get one line that says what the file is and what to do."""

import errno

import pytest
import torch

from ccld.apps.cli import main
from ccld.errors import CCLDError
from ccld.io.files import atomic_write


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


def test_info_on_a_config_file_says_it_is_one_and_where_it_goes(fixtures, capsys):
    assert main(["info", str(fixtures / "autoencoder.yaml")]) == 2
    line = error_line(capsys)
    assert "a config file, not a checkpoint" in line and "--autoencoder-config" in line
    assert "download" not in line


def test_a_device_as_a_checkpoint_is_not_a_regular_file(capsys):
    assert main(["info", "/dev/null"]) == 2
    assert "/dev/null: not a regular file (a device, pipe or socket)" in error_line(capsys)


def test_half_a_unet_is_called_incomplete_once(fixtures, tmp_path, capsys, model_flags):
    sd = torch.load(fixtures / "unet.ckpt", weights_only=True)
    sd = sd.get("state_dict", sd)
    half = tmp_path / "half.ckpt"
    torch.save(dict(list(sd.items())[:len(sd) // 2]), half)
    assert main(["generate", "x", "--unet", str(half), "--steps", "1", "-q",
                 "--out", str(tmp_path / "out"), *_without_unet(model_flags)]) == 2
    line = error_line(capsys)
    assert "an incomplete CCLD U-Net" in line and "of its" in line
    assert "not a CCLD U-Net" not in line and "looks like" not in line


def _without_unet(flags: list[str]) -> list[str]:
    kept, skip = [], False
    for flag in flags:
        if skip:
            skip = False
            continue
        if flag == "--unet":
            skip = True
            continue
        if not flag.startswith("--unet="):
            kept.append(flag)
    return kept


@pytest.mark.parametrize("code, fix", [(errno.ENOSPC, "free some space on that disk"),
                                       (errno.EROFS, "the disk is read-only"),
                                       (errno.EACCES, "check that the folder exists")])
def test_a_failed_write_names_the_fix_its_cause_needs(tmp_path, code, fix):
    def fails(f):
        raise OSError(code, "simulated")

    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with pytest.raises(CCLDError, match=fix):
        atomic_write(target, fails, "test file")
    assert target.read_bytes() == b"old" and list(tmp_path.iterdir()) == [target]


def test_cache_clear_removes_a_linked_entry_and_not_what_it_points_to(tmp_path, monkeypatch,
                                                                     capsys):
    from ccld.io.weights_cache import clear_converted

    monkeypatch.setenv("CCLD_CACHE_DIR", str(tmp_path / "cache"))
    converted = tmp_path / "cache" / "converted"
    converted.mkdir(parents=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("mine")
    (converted / "linked").symlink_to(elsewhere)
    (converted / "real").mkdir()
    (converted / "real" / "weights.safetensors").write_bytes(b"x" * 10)
    removed, freed = clear_converted()
    assert removed == 2 and freed == 10 and list(converted.iterdir()) == []
    assert (elsewhere / "keep.txt").read_text() == "mine"


def test_a_long_prompt_warning_is_one_line_without_code(tmp_path, capsys, model_flags):
    assert main(["generate", "a very long prompt " * 40, "--steps", "1", "-q",
                 "--out", str(tmp_path / "out"), *model_flags]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    warned = [line for line in err if "longer than the text encoder" in line]
    assert len(warned) == 1 and warned[0].startswith("ccld: warning: prompt ")
    assert not any("warnings.warn" in line or line.startswith("  ") for line in err)
