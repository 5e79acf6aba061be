"""Prompt files (`ccld generate --prompts-file`): every row's pictures and a manifest, reruns
that paint only what is missing, rows batched together painting what each paints alone, and
two processes sharing one run."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ccld.apps.cli import main
from conftest import LAUNCH_ENV, accelerate_launch

SRC = Path(__file__).resolve().parents[2] / "src"
FAST = ["--steps", "2", "--width", "128", "--height", "128", "-q"]  # (decodes are the time)


def manifest(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()
            if line.startswith("{") and line.endswith("}")]


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path)).astype(int)


def test_a_full_disk_while_recording_leaves_no_unrecorded_picture(model_flags, tmp_path,
                                                                   monkeypatch, capsys):
    """When the manifest line cannot be written, its picture goes too, the run stops with one
    line, and the same command resumes from there."""
    import ccld.apps.batch

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a castle\na lighthouse\na forest\n")
    out = tmp_path / "out"
    real_write, lines = os.write, []

    def full_on_the_second_line(fd, data):
        if data.startswith(b"{") and b'"row"' in data:
            lines.append(data)
            if len(lines) == 2:
                raise OSError(28, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(ccld.apps.batch.os, "write", full_on_the_second_line)
    args = ["generate", "--prompts-file", str(prompts), "--out", str(out), "--batch-size", "1",
            *FAST, *model_flags]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "could not record 00001.png in the manifest (No space left on device)" in err
    assert err.count("\n") == 1
    assert sorted(p.name for p in out.glob("*.png")) == [r["file"] for r in manifest(out)] == \
        ["00000.png"]
    monkeypatch.setattr(ccld.apps.batch.os, "write", real_write)
    assert main(args) == 0
    assert [r["row"] for r in manifest(out)] == [0, 1, 2]
    assert sorted(p.name for p in out.glob("*.png")) == [r["file"] for r in manifest(out)]


def test_a_prompt_file_paints_each_row_once_and_a_rerun_paints_nothing(model_flags, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# three pictures\na castle\n\na lighthouse:5\na forest at dawn\n")
    out = tmp_path / "out"
    # in a process of its own: a run without a launcher starts no process group
    check = ("import sys\nimport torch.distributed as dist\nfrom ccld.apps.cli import main\n"
             "code = main(sys.argv[1:])\nprint('group', dist.is_initialized())\nsys.exit(code)")
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-c", check, "generate", "--prompts-file", str(prompts),
                          "--seed", "10", "--out", str(out), *FAST, *model_flags],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines()[-1] == "group False"
    rows = manifest(out)
    assert sorted(p.name for p in out.glob("*.png")) == [r["file"] for r in rows] == \
        ["00000.png", "00001.png", "00002.png"]
    assert [(r["row"], r["line"], r["index"]) for r in rows] == [(0, 2, 0), (1, 4, 0), (2, 5, 0)]
    assert [r["parameters"]["prompts"] for r in rows] == [[["a castle", 3.0]],
                                                           [["a lighthouse", 5.0]],
                                                           [["a forest at dawn", 3.0]]]
    assert [r["parameters"]["seed"] for r in rows] == [10, 11, 12]  # --seed plus the row's place
    assert all(r["parameters"]["steps"] == 2 and r["time"] for r in rows)

    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert main(["generate", "--prompts-file", str(prompts), "--seed", "10", "--out", str(out),
                 *FAST, *model_flags]) == 0
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    # a changed setting is another picture: painted anew, nothing overwritten
    assert main(["generate", "--prompts-file", str(prompts), "--seed", "10", "--out", str(out),
                 "--steps", "1", "-q", *model_flags]) == 0
    assert len(manifest(out)) == 6 and len(list(out.glob("*.png"))) == 6
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.name in before
            and p.suffix == ".png"} == {k: v for k, v in before.items() if k.endswith(".png")}


@pytest.mark.slow
def test_a_killed_run_resumes_where_it_stopped(model_flags, tmp_path, monkeypatch):
    import ccld.io.images

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompts": ["a castle"], "n": 2}\n'
                       '{"prompts": ["a tree:2", ["a dog", -1]], "seed": 7, "method": "plms"}\n'
                       '{"image_prompts": [], "prompts": "a sea", "steps": 1}\n')
    out = tmp_path / "out"
    argv = ["generate", "--prompts-file", str(prompts), "--out", str(out), *FAST, *model_flags]
    save_numbered = ccld.io.images.save_numbered
    saved = []

    def crash_after_one(image, folder, number, prefix=""):
        if saved:
            raise KeyboardInterrupt  # as if killed while writing the second picture
        saved.append(number)
        return save_numbered(image, folder, number, prefix)

    monkeypatch.setattr(ccld.io.images, "save_numbered", crash_after_one)
    assert main(argv) == 130
    assert len(manifest(out)) == 1 and len(list(out.glob("*.png"))) == 1
    with open(out / "manifest.jsonl", "a") as f:
        f.write('{"file": "00001.png", "row": 0, "ke')  # a line torn by the crash
    monkeypatch.setattr(ccld.io.images, "save_numbered", save_numbered)

    assert main(argv) == 0
    rows = manifest(out)
    keys = [(r["row"], r["key"], r["index"]) for r in rows]
    assert len(keys) == len(set(keys)) == 4
    assert sorted((r, i) for r, _, i in keys) == [(0, 0), (0, 1), (1, 0), (2, 0)]
    assert sorted(p.name for p in out.glob("*.png")) == sorted(r["file"] for r in rows)
    assert main(argv) == 0 and len(manifest(out)) == 4  # and then nothing is left


def test_batched_rows_paint_what_each_paints_alone(fixture_pipeline):
    quick = dict(steps=2, size=128)  # as FAST
    requests = [dict(prompts="a castle", seed=3, num_images=2, **quick),
                dict(prompts=["a tree:2", ("a dog", -1)], seed=5, **quick),  # other conditions
                dict(prompts="a sea", seed=1, num_images=3, method="ddpm", **quick),  # alone
                dict(prompts="a sea", seed=1, num_images=3, **quick)]
    wanted = [[0, 1], [0], [1], [2]]  # a resumed run's: the others' noise is skipped
    painted = list(fixture_pipeline.iter_many(requests, wanted=wanted, batch_size=4,
                                              progress=False))
    assert sorted((n, json.loads(im.info["parameters"])["index"]) for n, im in painted) == \
        [(0, 0), (0, 1), (1, 0), (2, 1), (3, 2)]
    alone = {number: list(fixture_pipeline.iter_images(**requests[number], batch_size=4,
                                                      progress=False))
             for number in range(len(requests))}
    for number, image in painted:
        alone_image = alone[number][json.loads(image.info["parameters"])["index"]]
        # the same settings and records, but for the batch each was painted in (a record)
        shared, by_itself = (json.loads(im.info["parameters"]) for im in (image, alone_image))
        assert shared.pop("batch", None) is None or number == 2  # shared rows: no one batch
        by_itself.pop("batch", None)
        assert shared == by_itself
        # only float rounding, which differs between batch layouts, may move a level
        assert np.abs(np.asarray(image).astype(int) - np.asarray(alone_image).astype(int)).max() <= 1
    assert json.loads(alone[0][1].info["parameters"])["batch"] == [0, 2]  # both, in one batch


def test_bad_rows_are_one_line_naming_the_line(tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    for text, message in [('{"prompts": "a castle"}\n{"prompt": "a tree"}\n',
                           "line 2: unknown key 'prompt'; a row may set "),
                          ('{"prompts": "a castle"\n', "line 1: not JSON"),
                          ('a castle:2x\n', "line 1: bad prompt weight in 'a castle:2x'"),
                          ('{"seed": 3}\n', "line 1: nothing to paint from"),
                          ('a\n{"prompts": "b", "n": 0}\n', "line 2: n must be a whole number"),
                          ('{"prompts": "b", "init_image": 3}\n', "line 1: init_image is 3;"),
                          ('# nothing\n\n', "no prompts in it")]:
        prompts.write_text(text)
        assert main(["generate", "--prompts-file", str(prompts), "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and message in err, err
    assert main(["generate", "a castle", "--prompts-file", str(prompts)]) == 2
    assert "either on the command line or in --prompts-file" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.skipif(sys.platform == "win32", reason="the torchrun launcher's gloo group")
@pytest.mark.slow
def test_two_processes_share_six_rows_and_write_one_manifest(model_flags, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"painting number {i}\n" for i in range(6)))
    out = tmp_path / "out"
    command = [*accelerate_launch("--multi_gpu", "--num_processes", "2"), "-m", "ccld",
               "generate", "--prompts-file", str(prompts), "--out", str(out), "--steps", "1",
               "--batch-size", "2", "-q", *model_flags]
    env = {**LAUNCH_ENV, "PYTHONPATH": str(SRC)}
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    rows = manifest(out)
    assert sorted(r["row"] for r in rows) == list(range(6))  # each row once
    assert {r["rank"] for r in rows} == {0, 1}  # both processes painted
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [r["file"] for r in rows] + ["manifest.jsonl"])  # no part left unmerged
    images = [pixels(out / r["file"]) for r in rows]
    assert all(np.abs(a - b).max() > 0 for i, a in enumerate(images) for b in images[i + 1:])


def test_rows_inpaint_and_paint_larger_with_n(model_flags, tmp_path):
    init, mask = tmp_path / "init.png", tmp_path / "mask.png"
    Image.new("RGB", (64, 64), (40, 160, 90)).save(init)
    half = Image.new("L", (64, 64), 0)
    half.paste(255, (32, 0, 64, 64))
    half.save(mask)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        json.dumps({"prompts": ["a cat"], "init_image": str(init), "mask": str(mask),
                    "mask_blur": 2, "n": 2}) + "\n"
        + json.dumps({"prompts": ["a dog"], "hires": [128, 64], "hires_steps": 1}) + "\n")
    out = tmp_path / "out"
    assert main(["generate", "--prompts-file", str(prompts), *FAST, "--width", "64", "--height",
                 "64", "--method", "ddim", "--out", str(out), *model_flags]) == 0
    rows = manifest(out)
    assert [(r["row"], r["index"]) for r in rows] == [(0, 0), (0, 1), (1, 0)]
    assert rows[0]["parameters"]["mask"] == str(mask)
    for row in rows[:2]:  # the unmasked half is the init image's, exactly
        assert (pixels(out / row["file"])[:, :24] == (40, 160, 90)).all()
    with Image.open(out / rows[2]["file"]) as larger:
        assert larger.size == (128, 64)
