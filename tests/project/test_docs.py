"""Every command and Python snippet of README.md and docs/*.md runs, against the fixture models.

Blocks fenced ```bash, ```sh or ```console (its `$ ` lines) run with `bash -e`: every command
must succeed. ```python blocks run in a Python subprocess. Other fences (```text) are output or
file contents and do not run. A comment on the line before a fence says what else to do:

    <!-- docs-test: skip (REASON) -->   not run: reported as skipped with REASON
    <!-- docs-test: slow -->             run, but outside the fast subset (`-m "not slow"`)
    <!-- docs-test: file NAME -->        (a ```text block) written as the file NAME first

Each block is a test, `PAGE:N` (its N-th runnable block). The blocks of a page run in order in
one working folder, as a reader follows the page: a block may use what the blocks above it
wrote, and a block run alone runs them first. Pages are followed two at a time in the
background (`page_runs`), each test waiting for its block. The folder starts with what a
reader would have (`write_user_files`: an image prompt, an init image, a folder of training images, a U-Net
checkpoint) and the page's `file` blocks.

The published models are small models in the release formats here: the fixture CLOOB, the
fixture U-Net's layout 16 channels wide (`docs_unet`) and the fixture autoencoder 32 channels
wide at every level (`docs_autoencoder`). The snippets show that commands run, not what they
compute; at the fixtures' widths U-Net forwards and decodes would be most of this test's time.
A sitecustomize.py first on the snippets' PYTHONPATH makes ccld.io.hub's `default_unet`,
`default_autoencoder` and `download_cloob` return those files, and the built-in CLOOB configs
the fixture's (the real CLOOB download is checked against its sha256, so no small file can
stand in for it otherwise). HOME, the caches
(Hugging Face, XDG, ccld's) and TMPDIR are temporary folders and HF_HUB_OFFLINE is set: nothing
downloads, and nothing outside the test's folders is written.

`ccld` commands and Python blocks start as forks of one process that has imported torch and
ccld (warm_processes.py), which saves a few seconds of imports in each of about fifty processes;
CCLD_DOCS_COLD=1 starts each from scratch instead, as a reader's shell would.
"""

from __future__ import annotations

import concurrent.futures
import os
import re
import shutil
import subprocess
import sys
import textwrap
import threading
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL_LANGUAGES = {"bash", "sh", "console"}
RUNNABLE = SHELL_LANGUAGES | {"python"}
NOT_RUN = {"text", "json", "yaml", "toml", "csv"}  # output and file contents
MARKER = re.compile(r"^<!--\s*docs-test:\s*(?P<kind>\w[\w-]*)\s*(?P<argument>.*?)\s*-->$")
MARKER_KINDS = {"skip", "slow", "file"}
FENCE = re.compile(r"^```(?P<language>[\w+-]*)\s*$")
BLOCK_TIMEOUT_S = 900
WARM = Path(__file__).with_name("warm_processes.py")


@dataclass(frozen=True)
class Block:
    page: str  # the page's path from the repo root
    number: int  # its place among the page's runnable blocks, from 1 (0: not runnable)
    line: int  # the line of its opening fence, from 1
    language: str
    code: str
    marker: str | None  # skip, slow, file or None
    argument: str  # the marker's reason or file name

    @property
    def name(self) -> str:
        return f"{self.page}:{self.number}"

    @property
    def where(self) -> str:
        return f"{self.page} line {self.line}"


def read_blocks(path: Path) -> list[Block]:
    """The fenced blocks of a markdown page, each with the marker comment before it."""
    return parse_blocks(path.relative_to(ROOT).as_posix(), path.read_text(encoding="utf-8"))


def parse_blocks(page: str, text: str) -> list[Block]:
    lines = text.splitlines()
    blocks, runnable, i = [], 0, 0
    while i < len(lines):
        fence = FENCE.match(lines[i])
        if not fence:
            i += 1
            continue
        start, language = i, fence["language"].lower()
        end = next((j for j in range(i + 1, len(lines)) if lines[j].rstrip() == "```"), None)
        assert end is not None, f"{page} line {start + 1}: a code block that never closes"
        previous = next((lines[j].strip() for j in range(start - 1, -1, -1) if lines[j].strip()), "")
        marker = MARKER.match(previous)
        if marker:
            assert marker["kind"] in MARKER_KINDS, \
                f"{page} line {start}: unknown docs-test marker {marker['kind']!r}"
        if language in RUNNABLE:
            runnable += 1
        blocks.append(Block(page, runnable if language in RUNNABLE else 0, start + 1, language,
                            "\n".join(lines[start + 1:end]) + "\n",
                            marker["kind"] if marker else None,
                            marker["argument"].strip() if marker else ""))
        i = end + 1
    return blocks


def reason(block: Block) -> str:
    text = block.argument
    return text[1:-1] if text.startswith("(") and text.endswith(")") else text


def shell_script(block: Block) -> str:
    """A shell block as a script: a console block's `$ ` commands (with their continuation
    lines), any other block whole."""
    if block.language != "console":
        return block.code
    commands, continuing = [], False
    for line in block.code.splitlines():
        if line.startswith("$ ") or continuing:
            commands.append(line[2:] if line.startswith("$ ") and not continuing else line)
            continuing = line.rstrip().endswith("\\")
    return "\n".join(commands) + "\n"


ALL_BLOCKS = [block for page in PAGES for block in read_blocks(page)]
RUN_BLOCKS = [block for block in ALL_BLOCKS if block.number]


def block_param(block: Block):
    marks = {"slow": [pytest.mark.slow],
             "skip": [pytest.mark.skip(reason=f"{block.where}: {reason(block)}")]}
    return pytest.param(block, id=block.name, marks=marks.get(block.marker, []))


# The reader's machine: the published models are small ones, every cache is a temporary folder

DOCS_UNET_CHANNELS = 16  # the fixture U-Net's 64 does four times the work, to the same effect


def docs_unet(fixtures: Path, path: Path) -> None:
    """A random U-Net in the release format of the fixture's (a bare state dict, its latent
    scale), of its multipliers but DOCS_UNET_CHANNELS wide."""
    from ccld.models.unet import CCLDUNet, infer_unet_config

    release = torch.load(fixtures / "unet.ckpt", map_location="cpu", weights_only=True)
    config = infer_unet_config(release)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        unet = CCLDUNet(DOCS_UNET_CHANNELS, config["channel_multipliers"],
                        autoencoder_scale=float(release["autoencoder_scale"]))
    torch.save(unet.state_dict(), path)


def docs_autoencoder(fixtures: Path, path: Path) -> None:
    """The fixture autoencoder in its release format (`{'state_dict'}` and the yaml), cut to its
    first 32 channels wherever it is 64 or 128 wide: ch_mult 1,1,1,1, with no channel-changing
    shortcuts left (LDM's group norms need 32 channels at least)."""
    release = torch.load(fixtures / "autoencoder.ckpt", map_location="cpu", weights_only=True)
    narrow = {}
    for key, tensor in release["state_dict"].items():
        if "nin_shortcut" not in key:
            cut = tuple(slice(0, 32) if size in (64, 128) and not key.startswith("loss.")
                        else slice(None) for size in tensor.shape)
            narrow[key] = tensor[cut].clone()
    torch.save({"state_dict": narrow}, path)
    config = (fixtures / "autoencoder.yaml").read_text()
    assert "ch_mult: [ 1,2,4,4 ]" in config, "the fixture autoencoder's config changed"
    path.with_suffix(".yaml").write_text(config.replace("ch_mult: [ 1,2,4,4 ]", "ch_mult: [ 1,1,1,1 ]"))


SITECUSTOMIZE = '''\
"""Written by tests/project/test_docs.py: here the published models are small local ones."""
import importlib.abc
import importlib.machinery
import sys
from pathlib import Path

MODELS = Path({models!r})  # the models, the CLOOB named as a release, its config as the built-in


def patch_hub(hub):
    download_cloob = hub.download_cloob

    def fixture_cloob(name=None):
        path = MODELS / f"{{name or hub.DEFAULT_CLOOB}}-fixture.pkl"
        return path if path.is_file() else download_cloob(name)  # (its error for a bad name)

    hub.default_unet = lambda: MODELS / "unet.ckpt"
    hub.default_autoencoder = lambda: (MODELS / "autoencoder.ckpt", MODELS / "autoencoder.yaml")
    hub.download_cloob = fixture_cloob


def patch_cloob(cloob):
    cloob.CONFIG_DIR = MODELS


PATCHES = {{"ccld.io.hub": patch_hub, "ccld.models.cloob": patch_cloob}}


class PatchAfterImport(importlib.abc.MetaPathFinder):
    """Patches a module of PATCHES right after it is first imported (costing nothing before)."""

    def find_spec(self, name, path, target=None):
        if name not in PATCHES:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_patch(module):
            exec_module(module)
            PATCHES[name](module)

        spec.loader.exec_module = exec_and_patch
        return spec


sys.meta_path.insert(0, PatchAfterImport())
'''


@pytest.fixture(scope="session")
def reader(fixtures, tmp_path_factory):
    """The environment of the snippets' processes, with small models as the published ones,
    and how to start Python on a script there."""
    from ccld.io.hub import DEFAULT_CLOOB

    root = tmp_path_factory.mktemp("docs")
    models = root / "models"
    models.mkdir()
    docs_unet(fixtures, models / "unet.ckpt")
    docs_autoencoder(fixtures, models / "autoencoder.ckpt")
    shutil.copy(fixtures / "cloob.pkl", models / f"{DEFAULT_CLOOB}-fixture.pkl")  # a copy: the
    # training commands resolve links, and the config is told by the file's own name
    for config in (ROOT / "src" / "ccld" / "models" / "cloob_configs").glob("*.json"):
        shutil.copy(fixtures / "cloob.json", models / config.name)
    site = root / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE.format(models=str(models)))
    home, hf, tmp = root / "home", root / "hf", root / "tmp"
    for folder in (home, hf, tmp):
        folder.mkdir()
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("HF_", "HUGGINGFACE_", "CCLD_", "GRADIO_", "WANDB_", "XDG_",
                                "PYTHON", "TORCH_HOME", "TORCHINDUCTOR_", "TRITON_"))}
    env.update(
        PATH=os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
        PYTHONPATH=str(site), PYTHONDONTWRITEBYTECODE="1",
        HOME=str(home), XDG_CACHE_HOME=str(home / ".cache"), XDG_CONFIG_HOME=str(home / ".config"),
        HF_HOME=str(hf), HF_HUB_CACHE=str(hf / "hub"), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
        # the session's converted-weights cache (conftest's), so the models convert once
        CCLD_CACHE_DIR=os.environ.get("CCLD_CACHE_DIR") or str(root / "ccld_cache"),
        TMPDIR=str(tmp), MPLCONFIGDIR=str(home / ".matplotlib"), TORCH_HOME=str(home / ".torch"),
        TORCHINDUCTOR_CACHE_DIR=str(tmp / "inductor"), TRITON_CACHE_DIR=str(tmp / "triton"),
        GRADIO_ANALYTICS_ENABLED="False", TOKENIZERS_PARALLELISM="false", WANDB_MODE="disabled",
        # tiny models on a small shared machine: a second thread costs more than it gives
        OMP_NUM_THREADS="1",
    )
    if os.environ.get("CCLD_DOCS_COLD"):  # every block's processes started from scratch
        yield {"env": env, "root": root, "python": [sys.executable]}
        return
    # `ccld` and the Python blocks start warm: forks of one process that imported torch and
    # ccld already (see warm_processes.py), a few seconds each saved on a small machine
    socket_path = root / "warm.sock"
    warm = [sys.executable, "-S", str(WARM)]
    server = subprocess.Popen([*warm[:1], str(WARM), "serve", str(socket_path)], cwd=root,
                              env=env, stdout=subprocess.PIPE, text=True)
    assert server.stdout.readline().strip() == "ready", "the warm-process server did not start"
    shims = root / "bin"
    shims.mkdir()
    (shims / "ccld").write_text(f'#!/bin/sh\nexec {" ".join(warm)} ccld "$@"\n')
    (shims / "ccld").chmod(0o755)
    env.update(PATH=os.pathsep.join([str(shims), env["PATH"]]), CCLD_WARM_SOCKET=str(socket_path))
    yield {"env": env, "root": root, "python": [*warm, "python"]}
    server.terminate()
    server.wait()


def write_user_files(folder: Path, models: Path) -> None:
    """What a reader has before following a page: the files the snippets name."""
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(0)

    def painting(width, height):
        image = Image.fromarray(rng.integers(0, 256, (height // 32, width // 32, 3), np.uint8))
        image = image.resize((width, height), Image.BILINEAR)
        draw = ImageDraw.Draw(image)
        draw.ellipse([width // 4, height // 4, width * 3 // 4, height * 3 // 4],
                     fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
        return image

    painting(320, 256).save(folder / "starry_night.jpg", quality=90)  # an image prompt
    painting(256, 256).save(folder / "sketch.png")  # an init image
    sky = Image.new("L", (256, 256), 0)  # an inpainting mask: repaint the top third
    sky.paste(255, (0, 0, 256, 85))
    sky.save(folder / "sky-mask.png")
    art = folder / "my-art"  # a folder of training images, with a subfolder
    (art / "more").mkdir(parents=True)
    for i in range(4):
        painting(288, 256).save(art / ("more" if i % 2 else "") / f"painting-{i}.jpg")
    (folder / "teacher.ckpt").symlink_to(models / "unet.ckpt")  # a U-Net checkpoint


@dataclass
class Outcome:
    """How a block went: None while it has not run yet, else its failure message or ""."""
    done: threading.Event = field(default_factory=threading.Event)
    failure: str | None = None


PARALLEL_PAGES = 2  # pages followed at once: each block is one single-threaded process


@pytest.fixture(scope="session")
def page_runs(reader, request):
    """block name -> its Outcome. On first use every page whose blocks this session selected is
    followed in the background, PARALLEL_PAGES at a time, each in its own working folder: its
    blocks in order, up to the last one selected (the earlier ones too, as a reader would), and
    none after a failure. The folders of pages whose blocks all ran are removed at the end."""
    selected = {item.callspec.params["block"].name for item in request.session.items
                if getattr(item, "originalname", "") == "test_snippet_runs"}
    outcomes = {block.name: Outcome() for block in RUN_BLOCKS}
    folders, failed_pages = {}, set()

    def follow(page: str) -> None:
        folder = reader["root"] / "pages" / page.replace("/", "-").removesuffix(".md")
        folder.mkdir(parents=True)
        folders[page] = folder
        write_user_files(folder, reader["root"] / "models")
        for block in ALL_BLOCKS:
            if block.page == page and block.marker == "file":
                (folder / block.argument).write_text(block.code)
        blocks = [b for b in RUN_BLOCKS if b.page == page and b.marker != "skip"]
        last = max((i for i, b in enumerate(blocks) if b.name in selected), default=-1)
        failed = None
        for block in blocks[:last + 1]:
            outcome = outcomes[block.name]
            if failed is not None:
                outcome.failure = f"{block.where}: an earlier block of the page, {failed}, failed"
            else:
                outcome.failure = run_one(block, folder, reader)
                if outcome.failure:
                    failed = block.name
                    failed_pages.add(page)
            outcome.done.set()

    pages = sorted({b.page for b in RUN_BLOCKS if b.name in selected},
                   key=lambda page: -sum(b.page == page for b in RUN_BLOCKS))  # long ones first
    pool = concurrent.futures.ThreadPoolExecutor(PARALLEL_PAGES)
    futures = [pool.submit(follow, page) for page in pages]
    yield outcomes
    pool.shutdown(wait=True)
    for future in futures:
        future.result()  # (a failure of the runner itself, not of a block)
    for page, folder in folders.items():  # (training runs write gigabytes; a failed page's stays)
        if page not in failed_pages:
            shutil.rmtree(folder, ignore_errors=True)


def run_one(block: Block, folder: Path, reader: dict) -> str:
    """Runs `block` in `folder`; "" if it succeeded, else what went wrong."""
    env, scripts = reader["env"], reader["root"] / "scripts"
    scripts.mkdir(exist_ok=True)
    if block.language == "python":
        script = scripts / f"{block.name.replace('/', '-').replace(':', '-')}.py"
        script.write_text(block.code)
        command = [*reader["python"], str(script)]
    else:
        script = scripts / f"{block.name.replace('/', '-').replace(':', '-')}.sh"
        script.write_text(shell_script(block))
        command = ["bash", "-e", "-o", "pipefail", str(script)]
    try:
        done = subprocess.run(command, cwd=folder, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, timeout=BLOCK_TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        output = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else e.stdout
        return (f"{block.where}: still running after {BLOCK_TIMEOUT_S} s; mark a long run "
                f"`<!-- docs-test: skip (...) -->`\n{(output or '')[-3000:]}")
    if done.returncode != 0:
        return (f"{block.where} ({block.language}) failed with exit status {done.returncode} "
                f"in {folder}:\n{textwrap.indent(block.code, '    ')}\n"
                f"--- output (the end) ---\n{done.stdout[-4000:]}")
    return ""


@pytest.mark.parametrize("block", [block_param(b) for b in RUN_BLOCKS])
def test_snippet_runs(block: Block, page_runs):
    outcome = page_runs[block.name]
    outcome.done.wait()
    if outcome.failure:
        pytest.fail(outcome.failure, pytrace=False)


# The pages themselves

NOTES = sorted((ROOT / "benchmarks" / "notes").glob("*.md"))


def test_every_block_says_what_it_is():
    """A block without a language, or in one the test does not know (```shell, ```py), would
    silently not run."""
    unknown = [f"{b.where}: ```{b.language}" for b in ALL_BLOCKS
               if b.language not in RUNNABLE | NOT_RUN]
    assert unknown == [], f"fence languages the docs test neither runs nor knows: {unknown}"
    files = [b.where for b in ALL_BLOCKS if b.marker == "file" and b.language not in NOT_RUN]
    assert files == [], f"`docs-test: file` blocks must be file contents (```text): {files}"

LINK = re.compile(r"\[[^\]]*\]\((?P<target>[^)\s]+)\)")


def test_every_guide_is_linked_from_the_readme():
    readme = (ROOT / "README.md").read_text()
    missing = [p.name for p in PAGES[1:] if f"docs/{p.name}" not in readme]
    assert missing == [], f"README.md links no {missing}"


def anchors(path: Path) -> set[str]:
    """The anchors GitHub gives a page's headings: lower case, punctuation dropped, spaces to
    hyphens (outside code blocks)."""
    found, in_code = set(), False
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            found.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return found


@pytest.mark.parametrize("page", PAGES + NOTES, ids=[p.relative_to(ROOT).as_posix()
                                                     for p in PAGES + NOTES])
def test_relative_links_lead_somewhere(page: Path):
    broken = []
    for match in LINK.finditer(page.read_text()):
        target, _, anchor = match["target"].partition("#")
        if "://" in target or target.startswith("mailto:"):
            continue
        path = page.parent / target if target else page
        if not path.exists() or (anchor and path.suffix == ".md" and anchor not in anchors(path)):
            broken.append(match["target"])
    assert broken == [], f"{page.relative_to(ROOT)} links to missing files or headings: {broken}"


def test_blocks_are_found_and_markers_read():
    assert RUN_BLOCKS, "no runnable blocks found in README.md and docs/"
    sample = textwrap.dedent("""\
        <!-- docs-test: skip (needs a GPU) -->
        ```bash
        ccld generate "a cat" --device cuda
        ```

        ```text
        not run
        ```

        ```console
        $ ccld info x \\
            --json
        {"kind": "..."}
        ```
        """)
    page_blocks = parse_blocks("docs/sample.md", sample)
    assert [(b.number, b.language, b.marker, reason(b)) for b in page_blocks] == [
        (1, "bash", "skip", "needs a GPU"), (0, "text", None, ""), (2, "console", None, "")]
    assert shell_script(page_blocks[2]) == "ccld info x \\\n    --json\n"

