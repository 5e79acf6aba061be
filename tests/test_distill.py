"""`ccld distill` and `ccld evaluate` on tiny models: the student learns the teacher's velocity,
the guided and true-v variants compute what they say, and the evaluation measures the pair."""

import json

import pytest
import torch

from ccld.cli import main
from ccld.models.unet import CCLDUNet
from ccld.training.distill import DistillationObjective
from ccld.training.objective import NoisedBatch
from conftest import QUIET, encoder_options, state

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def world(fixtures, narrow_autoencoder, latent_cache, tmp_path_factory):
    """A tiny random teacher (16, 1,1,2,2), an initial student (8, 1,1,1,1) and the shared
    latent cache."""
    models = tmp_path_factory.mktemp("distill")
    torch.manual_seed(1)
    teacher = CCLDUNet(16, (1, 1, 2, 2))
    teacher.autoencoder_scale.fill_(0.35)
    torch.save(teacher.state_dict(), models / "teacher.ckpt")
    torch.manual_seed(2)
    torch.save(CCLDUNet(8, (1, 1, 1, 1)).state_dict(), models / "student.ckpt")
    return {"cache": latent_cache, "teacher": models / "teacher.ckpt",
            "student": models / "student.ckpt", "autoencoder": narrow_autoencoder,
            "fixtures": fixtures}


def test_objective_targets_the_teacher_its_guidance_and_the_true_v():
    torch.manual_seed(0)
    teacher, student = CCLDUNet(8, (1, 1, 1, 1)).eval(), CCLDUNet(8, (1, 1, 1, 1))
    cond = torch.randn(3, 512)
    cond[2] = 0  # a dropped condition
    batch = NoisedBatch(torch.randn(3, 4, 8, 8), torch.rand(3), cond, torch.randn(3, 4, 8, 8))
    with torch.no_grad():
        v_cond = teacher(batch.x, batch.t, cond)
        v_uncond = teacher(batch.x, batch.t, torch.zeros_like(cond))
        v_student = student(batch.x, batch.t, cond)
    plain = DistillationObjective(teacher)
    assert torch.allclose(plain.teacher_velocity(batch), v_cond, atol=1e-5)
    guided = DistillationObjective(teacher, guidance=3.0).teacher_velocity(batch)
    assert torch.allclose(guided, v_uncond + 3 * (v_cond - v_uncond), atol=1e-5)
    assert torch.allclose(guided[2], v_uncond[2], atol=1e-5)  # unconditional rows learn v_u
    mixed, parts = DistillationObjective(teacher, true_v_weight=0.5).match_teacher(student, batch)
    teacher_mse = (v_student - v_cond).square().mean()
    true_mse = (v_student - batch.v).square().mean()
    assert torch.allclose(parts["teacher_mse"], teacher_mse, atol=1e-5)
    assert torch.allclose(mixed, teacher_mse + 0.5 * true_mse, atol=1e-5)


def test_student_learns_the_teachers_velocity(world, tmp_path):
    from ccld.models.unet import load_unet, unet_from_state_dict
    from ccld.training.checkpointing import split_state_dict

    teacher, student = load_unet(world["teacher"]), load_unet(world["student"])
    generator = torch.Generator().manual_seed(123)  # held-out inputs, never trained on
    x, t = torch.randn(16, 4, 8, 8, generator=generator), torch.rand(16, generator=generator)
    embed = torch.randn(16, 512, generator=generator)
    embed[::4] = 0

    def v_mse(model):
        with torch.no_grad():
            return (model(x, t, embed) - teacher(x, t, embed)).square().mean().item()

    out = tmp_path / "run"
    (tmp_path / "p.txt").write_text("a painting of a harbour\n")
    assert main(["distill", "--data", str(world["cache"]), "--out", str(out),
                 "--teacher", str(world["teacher"]), "--student-init", str(world["student"]),
                 "--batch-size", "8", "--lr", "1e-3", "--max-steps", "50", "--log-every", "10",
                 "--checkpoint-every", "0", "--num-workers", "0", "--no-tensorboard",
                 "--demo-every", "1000", "--demo-steps", "1",
                 "--demo-prompts", str(tmp_path / "p.txt")]) == 0
    raw, ema = split_state_dict(state(out / "checkpoints" / "last.ckpt")["state_dict"])
    start, end = v_mse(student), v_mse(unet_from_state_dict(raw))
    assert end * 5 <= start, (start, end)

    exported = load_unet(out / "model_student.safetensors")  # the EMA, also as model_student.ckpt
    assert exported.config == {"base_channels": 8, "channel_multipliers": [1, 1, 1, 1],
                               "embed_dim": 512}
    assert float(exported.autoencoder_scale) == pytest.approx(0.35)  # the teacher's latent space
    assert all(torch.equal(v, ema[k]) for k, v in state(out / "model_student.ckpt").items())

    from PIL import Image

    with Image.open(out / "demo" / "demo-00000001.png") as grid:  # teacher above student
        assert grid.size == (64, 128)


def test_student_defaults_and_option_errors(world, tmp_path, capsys):
    from ccld.training.commands import STUDENT_ARCHITECTURE, parse_multipliers

    assert STUDENT_ARCHITECTURE == (192, "1,1,2,2") and parse_multipliers("1,1,2,2") == [1, 1, 2, 2]
    assert main(["distill", "--data", str(world["cache"]), "--out", str(tmp_path / "bad"),
                 "--teacher", str(world["teacher"]), *QUIET, "--distill-guidance", "-1"]) == 2
    assert "--distill-guidance must be at least 0" in capsys.readouterr().err


def test_evaluate_reports_the_pair_as_table_and_json(world, tmp_path, capsys):
    files = encoder_options(world["autoencoder"], world["fixtures"])
    common = ["a quiet harbour", "-n", "2", "--steps", "2", "--size", "64", *files]
    same = tmp_path / "same.json"
    assert main(["evaluate", "--teacher", str(world["teacher"]), "--student",
                 str(world["teacher"]), "--json", str(same), *common]) == 0
    result = json.loads(same.read_text())["summary"]
    assert result["v_mse"] == 0 and result["psnr_db"] > 100  # identical models, identical images
    assert result["cloob_similarity_teacher"] == result["cloob_similarity_student"]

    other = tmp_path / "other.json"
    assert main(["evaluate", "--teacher", str(world["teacher"]), "--student",
                 str(world["student"]), "--json", str(other), "--images", str(tmp_path / "img"),
                 *common]) == 0
    printed = capsys.readouterr().out
    assert "v-MSE" in printed and "seconds per image" in printed
    result = json.loads(other.read_text())
    assert result["summary"]["v_mse"] > 0 and result["summary"]["psnr_db"] < 100
    assert result["summary"]["seconds_per_image_student"] > 0
    assert [r["prompt"] for r in result["prompts"]] == ["a quiet harbour"]
    assert (tmp_path / "img" / "compare-000.png").is_file()
