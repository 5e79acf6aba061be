"""`ccld generate` as a process, where the process itself is what is tested: its peak memory
over many images, Ctrl-C while it starts, and how fast and how plainly it says it is offline."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"
# Runs `ccld` in this process's Python and prints, after it, the process's peak resident memory.
MEASURED = ("import resource, sys\nfrom ccld.apps.cli import main\ncode = main(sys.argv[1:])\n"
            "print('peak_kb', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\nsys.exit(code)")


def environment(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    env.update(PYTHONPATH=os.pathsep.join(filter(None, [str(SRC), env.get("PYTHONPATH")])),
               OMP_NUM_THREADS="1", **extra)
    return env


def closed_port() -> int:
    with socket.socket() as s:  # a loopback port with nothing listening
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(sys.platform == "win32", reason="ru_maxrss is POSIX")
@pytest.mark.slow
def test_many_images_paint_in_bounded_memory(model_flags, tmp_path):
    """Peak memory for 16 images is that for 2, give or take: a batch at a time, each written
    when done (one batch of 16 would need about 700 MB more with the fixture models)."""
    runs = {}
    for n in (2, 16):
        argv = ["generate", "a castle", "-n", str(n), "--batch-size", "2", "--steps", "1",
                "--method", "ddim", "-q", "--out", str(tmp_path / str(n)), *model_flags]
        runs[n] = subprocess.Popen([sys.executable, "-c", MEASURED, *argv], env=environment(),
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peaks = {}
    for n, proc in runs.items():
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err
        assert len(list((tmp_path / str(n)).glob("0*.png"))) == n
        peaks[n] = int(out.split("peak_kb")[-1]) / 1024
    assert peaks[16] - peaks[2] < 150, peaks  # MB


def _ctrl_c_as_at_a_terminal():
    # A shell starts background jobs with SIGINT ignored, and Python keeps an ignored SIGINT
    # ignored: under `pytest &` the child would paint to the end and exit 0, as it should there
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_during_start_up_is_one_line(model_flags, tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "ccld", "generate", "a castle", "-q",
                             "--out", str(tmp_path / "out"), *model_flags], env=environment(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_ctrl_c_as_at_a_terminal)
    time.sleep(1.0)  # well inside the start-up: importing torch alone takes longer
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    # it dies of the SIGINT, as a shell expects of an interrupted program
    assert (proc.returncode, err.strip()) == (-signal.SIGINT, "ccld: interrupted")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_offline_is_said_at_once_in_one_line(tmp_path):
    """The hub at a closed loopback port and an empty cache: one complete line in seconds (not
    a minute of retries), and no output folder."""
    port = closed_port()
    timed = ("import sys, time\nimport ccld.pipeline\nfrom ccld.apps.cli import main\n"
             "started = time.perf_counter()\ncode = main(sys.argv[1:])\n"
             "print('seconds', time.perf_counter() - started)\nsys.exit(code)")
    env = environment(HF_ENDPOINT=f"http://127.0.0.1:{port}", HF_HOME=str(tmp_path / "hf"))
    env.pop("HF_HUB_OFFLINE", None)
    proc = subprocess.run([sys.executable, "-c", timed, "generate", "a castle", "-q",
                           "--out", str(tmp_path / "out")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0] == (f"ccld: error: could not get model_student.ckpt from the hub repo "
                        f"huggan/distill-ccld-wa: cannot reach 127.0.0.1:{port} (Connection "
                        "refused); check the network, or run `ccld download` once while online, "
                        "or pass local model files")
    assert float(proc.stdout.split("seconds")[-1]) < 10  # the hub's own retries take 24 s
    assert not (tmp_path / "out").exists()
    # offline mode says so, as fast
    proc = subprocess.run([sys.executable, "-m", "ccld", "generate", "a castle", "-q",
                           "--out", str(tmp_path / "out")], env={**env, "HF_HUB_OFFLINE": "1"},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "HF_HUB_OFFLINE is set" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_a_painting_ends_the_process_with_everything_on_disk(model_flags, tmp_path):
    """`ccld generate` skips the interpreter's teardown once done (os._exit): what it printed is
    flushed, the picture written, and a first run's cache entries published, not left half."""
    env = environment(CCLD_CACHE_DIR=str(tmp_path / "cache"))
    proc = subprocess.run([sys.executable, "-m", "ccld", "generate", "a castle", "--steps", "2",
                           "--method", "ddim", "--out", str(tmp_path / "out"), *model_flags],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    png = tmp_path / "out" / "00000.png"
    assert png.is_file() and str(png) in proc.stdout
    converted = sorted(p.name for p in (tmp_path / "cache" / "converted").iterdir())
    assert converted and not any(name.startswith(".") for name in converted), converted
    assert all((tmp_path / "cache" / "converted" / n / "entry.json").is_file() for n in converted)
