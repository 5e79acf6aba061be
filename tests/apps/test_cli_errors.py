"""Bad input: one line naming the problem and the fix, exit status 2, no traceback."""

import pickle
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from ccld.apps.cli import main


class _Planted:
    def __reduce__(self):
        import os
        return (os.system, ("touch PWNED",))


@pytest.fixture
def files(model_flags):
    return dict(zip(model_flags[::2], model_flags[1::2]))


def run(files, *args, **overrides):
    model_args = []
    for k, v in {**files, **overrides}.items():
        model_args += [k, str(v)]
    return main(["generate", "a castle", "--steps", "1", "-q", *args, *model_args])


def one_line_error(capsys, *fragments):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("ccld: error: ")
    for fragment in fragments:
        assert fragment in err[0], err[0]
    return err[0]


def test_missing_file(files, tmp_path, capsys):
    assert run(files, "--out", str(tmp_path), **{"--unet": tmp_path / "nope.ckpt"}) == 2
    one_line_error(capsys, "nope.ckpt", "no such U-Net checkpoint file", "ccld download")


def test_truncated_and_corrupt_checkpoints(files, fixtures, tmp_path, capsys):
    data = (fixtures / "unet.ckpt").read_bytes()
    (tmp_path / "cut.ckpt").write_bytes(data[:1000])
    assert run(files, "--out", str(tmp_path), **{"--unet": tmp_path / "cut.ckpt"}) == 2
    one_line_error(capsys, "cut.ckpt", "corrupt or truncated", "download it again")
    (tmp_path / "noise.ckpt").write_bytes(np.random.default_rng(0).bytes(5000))
    assert run(files, "--out", str(tmp_path), **{"--unet": tmp_path / "noise.ckpt"}) == 2
    one_line_error(capsys, "noise.ckpt", "not a readable")
    pkl = (fixtures / "cloob.pkl").read_bytes()
    (tmp_path / "cut.pkl").write_bytes(pkl[: len(pkl) // 2])
    assert run(files, "--out", str(tmp_path), **{"--cloob": tmp_path / "cut.pkl"}) == 2
    one_line_error(capsys, "cut.pkl", "corrupt or truncated")


def test_wrong_kinds(files, fixtures, capsys, tmp_path):
    assert run(files, "--out", str(tmp_path), **{"--unet": fixtures / "autoencoder.ckpt"}) == 2
    one_line_error(capsys, "autoencoder.ckpt", "not a CCLD U-Net checkpoint")
    assert run(files, "--out", str(tmp_path), **{"--autoencoder": fixtures / "unet.ckpt"}) == 2
    one_line_error(capsys, "unet.ckpt", "not an autoencoder checkpoint")
    assert run(files, "--out", str(tmp_path), **{"--cloob": fixtures / "unet.ckpt"}) == 2
    one_line_error(capsys, "unet.ckpt")


def test_shape_mismatch(files, fixtures, tmp_path, capsys):
    sd = torch.load(fixtures / "unet.ckpt", weights_only=True)
    sd["mapping.1.main.0.weight"] = sd["mapping.1.main.0.weight"][:10]
    torch.save(sd, tmp_path / "odd.ckpt")
    assert run(files, "--out", str(tmp_path), **{"--unet": tmp_path / "odd.ckpt"}) == 2
    one_line_error(capsys, "odd.ckpt", "do not fit")
    assert run(files, "--out", str(tmp_path), **{"--cloob-config": fixtures / "autoencoder.yaml"}) == 2
    one_line_error(capsys, "autoencoder.yaml")


def test_malicious_pickle_is_refused_and_runs_nothing(files, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with open(tmp_path / "cloob_evil.pkl", "wb") as f:
        pickle.dump({"params": (_Planted(), {})}, f)
    assert run(files, "--out", str(tmp_path), **{"--cloob": tmp_path / "cloob_evil.pkl"}) == 2
    one_line_error(capsys, "cloob_evil.pkl", "refused to load", "system")
    torch.save({"w": _Planted()}, tmp_path / "evil.ckpt")
    assert run(files, "--out", str(tmp_path), **{"--unet": tmp_path / "evil.ckpt"}) == 2
    one_line_error(capsys, "evil.ckpt", "refused to load")
    assert not (tmp_path / "PWNED").exists()


@pytest.mark.parametrize("spec,fragment", [("a castle:3x", "'3x' is not a number"),
                                           ("a castle:", "is not a number"),
                                           ("a castle:inf", "from -100 to 100 (got inf)")])
def test_bad_prompt_weight(files, tmp_path, capsys, spec, fragment):
    assert main(["generate", spec, "--out", str(tmp_path), "-q",
                 *[str(x) for kv in files.items() for x in kv]]) == 2
    one_line_error(capsys, fragment)


def test_odd_images_work_and_broken_ones_are_refused(files, tmp_path, capsys):
    gray16 = Image.fromarray(np.full((40, 70), 30000, dtype=np.uint16))
    gray16.save(tmp_path / "g16.png")
    Image.new("RGBA", (50, 50), (255, 0, 0, 128)).save(tmp_path / "rgba.png")
    Image.new("CMYK", (50, 90), (0, 255, 0, 0)).save(tmp_path / "cmyk.jpg")
    Image.new("L", (64, 64), 128).save(tmp_path / "gray.png")
    odd = [arg for name in ["g16.png", "rgba.png", "cmyk.jpg", "gray.png"]
           for arg in ("--image-prompt", str(tmp_path / name))]
    # all four as image prompts and one as the init image, in one run
    assert run(files, "--out", str(tmp_path / "o"), *odd, "--init-image", str(tmp_path / "cmyk.jpg"),
               "--strength", "0.5") == 0
    assert len(list((tmp_path / "o").glob("*.png"))) == 1
    capsys.readouterr()
    (tmp_path / "notes.png").write_text("not an image")
    assert run(files, "--out", str(tmp_path), "--image-prompt", str(tmp_path / "notes.png")) == 2
    one_line_error(capsys, "notes.png")
    assert run(files, "--out", str(tmp_path), "--init-image", str(tmp_path / "none.png")) == 2
    one_line_error(capsys, "none.png")


def test_bad_numbers(files, tmp_path, capsys):
    assert run(files, "--out", str(tmp_path), "-n", "0") == 2
    one_line_error(capsys, "-n must be a whole number from 1 to")
    assert run(files, "--out", str(tmp_path), "--init-image", str(tmp_path / "x.png"),
               "--strength", "1.5") == 2
    one_line_error(capsys)


def test_real_process_exit_code_and_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "ccld", "generate", "x", "--unet",
                           str(tmp_path / "missing.ckpt"), "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]


def test_convert_to_a_file_or_an_unwritable_place(files, tmp_path, capsys):
    (tmp_path / "taken").write_text("a file")
    argv = [x for kv in files.items() for x in kv]
    assert main(["convert", str(tmp_path / "taken"), *argv]) == 2
    one_line_error(capsys, "taken: a file, not a folder")
    assert main(["convert", str(tmp_path / "taken" / "model"), *argv]) == 2
    one_line_error(capsys, "is a file, not a folder")
    if sys.platform == "linux":  # /proc takes no new folders, not even from root
        assert main(["convert", "/proc/ccld-test/model", *argv]) == 2
        one_line_error(capsys, "/proc/ccld-test/model")


def test_python_api_mistakes_are_ccld_errors(model_files):
    from ccld import CCLDError, CCLDPipeline

    with pytest.raises(CCLDError, match=r"^unet=123: not a file path but int; pass"):
        CCLDPipeline.from_files(unet=123)
    with pytest.raises(CCLDError, match=r"^cloob_config=\[1\]: not a file path but list"):
        CCLDPipeline.from_files(cloob_config=[1])


def test_cloob_config_is_named_as_the_caller_names_it(model_files, files, tmp_path, capsys):
    """The README's from_files example on a CLOOB file whose config is not built in: the Python
    call hears of cloob_config=, the command of --cloob-config."""
    from ccld import CCLDError, CCLDPipeline

    python_call = {k: v for k, v in model_files.items() if k != "cloob_config"}
    with pytest.raises(CCLDError) as e:
        CCLDPipeline.from_files(**python_call)
    assert "pass cloob_config= (one of" in str(e.value) and "--" not in str(e.value)
    flags = [x for kv in files.items() if kv[0] != "--cloob-config" for x in kv]
    assert main(["generate", "a castle", "--out", str(tmp_path), *flags]) == 2
    message = one_line_error(capsys, "pass --cloob-config (one of")
    assert "cloob_config=" not in message


def test_no_prompt_asks_for_one_and_downloads_nothing(tmp_path, capsys, monkeypatch):
    def download(*args, **kwargs):
        raise AssertionError("a download started")

    monkeypatch.setattr("ccld.io.hub.hub_download", download)
    monkeypatch.setattr("ccld.io.hub.download_verified", download)
    assert main(["generate", "--out", str(tmp_path / "out"), "-q"]) == 2
    one_line_error(capsys, "nothing to paint from; give a prompt", "--image-prompt", "--init-image")
    assert not (tmp_path / "out").exists()


def test_a_failed_run_leaves_no_empty_output_folder(files, tmp_path, capsys):
    out = tmp_path / "new" / "out"
    assert run(files, "--out", str(out), **{"--unet": tmp_path / "nope.ckpt"}) == 2
    one_line_error(capsys, "nope.ckpt")
    assert not (tmp_path / "new").exists()
    (tmp_path / "file").write_text("")
    assert run(files, "--out", str(tmp_path / "file" / "out")) == 2
    one_line_error(capsys, "--out", "is a file, not a folder")


def test_a_colon_that_is_not_a_weight_is_said_to_be_text(files, tmp_path, capsys):
    from ccld.io.images import read_png_parameters

    assert main(["generate", "a tree:abc", "--steps", "1", "-q", "--out", str(tmp_path),
                 *[str(x) for kv in files.items() for x in kv]]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["ccld: note: 'a tree:abc' is all prompt text, at weight 3 ('abc' is not a "
                   "weight); to weight it, write TEXT:WEIGHT, e.g. 'a tree:3'"]
    assert read_png_parameters(tmp_path / "00000.png")["prompts"] == [["a tree:abc", 3.0]]


def test_help_says_each_default_once(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    text = capsys.readouterr().out
    assert "(default: None)" not in text
    options = re.split(r"\n(?=  -)", text)  # each option's lines start with "  -"
    assert len(options) > 20
    for option in options[1:]:
        assert option.count("(default") <= 1, option
