"""An autoencoder's yaml and config.json as untrusted input: no aliases (a "billion laughs"
yaml expands without bound), bounded nesting, and every size typed and bounded, each refusal one
line naming the file and the field."""

import json
import re
import shutil

import pytest

from ccld import CCLDError
from ccld.apps.cli import main
from ccld.models.autoencoder import load_autoencoder, read_autoencoder_config

LAUGHS = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, "
    f"*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, "
    f"*{chr(97 + i)}]\n" for i in range(9))


@pytest.fixture
def yaml_text(fixtures):
    return (fixtures / "autoencoder.yaml").read_text()


@pytest.mark.parametrize("change, message", [
    (lambda t: LAUGHS + t, "uses yaml aliases (*a), which ccld does not expand"),
    (lambda t: "deep: " + "[" * 40 + "]" * 40 + "\n" + t, "nested more than 16 levels deep"),
    (lambda t: t.replace("ch: 32", "ch: abc"), "ddconfig.ch is 'abc', not a whole number"),
    (lambda t: t.replace("ch_mult: [ 1,2,4,4 ]", "ch_mult: []"), "ddconfig.ch_mult is []"),
    (lambda t: t.replace("num_res_blocks: 1", "num_res_blocks: 100000"),
     "ddconfig.num_res_blocks is 100000, not a whole number from 1 to 16"),
    (lambda t: t.replace("z_channels: 4", "z_channels: -4"), "ddconfig.z_channels is -4"),
    (lambda t: "- a list\n- not a config\n", "not an LDM autoencoder config"),
    (lambda t: t + "#" * (70 << 10), "more than 64 KiB, not an autoencoder config"),
])
def test_a_bad_autoencoder_yaml_is_one_line(yaml_text, fixtures, tmp_path, capsys, change, message):
    bad = tmp_path / "ae.yaml"
    bad.write_text(change(yaml_text))
    with pytest.raises(CCLDError, match=re.escape(message)):
        read_autoencoder_config(bad)
    status = main(["generate", "x", "--out", str(tmp_path / "o"), "--unet", str(fixtures / "unet.ckpt"),
                   "--autoencoder", str(fixtures / "autoencoder.ckpt"), "--autoencoder-config", str(bad),
                   "--cloob", str(fixtures / "cloob.pkl"), "--cloob-config", str(fixtures / "cloob.json")])
    err = capsys.readouterr().err.strip()
    assert status == 2 and err.count("\n") == 0 and "ae.yaml" in err and "Traceback" not in err


def test_the_fixture_yaml_still_reads(fixtures):
    assert read_autoencoder_config(fixtures / "autoencoder.yaml")["ddconfig"]["ch"] == 32


@pytest.mark.parametrize("fields, message", [
    ({"norm_num_groups": 0}, "norm_num_groups is 0, not a whole number from 1 to 1024"),
    ({"block_out_channels": [], "down_block_types": [], "up_block_types": []},
     "block_out_channels is [], not a list of 1 to 8"),
    ({"layers_per_block": "2"}, "layers_per_block is '2'"),
    ({"block_out_channels": [30, 64, 128, 128]}, "are not all multiples of norm_num_groups"),
])
def test_a_bad_autoencoder_folder_config_is_named(fixtures, tmp_path, fields, message):
    folder = tmp_path / "vae"
    load_autoencoder(fixtures / "autoencoder.ckpt", fixtures / "autoencoder.yaml").save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **fields}))
    with pytest.raises(CCLDError, match=re.escape(message)):
        load_autoencoder(folder)
    shutil.rmtree(folder)


@pytest.mark.parametrize("change, message", [
    (lambda c: {**c, "image_encoder": {**c["image_encoder"], "n_layers": 10_000_000}},
     "image_encoder.n_layers is 10000000; it must be a whole number from 1 to 128"),
    (lambda c: {**c, "d_embed": "abc"}, "d_embed is 'abc'"),
    (lambda c: {**c, "text_encoder": {**c["text_encoder"], "vocab_size": -1}},
     "text_encoder.vocab_size is -1"),
])
def test_a_bad_cloob_config_is_named_before_anything_is_built(fixtures, tmp_path, change, message):
    from ccld.models.cloob import resolve_cloob_config

    bad = tmp_path / "cloob.json"
    bad.write_text(json.dumps(change(json.loads((fixtures / "cloob.json").read_text()))))
    with pytest.raises(CCLDError, match=re.escape(message)):
        resolve_cloob_config(bad)


def test_a_deeply_nested_cloob_config_is_one_line(tmp_path):
    from ccld.models.cloob import resolve_cloob_config

    bad = tmp_path / "cloob.json"
    bad.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(CCLDError, match=r"cloob\.json: not valid JSON \(nested 100000 levels"):
        resolve_cloob_config(bad)
