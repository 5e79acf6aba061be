"""The real download code, run against local stand-ins: a loopback HTTP server for the CLOOB
pickle and a pre-filled Hugging Face cache (offline mode) for the hub files."""

import hashlib
import http.server
import socket
import threading
from functools import partial

import pytest

from ccld.apps.cli import main
from ccld.errors import CCLDError
from ccld.io import hub
from ccld.models import cloob as cloob_module


@pytest.fixture
def server(tmp_path):
    """Serves tmp_path/www on 127.0.0.1; yields the base URL."""
    www = tmp_path / "www"
    www.mkdir()
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(www))
    handler.log_message = lambda *a: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield www, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_verified_download_lands_only_when_the_hash_matches(server, tmp_path):
    www, url = server
    (www / "model.pkl").write_bytes(b"weights" * 1000)
    good = hashlib.sha256(b"weights" * 1000).hexdigest()
    dest = tmp_path / "cache" / "model.pkl"
    assert hub.download_verified(f"{url}/model.pkl", dest, good, progress=False) == dest
    assert dest.read_bytes() == b"weights" * 1000
    other = tmp_path / "cache" / "other.pkl"
    with pytest.raises(CCLDError, match="sha256"):
        hub.download_verified(f"{url}/model.pkl", other, "0" * 64, progress=False)
    assert not other.exists() and not list(other.parent.glob("*.part"))


def test_no_network_is_a_clear_error(tmp_path):
    with socket.socket() as s:  # a loopback port with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(CCLDError, match="could not download.*check the network"):
        hub.download_verified(f"http://127.0.0.1:{port}/x.pkl", tmp_path / "x.pkl",
                                      "0" * 64, progress=False)


def test_hub_file_from_cache_and_missing_offline(offline_hub):
    path = offline_hub("huggan/distill-ccld-wa", "model_student.ckpt", b"abc")
    assert hub.hub_download("huggan/distill-ccld-wa", "model_student.ckpt").read_bytes() == b"abc"
    with pytest.raises(CCLDError, match="could not get ae_model.ckpt from the hub repo huggan/ccld_wa"):
        hub.hub_download("huggan/ccld_wa", "ae_model.ckpt")
    assert path.is_file()


def test_ccld_download_fetches_the_default_set(fixtures, server, offline_hub, monkeypatch, capsys):
    www, url = server
    name = hub.DEFAULT_CLOOB
    data = (fixtures / "cloob.pkl").read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    (www / f"{name}-{sha}.pkl").write_bytes(data)
    monkeypatch.setitem(cloob_module.BUILTIN_CONFIGS, name,
                        {"url": f"{url}/{name}-{sha}.pkl", "sha256": sha})
    offline_hub(*hub.DEFAULT_UNET, (fixtures / "unet.ckpt").read_bytes())
    repo, ckpt, yaml = hub.DEFAULT_AUTOENCODER
    offline_hub(repo, ckpt, (fixtures / "autoencoder.ckpt").read_bytes())
    offline_hub(repo, yaml, (fixtures / "autoencoder.yaml").read_bytes())

    assert main(["download"]) == 0
    printed = capsys.readouterr().out.split()
    assert len(printed) == 4 and printed[-1].endswith(f"{name}-{sha}.pkl")
    # the default pipeline now builds from the cache alone, with no arguments at all
    from ccld import CCLDPipeline
    # (the stand-in CLOOB is the tiny fixture, so it needs its own config)
    pipe = CCLDPipeline.from_pretrained(cloob_config=fixtures / "cloob.json")
    assert pipe.unet.config["base_channels"] == 64
    assert pipe.sources["cloob"].endswith(f"{name}-{sha}.pkl")


def test_ccld_download_offline_exits_2_with_one_line(offline_hub, capsys):
    assert main(["download"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ccld: error: could not get model_student.ckpt")


def test_teacher_choice_does_not_depend_on_listing_order():
    names = ["b.ckpt", "ae_model.ckpt", "notes/ae_model.ckpt", "README.md", "z.safetensors",
             "a_model_ema.ckpt", "y.safetensors"]
    assert hub._unet_checkpoints(names) == ["a_model_ema.ckpt", "y.safetensors",
                                            "z.safetensors", "b.ckpt"]
    assert hub._unet_checkpoints(reversed(names)) == hub._unet_checkpoints(names)


def test_cached_teacher_loads_offline_without_listing_the_hub(fixtures, offline_hub, monkeypatch):
    from ccld import CCLDPipeline

    def no_listing(repo_id):
        raise AssertionError("the hub was listed although the teacher is cached")
    monkeypatch.setattr(hub, "hub_list_files", no_listing)
    repo, ckpt, yaml = hub.DEFAULT_AUTOENCODER
    offline_hub(repo, ckpt, (fixtures / "autoencoder.ckpt").read_bytes())
    offline_hub(repo, yaml, (fixtures / "autoencoder.yaml").read_bytes())
    chosen = offline_hub(repo, "model_ema.ckpt", (fixtures / "unet.ckpt").read_bytes())
    offline_hub(repo, "model.ckpt", b"not chosen: not the EMA weights")
    assert hub.teacher_checkpoint() == chosen
    pipe = CCLDPipeline.from_pretrained(hub.TEACHER_REPO, cloob=fixtures / "cloob.pkl",
                                        cloob_config=fixtures / "cloob.json")
    assert pipe.sources["unet"].endswith("model_ema.ckpt")
    assert pipe.latent_scale == hub.PUBLISHED_LATENT_SCALE


def test_uncached_teacher_offline_is_one_line(offline_hub):
    offline_hub(hub.TEACHER_REPO, "ae_model.ckpt", b"only the autoencoder is cached")
    with pytest.raises(CCLDError, match="could not list the hub repo huggan/ccld_wa: "
                                        "HF_HUB_OFFLINE is set"):
        hub.teacher_checkpoint()
