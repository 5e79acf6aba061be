"""benchmarks/gpu_smoke.py, the GPU and Mac owners' one command, keeps working: on the CPU here."""

import importlib.util
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_the_smoke_script_passes_on_the_cpu(fixtures, tmp_path, monkeypatch, capsys):
    spec = importlib.util.spec_from_file_location("gpu_smoke", ROOT / "benchmarks" / "gpu_smoke.py")
    smoke = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(smoke)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    # torch.compile on a CPU takes minutes, and api-512 compares `auto` with fp32 at 512 px
    # (a third of the script's time here) where `auto` is mostly fp32: the GPU owner's run has them
    status = smoke.main(["--device", "cpu", "--fixtures", str(fixtures),
                         "--skip", "compile,api-512"])
    lines = capsys.readouterr().out.splitlines()
    assert status == 0, "\n".join(lines)
    checked = {line.split()[1]: line.split()[0] for line in lines[1:-1]}
    assert set(checked) == set(smoke.CHECKS)
    skipped = {"compile", "api-512", "too-many-ranks"}  # the last: no CUDA here
    assert {name for name, outcome in checked.items() if outcome == "skip"} == skipped
    assert sum(outcome == "ok" for outcome in checked.values()) == len(smoke.CHECKS) - 3
    assert lines[-1] == f"{len(smoke.CHECKS) - 3} ok, 0 failed, 3 skipped"
