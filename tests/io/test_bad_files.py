"""Files of the wrong kind or with hostile contents: one line saying what the file is and which
flag wants it, never torch's advice to turn weights_only off, never a crash."""

import json
import pickle
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from ccld.apps.cli import main
from conftest import generate_with_files as run
from conftest import one_error_line


def one_line(capsys, *fragments):
    return one_error_line(capsys, fragments, never=("weights_only", "Traceback"))


def test_a_file_passed_to_the_wrong_flag_is_named_for_what_it_is(model_files, model_flags,
                                                                 tmp_path, capsys):
    shutil.copy(model_files["cloob"], tmp_path / "cloob.ckpt")
    assert run(model_flags, tmp_path, unet=tmp_path / "cloob.ckpt") == 2
    one_line(capsys, "a pickle of numpy arrays", "--cloob")
    assert "could run code" not in capsys.readouterr().err
    assert run(model_flags, tmp_path, cloob=model_files["unet"]) == 2
    one_line(capsys, "looks like a CCLD U-Net", "--unet")
    assert run(model_flags, tmp_path, unet=model_files["autoencoder"]) == 2
    one_line(capsys, "looks like an autoencoder", "--autoencoder")


def test_images_and_plain_pickles_under_checkpoint_names(model_flags, tmp_path, capsys):
    Image.new("RGB", (4, 4)).save(tmp_path / "picture.png")
    shutil.copy(tmp_path / "picture.png", tmp_path / "picture.ckpt")
    shutil.copy(tmp_path / "picture.png", tmp_path / "picture.pkl")
    (tmp_path / "plain.ckpt").write_bytes(pickle.dumps({"a": 1}))
    assert run(model_flags, tmp_path, unet=tmp_path / "picture.ckpt") == 2
    one_line(capsys, "picture.ckpt: a PNG image, not a PyTorch U-Net checkpoint")
    assert run(model_flags, tmp_path, cloob=tmp_path / "picture.pkl") == 2
    one_line(capsys, "picture.pkl: a PNG image, not a pickle")
    assert run(model_flags, tmp_path, unet=tmp_path / "plain.ckpt") == 2
    one_line(capsys, "plain.ckpt: not a readable U-Net checkpoint (a plain Python pickle")
    (tmp_path / "meta.json").write_text(json.dumps({"a": 1}))
    assert main(["info", str(tmp_path / "meta.json")]) == 2
    assert "download it again" not in one_line(capsys, "meta.json: JSON text")


def test_object_arrays_are_refused_while_unpickling(model_flags, tmp_path, capsys):
    from ccld.errors import CCLDError
    from ccld.io.checkpoints import load_array_pickle

    # an object array is built from pointers in the file: it must never be constructed
    built = []
    pickle.dump({"params": ({"x": {"w": np.array([1, "a"], dtype=object)}}, {})},
                open(tmp_path / "objects.pkl", "wb"))
    for dtype in ("U3", [("a", "f4")]):
        pickle.dump({"params": ({"x": {"w": np.zeros(2, dtype=dtype)}}, {})},
                    open(tmp_path / f"other-{len(built)}.pkl", "wb"))
        built.append(tmp_path / f"other-{len(built)}.pkl")
    with pytest.raises(CCLDError, match=r"array of type '\|O', not numbers"):
        load_array_pickle(tmp_path / "objects.pkl")
    for path in built:
        with pytest.raises(CCLDError, match="not numbers"):
            load_array_pickle(path)
    assert run(model_flags, tmp_path, cloob=tmp_path / "objects.pkl") == 2
    one_line(capsys, "objects.pkl: refused to load")


@pytest.mark.parametrize("leaf", ["a string", None])
def test_a_cloob_pickle_with_a_leaf_that_is_not_an_array(model_files, model_flags, tmp_path,
                                                         capsys, leaf):
    from ccld.io.checkpoints import load_array_pickle

    obj = load_array_pickle(model_files["cloob"])
    module = next(iter(obj["params"][1]))
    name = next(iter(obj["params"][1][module]))
    obj["params"][1][module][name] = leaf
    (tmp_path / "odd.pkl").write_bytes(pickle.dumps(obj))
    assert run(model_flags, tmp_path, cloob=tmp_path / "odd.pkl") == 2
    one_line(capsys, "odd.pkl", f"{module}/{name}", "not an array of numbers")


def test_a_state_dict_with_a_string_value(model_files, model_flags, tmp_path, capsys):
    sd = torch.load(model_files["unet"], weights_only=True)
    sd["mapping.0.main.0.bias"] = "oops"
    torch.save(sd, tmp_path / "stringy.ckpt")
    assert run(model_flags, tmp_path, unet=tmp_path / "stringy.ckpt") == 2
    one_line(capsys, "stringy.ckpt", "'mapping.0.main.0.bias' is a str, not a tensor")


@pytest.mark.parametrize("change,fragment", [
    ({"n_heads": 3}, "not divisible by its n_heads 3"),
    ({"patch_size": 0}, "image_encoder.patch_size is 0"),
    ({"patch_size": 5}, "not a multiple of its patch_size 5"),
    ({"n_layers": "two"}, "image_encoder.n_layers is 'two'"),
])
def test_cloob_configs_with_impossible_numbers(model_files, model_flags, tmp_path, capsys,
                                               change, fragment):
    config = json.loads(model_files["cloob_config"].read_text())
    config["image_encoder"].update(change)
    (tmp_path / "odd.json").write_text(json.dumps(config))
    assert run(model_flags, tmp_path, cloob_config=tmp_path / "odd.json") == 2
    one_line(capsys, "odd.json", fragment)


@pytest.mark.parametrize("change,fragment", [
    ({"base_channels": None}, "base_channels is None"),
    ({"embed_dim": "512"}, "embed_dim is '512'"),
    ({"channel_multipliers": [1, 1]}, "channel_multipliers is [1, 1]"),
])
def test_a_pipeline_folder_with_a_bad_unet_config(fixture_pipeline, tmp_path, capsys, change,
                                                  fragment):
    folder = fixture_pipeline.save_pretrained(tmp_path / "m")
    config = json.loads((folder / "unet" / "config.json").read_text())
    config.update(change)
    if change.get("base_channels", 0) is None:
        del config["base_channels"]
    (folder / "unet" / "config.json").write_text(json.dumps(config))
    assert main(["generate", "x", "--steps", "1", "-q", "--out", str(tmp_path / "o"),
                 "--model", str(folder)]) == 2
    one_line(capsys, "unet/config.json", fragment, "convert the model again")
