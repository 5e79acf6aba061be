"""`ccld serve` as users meet it: a real server on loopback with the fixture models, driven through
Gradio's client API (bad inputs, a load test) and in headless Chromium (Debian's, driven by
Playwright). The browser test skips when Chromium or Playwright is missing, except in CI
(CI=true), where `.ci/install-browser` must have installed them and a skip would hide a gap.
"""

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # before gradio_client is imported

import pytest

gradio_client = pytest.importorskip("gradio_client", reason="needs gradio (pip install -e '.[web]')")
from gradio_client import Client, handle_file  # noqa: E402

from ccld.io.images import read_png_parameters  # noqa: E402
from conftest import api_client, free_port  # noqa: E402

pytestmark = pytest.mark.slow  # a real server process, started once per module

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM = os.environ.get("CCLD_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]
IN_CI = os.environ.get("CI", "").lower() in ("true", "1", "yes")
TINY = dict(method="ddim", steps=2, guidance=3.0, num_images=1)  # fast on 2 CPU cores


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


class Server:
    def __init__(self, proc, url, log_path):
        self.proc, self.url, self.log_path = proc, url, log_path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def client(self, downloads: Path) -> Client:
        return api_client(self.url, downloads)


@pytest.fixture(scope="module")
def server(fixtures, tmp_path_factory):
    """`ccld serve` on a free loopback port, with the fixture models and 64-pixel images."""
    tmp = tmp_path_factory.mktemp("serve")
    port = free_port()
    exe = Path(sys.executable).with_name("ccld")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "ccld"]
    cmd += ["serve", "--host", "127.0.0.1", "--port", str(port), "--size", "64",
            "--queue-size", "32", "--max-upload-mb", "1", "--num-images", "4",
            "--unet", str(fixtures / "unet.ckpt"), "--autoencoder", str(fixtures / "autoencoder.ckpt"),
            "--cloob", str(fixtures / "cloob.pkl"), "--cloob-config", str(fixtures / "cloob.json")]
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "TMPDIR": str(tmp),
           "PYTHONUNBUFFERED": "1"}
    env.pop("GRADIO_TEMP_DIR", None)
    log_path = tmp / "serve.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp,
                                start_new_session=True)
    url = f"http://127.0.0.1:{port}/"
    srv = Server(proc, url, log_path)
    deadline = time.monotonic() + 180
    try:
        while True:
            if not srv.alive():
                pytest.fail(f"ccld serve exited with {proc.returncode}:\n{srv.log()}")
            if "ready: open" in srv.log():
                try:
                    with urllib.request.urlopen(url, timeout=5) as r:
                        if r.status == 200:
                            break
                except OSError:
                    pass
            if time.monotonic() > deadline:
                pytest.fail(f"ccld serve did not come up in 180 s:\n{srv.log()}")
            time.sleep(0.25)
        yield srv
    finally:
        if srv.alive():
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
    log = srv.log()
    scratch = re.search(r"scratch folder (\S+)", log)
    assert scratch and not Path(scratch.group(1)).exists(), "the scratch folder outlived the server"
    assert "Traceback" not in log, log


def test_model_loads_once_and_api_generates(server, tmp_path):
    client = server.client(tmp_path)
    gallery, params = client.predict(prompts="a snowy landscape:2\nblue", image_prompts=[],
                                     init_image=None, seed=11, api_name="/generate",
                                     **{**TINY, "num_images": 2})
    assert len(gallery) == 2
    for i, item in enumerate(gallery):
        saved = read_png_parameters(item["image"])
        assert saved == {**params, "index": i}
    assert params["seed"] == 11 and params["prompts"] == [["a snowy landscape", 2.0], ["blue", 3.0]]
    assert server.log().count("loading the models") == 1


def test_raw_page_has_its_title(server):
    """Tabs, bookmarks and link previews read the served HTML, before any script runs."""
    with urllib.request.urlopen(server.url, timeout=10) as r:
        page = r.read().decode()
    assert "<title>ccld: CLOOB-conditioned latent diffusion</title>" in page


def test_api_uploads(server, tmp_path):
    from PIL import Image

    ref = tmp_path / "ref.png"
    Image.new("RGB", (96, 64), (30, 90, 200)).save(ref)
    client = server.client(tmp_path / "dl")
    gallery, params = client.predict(prompts="", image_prompts=[handle_file(str(ref))],
                                     init_image=handle_file(str(ref)), strength=0.5, seed=3,
                                     api_name="/generate", **TINY)
    assert len(gallery) == 1
    assert params["image_prompts"] == [["ref.png", 3.0]] and params["init_image"] == "ref.png"


def test_bad_inputs_get_a_message_and_the_server_stays_up(server, tmp_path):
    bad = tmp_path / "not-a-picture.png"
    bad.write_text("plain text, no pixels\n")
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(1_500_000))  # over the server's 1 MB upload limit
    client = server.client(tmp_path / "dl")
    cases = [
        (dict(steps=0), "steps must be a whole number from 1 to 250 (got 0)"),
        (dict(num_images=10_000), "number of images must be a whole number from 1 to 16"),
        (dict(image_prompts=[handle_file(str(bad))]),
         "image prompt not-a-picture.png: not an image file ccld can read"),
        (dict(init_image=handle_file(str(bad))), "init image not-a-picture.png: not an image"),
        (dict(prompts=""), "type a prompt"),
        (dict(image_prompts=[handle_file(str(big))]), "exceeds the maximum file size"),
    ]
    for change, message in cases:
        kwargs = {"prompts": "a cat", **TINY, "seed": 1, **change}
        with pytest.raises(Exception, match=re.escape(message)):
            client.predict(api_name="/generate", **kwargs)
        assert server.alive(), server.log()
    # the server refuses an oversized upload itself, whatever the client checks
    import httpx

    with open(big, "rb") as f:
        r = httpx.post(f"{server.url}gradio_api/upload", files={"files": ("big.png", f)},
                       timeout=30)
    assert r.status_code == 413, r.text
    gallery, _ = client.predict(prompts="still here", api_name="/generate", seed=2, **TINY)
    assert len(gallery) == 1
    assert server.alive(), server.log()


def test_load_20_requests_from_several_clients(server, tmp_path):
    n_requests, n_clients = 20, 4
    clients = [server.client(tmp_path / f"client{i}") for i in range(n_clients)]
    clients[0].predict(prompts="warm up", api_name="/generate", seed=0, **TINY)
    lock = threading.Lock()
    rss = []  # (requests done, server RSS)

    def one(i):
        gallery, params = clients[i % n_clients].predict(
            prompts=f"request {i}", api_name="/generate", seed=1000 + i, **TINY)
        with lock:
            rss.append(rss_bytes(server.proc.pid))
        return i, gallery, params

    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=n_requests) as pool:  # all 20 in flight at once
        futures = [pool.submit(one, i) for i in range(n_requests)]
        results = [f.result(timeout=240) for f in futures]
    elapsed = time.monotonic() - started
    assert server.alive(), server.log()
    # none lost, none mixed up: each answer is its own request's
    assert len(results) == n_requests
    for i, gallery, params in results:
        assert len(gallery) == 1
        assert params["seed"] == 1000 + i and params["prompts"] == [[f"request {i}", 3.0]]
        assert read_png_parameters(gallery[0]["image"])["seed"] == 1000 + i
    # memory: after warm-up, the second ten requests add little
    growth = rss[-1] - rss[n_requests // 2 - 1]
    print(f"\n20 requests in {elapsed:.1f} s; server RSS {rss[0] / 2**20:.0f} -> "
          f"{rss[-1] / 2**20:.0f} MiB, growth over the last 10: {growth / 2**20:.1f} MiB")
    assert growth < 48 * 2**20, f"server RSS grew {growth / 2**20:.1f} MiB over 10 requests"


# The page in a real browser

@pytest.fixture(scope="module")
def browser():
    missing = None
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing = "the playwright Python package (pip install -e '.[test]')"
    if missing is None and not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        missing = f"Chromium at {CHROMIUM} (apt-get install chromium, or run .ci/install-browser)"
    if missing:
        if IN_CI:
            pytest.fail(f"browser test cannot run in CI: missing {missing}")
        pytest.skip(f"browser test skipped: missing {missing}")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


@pytest.mark.browser
def test_page_in_headless_chromium(server, browser, tmp_path):
    from playwright.sync_api import expect

    page = browser.new_page(viewport={"width": 1280, "height": 900})
    outside = []

    def only_loopback(route):  # the page must need nothing from the internet
        url = route.request.url
        if url.startswith((server.url, "data:", "blob:")):
            route.continue_()
        else:
            outside.append(url)
            route.abort()

    page.route("**/*", only_loopback)
    page.goto(server.url, wait_until="domcontentloaded")
    prompt = page.locator("#prompts textarea")
    expect(prompt).to_be_visible(timeout=30_000)
    expect(page.get_by_text("Example prompts")).to_be_visible()
    assert page.title() == "ccld: CLOOB-conditioned latent diffusion"
    # the API example names the address the page was loaded from (the server's own port)
    page.get_by_text("API", exact=True).first.click()
    expect(page.locator("code").filter(has_text="Client(")).to_contain_text(
        f'Client("{server.url}")', timeout=10_000)

    # empty prompt: a message on the page, no crash
    page.locator("#generate").click()
    toast = page.locator(".toast-body").filter(has_text="type a prompt")
    expect(toast).to_be_visible(timeout=30_000)
    toast.locator(".toast-close").first.click()
    expect(toast).to_have_count(0)

    # the dice gives a random seed
    seed = page.locator("#seed input")
    page.locator("#dice").click()
    expect(seed).not_to_have_value("0", timeout=10_000)
    seed.fill("42")

    steps = page.locator("#steps input[type=number]")
    steps.fill("12")
    steps.press("Enter")
    prompt.fill("a snowy landscape, oil on canvas:3")
    page.evaluate("""() => {  // notes whether the progress bar shows sampling steps and
        // whether the gallery shows previews (their captions) while sampling
        const gallery = document.querySelector('#gallery');
        window.sawSampling = false;
        window.sawPreview = false;
        new MutationObserver(() => {
            if (/Sampling/.test(gallery.textContent)) window.sawSampling = true;
            if (/preview · step/.test(gallery.textContent)) window.sawPreview = true;
        }).observe(gallery, {subtree: true, childList: true, characterData: true});
    }""")
    page.locator("#generate").click()
    images = page.locator("#gallery img")
    expect(images).to_have_count(4, timeout=120_000)
    expect(page.locator("#parameters")).to_contain_text('"seed": 42', timeout=120_000)
    assert page.evaluate("window.sawSampling"), "no progress bar during sampling"
    assert page.evaluate("window.sawPreview"), "no previews in the gallery during sampling"

    # each image served to the page is a PNG carrying its parameters
    src = images.first.get_attribute("src")
    body = page.request.get(src).body()
    assert body[:8] == b"\x89PNG\r\n\x1a\n"
    assert b'"seed": 42' in body and b"parameters" in body

    # Vary: variations of the selected (second) picture, with a new seed
    images.nth(1).click()
    page.keyboard.press("Escape")  # out of the gallery's large view
    page.locator("#vary").click()
    expect(page.locator("#parameters")).to_contain_text('"variation_of": 42', timeout=120_000)
    expect(page.locator("#parameters")).to_contain_text('"variation_index": 1')
    expect(images).to_have_count(4, timeout=120_000)
    expect(seed).not_to_have_value("42")

    # inpainting from an uploaded init image and mask, painted larger (the hires fix)
    from PIL import Image

    Image.new("RGB", (64, 64), (30, 90, 200)).save(tmp_path / "start.png")
    half = Image.new("L", (64, 64), 0)
    half.paste(255, (32, 0, 64, 64))
    half.save(tmp_path / "half-mask.png")
    page.get_by_text("Image prompts and init image").click()
    page.locator("#init-image input[type=file]").set_input_files(str(tmp_path / "start.png"))
    # the mask editor offers the uploaded init image to draw on (what a drawing becomes is
    # tests/apps/test_web.py's: synthetic mouse strokes do not reach Gradio's canvas)
    expect(page.locator("#mask-editor canvas").first).to_be_visible(timeout=30_000)
    page.locator("#mask input[type=file]").set_input_files(str(tmp_path / "half-mask.png"))
    expect(page.locator("#mask")).to_contain_text("half-mask.png", timeout=30_000)
    steps.fill("2")
    steps.press("Enter")
    page.locator("#generate").click()
    expect(page.locator("#parameters")).to_contain_text('"mask": "half-mask.png"',
                                                        timeout=120_000)
    page.locator("#mask button[aria-label='Clear']").first.click()  # hires and a mask: not yet
    page.get_by_text("Larger picture").click()
    for side in ("width", "height"):
        field = page.locator(f"#hires-{side} input")
        field.fill("128")
        field.press("Enter")
    page.locator("#generate").click()
    expect(page.locator("#parameters")).to_contain_text('"hires": [', timeout=120_000)
    expect(page.locator("#parameters")).to_contain_text("128", timeout=10_000)

    page.wait_for_timeout(300)
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "web.png"), full_page=True)
    page.close()
    assert outside == [], f"the page reached outside loopback: {outside}"
    assert server.alive()
