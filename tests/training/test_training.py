"""`ccld train` on tiny models and a tiny synthetic dataset: the loss falls, the EMA follows its
schedule, stop-and-resume equals an uninterrupted run, checkpoints survive crashes and load
everywhere, every kind of input trains, and two processes stay in sync."""

import json
import signal
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from ccld.apps.cli import main
from ccld.errors import CCLDError
from ccld.training.ema import ema_decay, ema_update
from conftest import LAUNCH_ENV, QUIET, accelerate_launch, encoder_options, state

REPO = Path(__file__).resolve().parents[2]
TINY = ["--base-channels", "8", "--channel-multipliers", "1,1,1,1"]

# training runs and launched processes, each torch on one thread
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


@pytest.fixture(scope="module")
def world(fixtures, image_sources, narrow_autoencoder, latent_cache):
    """The shared image sources, narrow autoencoder and latent cache (conftest.py), by name."""
    return {**image_sources, "autoencoder": narrow_autoencoder, "cache": latent_cache,
            "fixtures": fixtures}


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]


# The pieces

def test_ema_decay_schedule_is_the_reference():
    assert [ema_decay(s) for s in (0, 19_999, 20_000, 199_999, 200_000, 10**6)] == \
        [0.99, 0.99, 0.999, 0.999, 0.9999, 0.9999]
    assert [ema_decay(s, decay_at=50) for s in (49, 19_999, 20_000)] == [0.99, 0.99, 0.9999]
    assert [ema_decay(s, 4, warmup_steps=2) for s in range(6)] == [0.99, 0.99, 0.999, 0.999,
                                                                   0.9999, 0.9999]


def test_lr_schedules_decay_from_the_lr_towards_zero_at_the_last_step():
    from ccld.training.engine import lr_factor

    assert [lr_factor("constant", k, None) for k in (0, 10**6)] == [1.0, 1.0]
    assert [lr_factor("linear", k, 4) for k in range(5)] == [1.0, 0.75, 0.5, 0.25, 0.0]
    assert [round(lr_factor("cosine", k, 4), 4) for k in range(5)] == \
        [1.0, 0.8536, 0.5, 0.1464, 0.0]


def test_ema_update_averages_parameters_and_copies_buffers():
    model, averaged = torch.nn.BatchNorm1d(3), torch.nn.BatchNorm1d(3)
    with torch.no_grad():
        model.weight.fill_(2.0)
        averaged.weight.fill_(1.0)
        model.running_mean.fill_(5.0)
    ema_update(model, averaged, 0.9)
    assert torch.allclose(averaged.weight, torch.full([3], 1.1))
    assert torch.equal(averaged.running_mean, model.running_mean)


def test_noised_batch_follows_the_v_parameterisation():
    from ccld.sampling import t_to_alpha_sigma
    from ccld.training.objective import noised_batch

    mean, logvar = torch.randn(64, 4, 2, 2), torch.full([64, 4, 2, 2], -60.0)  # a sharp posterior
    embed = torch.randn(64, 8)
    t = torch.rand(64)
    batch = noised_batch(mean, logvar, embed, 2.0, t, torch.Generator().manual_seed(0), 0.5)
    alpha, sigma = (a[:, None, None, None] for a in t_to_alpha_sigma(t))
    assert torch.allclose(batch.x * alpha - batch.v * sigma, mean / 2, atol=1e-5)  # x0 = z / scale
    dropped = (batch.cond == 0).all(1)
    assert torch.equal(batch.cond[~dropped], embed[~dropped]) and 16 < dropped.sum() < 48
    never = noised_batch(mean, logvar, embed, 2.0, t, torch.Generator().manual_seed(0), 0.0)
    assert torch.equal(never.cond, embed)


def test_gradient_checkpointing_gives_the_same_gradients():
    from ccld.models.unet import CCLDUNet
    from ccld.training.engine import enable_gradient_checkpointing, make_trainable

    torch.manual_seed(0)
    plain = make_trainable(CCLDUNet(8, (1, 1, 1, 1)))
    checkpointed = make_trainable(CCLDUNet(8, (1, 1, 1, 1)))
    checkpointed.load_state_dict(plain.state_dict())
    enable_gradient_checkpointing(checkpointed)
    x, t, embed = torch.randn(2, 4, 8, 8), torch.rand(2), torch.randn(2, 512)
    for net in (plain, checkpointed):
        net(x, t, embed).square().mean().backward()
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters()):
        if a.requires_grad:
            assert torch.allclose(a.grad, b.grad, atol=1e-6), name
    assert set(plain.state_dict()) == set(checkpointed.state_dict())


def test_crash_mid_save_leaves_the_last_good_checkpoint(tmp_path, monkeypatch):
    from ccld.training import checkpointing

    folder = checkpointing.CheckpointFolder(tmp_path / "checkpoints")
    folder.save({"global_step": 1, "w": torch.ones(3)}, 1)

    def dies_halfway(obj, f):
        f.write(b"PK\x03\x04 half a zip")
        raise KeyboardInterrupt  # the process is stopped mid-write

    monkeypatch.setattr(checkpointing.torch, "save", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        folder.save({"global_step": 2, "w": torch.zeros(3)}, 2)
    monkeypatch.undo()
    assert state(folder.last)["global_step"] == 1
    assert sorted(p.name for p in folder.folder.iterdir()) == ["last.ckpt", "step-00000001.ckpt"]

    def disk_full(obj, f):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpointing.torch, "save", disk_full)
    with pytest.raises(CCLDError, match="No space left on device.*previous checkpoint is untouched"):
        folder.save({"global_step": 3}, 3)
    assert state(folder.last)["global_step"] == 1


# Training runs

def train(world, out, *options, data=None) -> int:
    return main(["train", "--data", str(data or world["cache"]), "--out", str(out), *TINY, *QUIET,
                 *options])


def test_training_halves_the_loss_and_writes_loadable_checkpoints(world, tmp_path, capsys):
    from ccld.io.checkpoints import load_safetensors_file
    from ccld.models.unet import load_unet
    from ccld.pipeline import CCLDPipeline
    from ccld.training.checkpointing import split_state_dict

    out = tmp_path / "run"
    assert train(world, out, "--batch-size", "8", "--lr", "1e-3", "--max-steps", "40",
                 "--log-every", "1", "--checkpoint-every", "20") == 0
    printed = capsys.readouterr().out
    assert "autoencoder scale" in printed  # measured on the data and reported
    losses = [m["train/loss"] for m in metrics(out) if "train/loss" in m]
    assert len(losses) == 40
    start, end = sum(losses[:2]) / 2, sum(losses[-5:]) / 5
    assert end < 0.5 * start, (start, end)

    files = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert files == ["last.ckpt", "step-00000020.ckpt", "step-00000040.ckpt"]
    ckpt = state(out / "checkpoints" / "last.ckpt")  # weights_only: tensors and plain values
    assert ckpt["global_step"] == 40 and ckpt["ccld"]["kind"] == "train"
    raw, ema = split_state_dict(ckpt["state_dict"])
    loaded = load_unet(out / "checkpoints" / "last.ckpt")  # the EMA weights, as for sampling
    assert all(torch.equal(v, ema[k]) for k, v in loaded.state_dict().items())
    assert not torch.equal(raw["net.0.main.0.weight"], ema["net.0.main.0.weight"])
    exported = load_safetensors_file(out / "model_ema.safetensors")
    assert all(torch.equal(v, ema[k]) for k, v in exported.items())
    assert all(torch.equal(v, ema[k]) for k, v in state(out / "model_ema.ckpt").items())

    pipe = CCLDPipeline.from_files(unet=out / "model_ema.ckpt", autoencoder=world["autoencoder"],
                                   cloob=world["fixtures"] / "cloob.pkl",
                                   cloob_config=world["fixtures"] / "cloob.json")
    images = pipe("a painting", num_images=1, steps=2, size=64, progress=False)
    assert images[0].size == (64, 64)


def test_a_decaying_learning_rate_reaches_every_update(world, tmp_path):
    assert train(world, tmp_path, "--batch-size", "4", "--max-steps", "4", "--lr", "1e-3",
                 "--lr-schedule", "linear", "--log-every", "1", "--autoencoder-scale", "0.35") == 0
    assert [m["lr"] for m in metrics(tmp_path) if "lr" in m] == \
        pytest.approx([1e-3, 7.5e-4, 5e-4, 2.5e-4])


def test_resume_equals_an_uninterrupted_run_and_ema_follows_the_schedule(world, tmp_path):
    options = ["--batch-size", "3", "--grad-accum", "2", "--lr", "1e-3", "--log-every", "1",
               "--autoencoder-scale", "0.35", "--ema-warmup-steps", "2", "--ema-decay-at", "4"]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert train(world, whole, *options, "--max-steps", "6", "--checkpoint-every", "1") == 0
    assert train(world, parts, *options, "--max-steps", "3", "--checkpoint-every", "0") == 0
    stale = parts / "checkpoints" / ".last.ckpt.999.deadbeef.tmp"  # left by a killed save
    stale.write_bytes(b"half")
    assert train(world, parts, *options, "--max-steps", "6", "--checkpoint-every", "0",
                 "--resume") == 0
    assert not stale.exists()
    a, b = state(whole / "checkpoints" / "last.ckpt"), state(parts / "checkpoints" / "last.ckpt")
    assert a["global_step"] == b["global_step"] == 6
    assert a["data_position"] == b["data_position"]
    for k, v in a["state_dict"].items():
        assert torch.equal(v, b["state_dict"][k]), k
    for pa, pb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(pa["exp_avg_sq"], pb["exp_avg_sq"])
    def losses(out):
        return [m["train/loss"] for m in metrics(out) if "train/loss" in m]

    assert losses(whole) == losses(parts)

    # EMA after step k = d * EMA after step k-1 + (1 - d) * raw weights after step k, with d from
    # the schedule at the k-1 steps taken before (warm-up 2, tighter from 4 here)
    from ccld.training.checkpointing import split_state_dict

    history = [split_state_dict(state(whole / "checkpoints" / f"step-{k:08d}.ckpt")["state_dict"])
               for k in range(1, 7)]
    key = "net.0.main.0.weight"
    for k in range(2, 7):
        decay = ema_decay(k - 1, 4, warmup_steps=2)
        expected = decay * history[k - 2][1][key] + (1 - decay) * history[k - 1][0][key]
        assert torch.allclose(history[k - 1][1][key], expected, atol=1e-6), k
        assert not torch.allclose(history[k - 1][1][key], history[k - 1][0][key])
    assert [m["ema_decay"] for m in metrics(whole) if "ema_decay" in m] == \
        [0.99, 0.99, 0.999, 0.999, 0.9999, 0.9999]


def test_resume_maps_the_checkpoint_and_only_the_main_process_reads_the_ema(world, tmp_path,
                                                                           monkeypatch):
    from accelerate import Accelerator

    from ccld.training import checkpointing

    out = tmp_path / "run"
    options = ["--batch-size", "4", "--autoencoder-scale", "0.35", "--checkpoint-every", "0"]
    assert train(world, out, *options, "--max-steps", "1") == 0
    mapped, load = [], torch.load

    def recording_load(*args, **kwargs):
        mapped.append(kwargs.get("mmap", False))
        return load(*args, **kwargs)

    read = checkpointing.load_training_checkpoint

    def ema_unreadable(path, kind):  # EMA weights that fail wherever they are used
        ckpt = read(path, kind)
        ckpt["state_dict"] = {k: v.to("meta") if k.startswith("model_ema.") else v
                              for k, v in ckpt["state_dict"].items()}
        return ckpt

    monkeypatch.setattr(torch, "load", recording_load)
    monkeypatch.setattr(checkpointing, "load_training_checkpoint", ema_unreadable)
    monkeypatch.setattr(Accelerator, "is_main_process", property(lambda self: False))
    assert train(world, out, *options, "--max-steps", "2", "--resume") == 0  # another process
    assert mapped == [True]  # the checkpoint was mapped, not read into memory
    monkeypatch.undo()
    assert state(out / "checkpoints" / "last.ckpt")["global_step"] == 1  # it wrote nothing


def test_ctrl_c_saves_the_finished_step(world, tmp_path, monkeypatch):
    from ccld.training.train import VelocityObjective

    loss = VelocityObjective.loss
    calls = []

    def interrupted_at_step_two(self, model, batch):
        calls.append(1)
        if len(calls) == 2:
            signal.raise_signal(signal.SIGINT)
        return loss(self, model, batch)

    monkeypatch.setattr(VelocityObjective, "loss", interrupted_at_step_two)
    out = tmp_path / "run"
    handler = signal.getsignal(signal.SIGINT)
    assert train(world, out, "--batch-size", "4", "--autoencoder-scale", "0.35",
                 "--max-steps", "10") == 130
    assert state(out / "checkpoints" / "last.ckpt")["global_step"] == 2
    assert signal.getsignal(signal.SIGINT) is handler  # the usual Ctrl-C again after the run


def test_fine_tuning_starts_from_the_checkpoints_ema_weights_and_scale(world, tmp_path, capsys):
    from ccld.models.unet import load_unet
    from ccld.training.checkpointing import split_state_dict

    init = world["fixtures"] / "unet_lightning.ckpt"  # Lightning format, scale 5.0
    out = tmp_path / "finetune"
    assert main(["train", "--data", str(world["cache"]), "--out", str(out), "--init", str(init),
                 *QUIET, "--batch-size", "2", "--max-steps", "1", "--lr", "1e-12"]) == 0
    assert "autoencoder scale 5.0000" in capsys.readouterr().out  # kept, not measured
    raw, _ = split_state_dict(state(out / "checkpoints" / "last.ckpt")["state_dict"])
    for k, v in load_unet(init).state_dict().items():
        assert torch.allclose(raw[k], v, atol=1e-6), k
    assert main(["train", "--data", str(world["cache"]), "--out", str(tmp_path / "other"),
                 "--init", str(init), *TINY, *QUIET]) == 2
    assert "--init takes the architecture from the checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["folder", "list", "parquet"])
def test_every_input_kind_trains_and_skips_the_corrupt_image(world, tmp_path, kind):
    if world[kind] is None:
        pytest.skip("pyarrow is not installed (pip install 'ccld[train]')")
    out = tmp_path / kind
    demo = ["--demo-every", "2", "--demo-steps", "1", "--demo-prompts", str(tmp_path / "p.txt")]
    (tmp_path / "p.txt").write_text("a red painting\na blue painting\n")
    logs = [] if kind == "folder" else ["--no-tensorboard"]
    assert main(["train", "--data", str(world[kind]), "--out", str(out), "--image-size", "64",
                 *TINY, "--num-workers", "0", *logs, "--batch-size", "3",
                 "--max-steps", "3", "--log-every", "1", "--scale-batches", "1",
                 *(demo if kind == "folder" else ["--demo-every", "0"]),
                 *encoder_options(world["autoencoder"], world["fixtures"])]) == 0
    skipped = sum(m.get("skipped_images", 0) for m in metrics(out))
    assert skipped == (0 if kind == "list" else 1)  # 3 x 3 images: the whole first epoch
    assert state(out / "checkpoints" / "last.ckpt")["global_step"] == 3
    if kind == "folder":
        from PIL import Image

        grids = sorted(p.name for p in (out / "demo").iterdir())
        assert grids == ["demo-00000001.png", "demo-00000003.png"]
        with Image.open(out / "demo" / grids[0]) as grid:
            assert grid.size == (128, 64)  # 2 prompts side by side, 64px each
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            return
        assert list((out / "logs").glob("events.out.tfevents.*"))


def test_user_errors_are_one_line_and_lose_nothing(world, tmp_path, capsys):
    out = tmp_path / "run"
    assert train(world, out, "--batch-size", "4", "--max-steps", "1",
                 "--autoencoder-scale", "0.35") == 0
    capsys.readouterr()
    fresh = tmp_path / "fresh"
    cases = [
        (out, [], "already holds a run"),
        (out, ["--resume", str(tmp_path / "nothing.ckpt")], "no checkpoint to resume from"),
        (fresh, ["--batch-size", "9"], "is more than the 8 items"),
        (fresh, ["--channel-multipliers", "1,2"], "four positive integers"),
        (fresh, ["--cond-drop", "1.5"], "--cond-drop is a probability"),
    ]
    for target, extra, message in cases:
        assert train(world, target, "--batch-size", "4", "--max-steps", "2", *extra) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert train(world, fresh, "--batch-size", "4", "--lr-schedule", "cosine") == 2
    assert "decays over the run: give --max-steps" in capsys.readouterr().err
    assert main(["distill", "--data", str(world["cache"]), "--out", str(out), "--teacher",
                 str(out / "model_ema.ckpt"), *QUIET, "--resume"]) == 2
    assert "written by `ccld train`" in capsys.readouterr().err
    assert state(out / "checkpoints" / "last.ckpt")["global_step"] == 1


@pytest.mark.parametrize("command, option, name", [
    (["train"], "--init", "model_ema.ckpt"),
    (["distill"], "--teacher", "model_student.ckpt"),
    (["distill", "--objective", "progressive", "--start-steps", "4", "--rounds", "1"],
     "--teacher", "model_student.safetensors"),
    (["distill", "--objective", "progressive", "--start-steps", "4", "--rounds", "2"],
     "--teacher", "round-02/model_student.ckpt"),
    (["distill"], "--student-init", "checkpoints/step-00000001.ckpt"),
    (["distill-decoder"], "--init", "tiny_decoder"),
])
def test_a_run_never_writes_over_its_own_inputs(world, tmp_path, capsys, command, option, name):
    """A checkpoint inside --out where the run exports (or checkpoints) is refused before any
    work, and stays byte for byte as it was."""
    out = tmp_path / "run"
    source = world["fixtures"] / "unet.ckpt"
    target = out / name
    if name == "tiny_decoder":
        from ccld.training.decoder import new_tiny_decoder

        new_tiny_decoder(4, 0).save_pretrained(target)
        target = target / next(p.name for p in target.iterdir() if p.suffix == ".safetensors")
        value = f"tiny:{out / name}"
    else:
        target.parent.mkdir(parents=True)
        target.write_bytes(source.read_bytes())
        value = str(out / name)
    before = target.read_bytes()
    teacher = [] if option == "--teacher" or command == ["distill-decoder"] else \
        (["--teacher", str(source)] if command[0] == "distill" else [])
    encoders = encoder_options(world["autoencoder"], world["fixtures"])
    if command == ["distill-decoder"]:  # no demos, no CLOOB
        quiet, encoders = ["--num-workers", "0", "--no-tensorboard"], encoders[:2]
    else:
        quiet = QUIET
    assert main([*command, "--data", str(world["cache"]), "--out", str(out), option, value,
                 *teacher, *quiet, "--batch-size", "2", "--max-steps", "1", *encoders]) == 2
    err = capsys.readouterr().err
    assert f"{option} {value} is where this run writes" in err and err.count("\n") == 1, err
    assert target.read_bytes() == before


def test_without_wandb_the_run_fails_before_its_folder_exists(world, tmp_path, monkeypatch,
                                                              capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    out = tmp_path / "run"
    assert train(world, out, "--batch-size", "4", "--max-steps", "1",
                 "--wandb-project", "art") == 2
    err = capsys.readouterr().err
    assert "needs the wandb package" in err and err.count("\n") == 1, err
    assert not out.exists()


class StandInWandb(types.ModuleType):
    """`wandb` as training uses it: `init` starts a run (a new id unless given one to resume),
    whose `log` calls are recorded as (run id, step)."""

    def __init__(self):
        super().__init__("wandb")
        self.inits, self.logged = [], []

    def init(self, **kwargs):
        self.inits.append(kwargs)
        run = types.SimpleNamespace(id=kwargs.get("id") or f"run-{len(self.inits)}",
                                    finish=lambda: None)
        run.log = lambda values, step: self.logged.append((run.id, step))
        return run


def test_a_resumed_run_logs_to_the_same_wandb_run(world, tmp_path, monkeypatch):
    wandb = StandInWandb()
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    out = tmp_path / "run"
    options = ["--batch-size", "4", "--autoencoder-scale", "0.35", "--log-every", "1",
               "--wandb-project", "art"]
    assert train(world, out, *options, "--max-steps", "1") == 0
    assert train(world, out, *options, "--max-steps", "2", "--resume") == 0
    first, resumed = wandb.inits
    assert first["id"] is None and resumed["id"] == "run-1" and resumed["resume"] == "allow"
    assert wandb.logged == [("run-1", 1), ("run-1", 2)]
    assert state(out / "checkpoints" / "last.ckpt")["wandb_run_id"] == "run-1"


def test_a_cpu_launch_that_would_start_one_process_is_refused(world):
    # Accelerate's --cpu launcher starts one Python where two were asked for (MPI would start
    # the other): the command says so and how to start two, rather than train alone
    command = [*accelerate_launch("--cpu", "--num_processes", "2"), "-m", "ccld",
               "autoencoder-scale", "--data", str(world["cache"]), "--num-workers", "0"]
    run = subprocess.run(command, cwd=REPO, env=LAUNCH_ENV, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode != 0 and run.stdout == "", run.stdout
    assert "ccld: error: accelerate launch started 1 process where several" in run.stderr
    assert "accelerate launch --multi_gpu --num_processes N" in run.stderr


def test_two_processes_keep_identical_weights_and_write_once(world, tmp_path):
    out = tmp_path / "ddp"
    (tmp_path / "p.txt").write_text("a painting\n")
    # `--multi_gpu` selects Accelerate's torchrun launcher, which starts the processes; with no
    # GPU (and --cpu) they talk through gloo. (`--cpu --num_processes 2` would need MPI.)
    command = [*accelerate_launch("--multi_gpu", "--num_processes", "2"), "-m", "ccld", "train",
               "--cpu", "--data", str(world["cache"]), "--out", str(out), *TINY, "--batch-size", "2",
               "--lr", "1e-3", "--max-steps", "4", "--log-every", "1", "--checkpoint-every", "0",
               "--demo-every", "3", "--demo-steps", "1", "--demo-prompts", str(tmp_path / "p.txt"),
               "--num-workers", "0", "--no-tensorboard", "--autoencoder-scale", "0.35"]
    run = subprocess.run(command, cwd=REPO, env=LAUNCH_ENV, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    assert "2 process(es)" in run.stdout
    records = metrics(out)
    assert [r["step"] for r in records if "train/loss" in r] == [1, 2, 3, 4]  # one writer
    saves = [r for r in records if "checkpoint" in r]
    assert len(saves) == 1 and saves[0]["replicas_in_sync"]
    assert len(saves[0]["replica_sha256"]) == 2 and len(set(saves[0]["replica_sha256"])) == 1
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["last.ckpt",
                                                                        "step-00000004.ckpt"]
    assert sorted(p.name for p in (out / "demo").iterdir()) == ["demo-00000001.png",
                                                                "demo-00000004.png"]
    position = state(out / "checkpoints" / "last.ckpt")["data_position"]
    assert position["world_size"] == 2 and position["samples_per_rank"] == 8
