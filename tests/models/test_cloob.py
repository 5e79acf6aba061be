import json
import os
import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file

from ccld.errors import CCLDError, option_words
from ccld.models.cloob import (
    BUILTIN_CONFIGS,
    SelfAttention,
    load_cloob,
    resolve_cloob_config,
    validate_cloob_config,
)
from ccld.models.tokenizer import PromptTruncatedWarning
from conftest import max_rel_err

BUILTIN = "cloob_laion_400m_vit_b_16_16_epochs"


@pytest.fixture(scope="module")
def cloob(fixtures):
    return load_cloob(fixtures / "cloob.pkl", fixtures / "cloob.json")


@pytest.fixture(scope="module")
def io(fixtures):
    return load_file(fixtures / "cloob_io.safetensors")


def test_text_embeds_match_reference(cloob, io, fixtures):
    with torch.no_grad():
        assert max_rel_err(cloob.text_encoder(io["tokens"]), io["text_embeds"]) < 1e-4
        texts = json.loads((fixtures / "meta.json").read_text())["cloob"]["texts"]
        with pytest.warns(PromptTruncatedWarning):
            embeds = cloob.encode_text(texts)
    assert embeds.shape == (5, 512)
    assert max_rel_err(embeds, io["text_embeds"]) < 1e-4


def test_image_embeds_match_reference(cloob, io):
    with torch.no_grad():
        embeds = cloob.encode_image(io["images"])
    assert max_rel_err(embeds, io["image_embeds"]) < 1e-4
    assert torch.allclose(embeds.norm(dim=-1), torch.ones(3))


def test_frozen_with_the_ports_key_names(cloob):
    assert not cloob.training and not any(p.requires_grad for p in cloob.parameters())
    keys = set(cloob.state_dict())
    for key in ["image_encoder.class_embed", "image_encoder.embed.weight",
                "image_encoder.pos_embed.weight", "image_encoder.layers.0.attn.query.weight",
                "image_encoder.layers.1.ff.linear_1.bias", "text_encoder.embed.weight",
                "text_encoder.layers.1.attn.out.weight", "text_encoder.layers.0.ff.norm.bias",
                "text_encoder.proj.weight"]:
        assert key in keys
    assert not any(k.endswith(("mean", "std")) for k in keys)  # normalisation comes from config


def test_safetensors_round_trip(cloob, io, tmp_path):
    path = tmp_path / "cloob.safetensors"
    save_file({k: v.contiguous() for k, v in cloob.state_dict().items()}, path)
    again = load_cloob(path, cloob.config)
    with torch.no_grad():
        assert torch.equal(again.text_encoder(io["tokens"]), cloob.text_encoder(io["tokens"]))
        assert torch.equal(again.encode_image(io["images"]), cloob.encode_image(io["images"]))


def test_encode_image_wants_the_config_size(cloob):
    with pytest.raises(ValueError, match="64, 64"):
        cloob.encode_image(torch.rand(1, 3, 32, 32))


def test_weights_not_fitting_the_config(fixtures):
    config = json.loads((fixtures / "cloob.json").read_text())
    config["image_encoder"]["d_model"] = 32
    with pytest.raises(CCLDError, match=r"does not match the CLOOB config .*image_encoder.*"
                                        r"expected \[32.*got \[64.*cloob_config=") as e:
        load_cloob(fixtures / "cloob.pkl", config)
    assert "--cloob-config" in e.value.worded(option_words)  # as the command line says it
    config = json.loads((fixtures / "cloob.json").read_text())
    config["text_encoder"]["n_layers"] = 1
    with pytest.raises(CCLDError, match=r"text_encoder\.layers\.1\..*cloob_config=") as e:
        load_cloob(fixtures / "cloob.pkl", config)
    assert "--cloob-config" in e.value.worded(option_words)


def test_truncated_pickle(fixtures, tmp_path):
    data = (fixtures / "cloob.pkl").read_bytes()
    path = tmp_path / f"{BUILTIN}-truncated.pkl"
    path.write_bytes(data[:len(data) // 2])
    with pytest.raises(CCLDError, match="corrupt or truncated") as e:
        load_cloob(path)
    assert "\n" not in str(e.value)


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_pickle_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / f"{BUILTIN}-evil.pkl"
    path.write_bytes(pickle.dumps({"params": ({}, {}), "step": _Evil(marker)}))
    with pytest.raises(CCLDError, match="refused"):
        load_cloob(path)
    assert not marker.exists()


def test_config_from_checkpoint_name(tmp_path):
    sha = BUILTIN_CONFIGS[BUILTIN]["sha256"]
    config = resolve_cloob_config(None, tmp_path / f"{BUILTIN}-{sha}.pkl")
    assert config["name"] == BUILTIN and config["image_encoder"]["image_size"] == 224
    assert resolve_cloob_config(None, "cloob_laion_400m_vit_b_16_32_epochs.safetensors")["url"] \
        == BUILTIN_CONFIGS["cloob_laion_400m_vit_b_16_32_epochs"]["url"]
    with pytest.raises(CCLDError, match="cloob_config=") as e:
        resolve_cloob_config(None, tmp_path / "my_cloob.pkl")
    assert "--cloob-config" in e.value.worded(option_words)


def test_builtin_configs():
    for name, info in BUILTIN_CONFIGS.items():
        config = resolve_cloob_config(name)
        assert config["url"] == info["url"] and info["url"].endswith(f"{name}-{info['sha256']}.pkl")
        assert len(info["sha256"]) == 64


def test_bad_config_files(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(CCLDError, match=r"bad\.json: not valid JSON"):
        resolve_cloob_config(bad)
    config = resolve_cloob_config(BUILTIN)
    del config["text_encoder"]["vocab_size"]
    missing = tmp_path / "missing.json"
    missing.write_text(json.dumps(config))
    with pytest.raises(CCLDError, match=r"missing\.json: missing 'text_encoder\.vocab_size'"):
        resolve_cloob_config(missing)
    with pytest.raises(CCLDError, match="unknown CLOOB config"):
        resolve_cloob_config("no_such_cloob")


def test_config_round_trips_through_dict():
    config = resolve_cloob_config(BUILTIN)
    assert validate_cloob_config(json.loads(json.dumps(config))) == config


def test_attention_masks_query_rows_like_the_release():
    # The released model fills the logits of masked *query* rows with -1e30 (keys stay visible);
    # written out the slow way here, against the module's shortcut.
    torch.manual_seed(0)
    attn = SelfAttention(16, 2).eval()
    x = torch.randn(2, 7, 16)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    h = attn.norm(x)
    q, k, v = (lin(h).view(2, 7, 2, 8) for lin in (attn.query, attn.key, attn.value))
    logits = torch.einsum("nthd,nThd->nhtT", q, k) / 8**0.5
    logits = torch.where(mask[:, None, :, None], logits, torch.tensor(-1e30))
    y = torch.einsum("nhtT,nThd->nthd", logits.softmax(-1), v).reshape(2, 7, 16)
    with torch.no_grad():
        assert torch.allclose(attn(x, mask), attn.out(y), atol=1e-6)
        assert not torch.allclose(attn(x, mask)[0], attn(x)[0], atol=1e-3)


# The pickle reader: streamed, and never holding an array's data twice


def test_pickle_is_read_with_little_more_memory_than_its_arrays(tmp_path):
    import tracemalloc

    import numpy as np

    from ccld.io.checkpoints import load_array_pickle

    rng = np.random.default_rng(0)
    tree = {f"layer_{i}": {"w": rng.standard_normal(1 << 20, dtype=np.float32)} for i in range(8)}
    path = tmp_path / "arrays.pkl"
    path.write_bytes(pickle.dumps({"params": (tree, {})}, protocol=2))  # the release's protocol
    data = sum(m["w"].nbytes for m in tree.values())
    tracemalloc.start()
    try:
        loaded = load_array_pickle(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # reading the whole file first and the unpickler's memo made this 3.8x
    assert peak < 1.6 * data
    assert all(np.array_equal(loaded["params"][0][k]["w"], m["w"]) for k, m in tree.items())


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_pickles_that_share_objects_load_in_every_protocol(tmp_path, protocol):
    import numpy as np

    from ccld.io.checkpoints import load_array_pickle

    big = np.arange(1 << 16, dtype=np.float32)  # 256 KiB: its data block is not memoized
    small = np.ones(3, dtype=np.float32)
    names = ["w", "b"]
    obj = {"params": ({"a": {"w": big, "b": small}, "c": {"w": big}}, {"d": {"b": small}}),
           "names": (names, names)}
    path = tmp_path / "shared.pkl"
    path.write_bytes(pickle.dumps(obj, protocol=protocol))
    loaded = load_array_pickle(path)
    image, text = loaded["params"]
    assert np.array_equal(image["c"]["w"], big) and np.array_equal(text["d"]["b"], small)
    assert image["a"]["w"] is image["c"]["w"] and loaded["names"][0] is loaded["names"][1]


def test_pickle_referring_back_to_a_data_block_is_refused_in_one_line(tmp_path):
    from ccld.io.checkpoints import load_array_pickle

    block = b"x" * (1 << 17)  # a numpy pickle never refers to one data block twice
    path = tmp_path / f"{BUILTIN}-odd.pkl"
    path.write_bytes(pickle.dumps({"params": ({"a": block}, {"b": block})}, protocol=2))
    with pytest.raises(CCLDError, match="not a readable CLOOB checkpoint") as e:
        load_array_pickle(path)
    assert "\n" not in str(e.value)
