"""Training and evaluation options as untrusted input: every number against the limits table,
one line before any work; a loss gone non-finite stops the run with its last good checkpoint
kept; an evaluation never writes over a file it did not write, nor NaN into its JSON."""

import json

import pytest
import torch

from ccld.apps.cli import main
from conftest import QUIET

TINY = ["--base-channels", "8", "--channel-multipliers", "1,1,1,1"]


@pytest.mark.parametrize("option, message", [
    (["--lr", "inf"], "--lr must be a number above 0 and at most 1 (got inf)"),
    (["--lr", "0"], "--lr must be a number above 0 and at most 1 (got 0"),
    (["--weight-decay", "nan"], "--weight-decay must be a number from 0 to 10 (got nan)"),
    (["--weight-decay", "-5"], "--weight-decay must be a number from 0 to 10 (got -5"),
    (["--seed", "-1"], "--seed must be a whole number from 0 to 18446744073709551615 (got -1)"),
    (["--log-every", "0"], "--log-every must be a whole number from 1 to 1000000000 (got 0)"),
    (["--demo-guidance", "nan"], "--demo-guidance must be a number from -100 to 100 (got nan)"),
    (["--base-channels", "0"], "--base-channels must be a multiple of 8 from 8 to 1024 (got 0)"),
])
def test_a_bad_training_number_is_one_line_before_any_work(tmp_path, capsys, option, message):
    out = tmp_path / "run"
    status = main(["train", "--data", str(tmp_path / "not-read"), "--out", str(out), *QUIET,
                   *option])
    err = capsys.readouterr().err.strip()
    assert status == 2 and err.count("\n") == 0 and message in err, err
    assert not out.exists()


@pytest.mark.slow
def test_a_non_finite_loss_stops_the_run_and_keeps_its_last_good_checkpoint(
        latent_cache, tmp_path, capsys, monkeypatch, one_thread):
    from ccld.training.checkpointing import load_training_checkpoint
    from ccld.training.train import VelocityObjective

    real_loss, calls = VelocityObjective.loss, []

    def goes_nan_at_step_3(self, model, batch):
        loss, parts = real_loss(self, model, batch)
        calls.append(1)
        return (loss * float("nan") if len(calls) == 3 else loss), parts

    monkeypatch.setattr(VelocityObjective, "loss", goes_nan_at_step_3)
    out = tmp_path / "run"
    status = main(["train", "--data", str(latent_cache), "--out", str(out), *TINY, *QUIET,
                   "--batch-size", "4", "--max-steps", "10", "--checkpoint-every", "2",
                   "--demo-every", "0"])
    err = capsys.readouterr().err
    assert status == 2 and "step 3: the loss went non-finite" in err and "Traceback" not in err
    last = load_training_checkpoint(out / "checkpoints" / "last.ckpt", "train")
    assert int(last["global_step"]) == 2
    weights = [v for v in last["state_dict"].values() if torch.is_floating_point(v)]
    assert weights and all(bool(torch.isfinite(v).all()) for v in weights)


def test_evaluate_refuses_to_write_over_a_file_it_did_not_write(tmp_path, capsys):
    precious = tmp_path / "model.ckpt"
    precious.write_bytes(b"weights")
    status = main(["evaluate", "--teacher", "t.ckpt", "--student", "s.ckpt", "--json",
                   str(precious)])
    err = capsys.readouterr().err.strip()
    assert status == 2 and "exists and is not an evaluation ccld wrote" in err
    assert precious.read_bytes() == b"weights"
    with pytest.raises(SystemExit):  # (a bad guidance: the schema's one line, before loading)
        main(["evaluate", "--teacher", "t.ckpt", "--student", "s.ckpt", "--guidance", "x"])


@pytest.mark.parametrize("option, message", [
    (["--guidance", "nan"], "guidance must be a number from -100 to 100 (got nan)"),
    (["--size", "100"], "must be a multiple of 64 from 64 to 1024 (got 100)"),
])
def test_evaluate_checks_its_numbers_before_loading(tmp_path, capsys, option, message):
    status = main(["evaluate", "--teacher", "missing.ckpt", "--student", "missing.ckpt",
                   "--json", str(tmp_path / "e.json"), *option])
    err = capsys.readouterr().err.strip()
    assert status == 2 and message in err and "missing.ckpt" not in err


def test_evaluation_json_has_no_nan():
    from ccld.training.commands import finite_or_none

    result = {"psnr": float("inf"), "per_prompt": [{"psnr": float("nan"), "mse": 0.0}]}
    assert json.loads(json.dumps(finite_or_none(result), allow_nan=False)) == \
        {"psnr": None, "per_prompt": [{"psnr": None, "mse": 0.0}]}
