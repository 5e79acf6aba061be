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


# Guidance-conditioned and step-distilled students: the model and its records

def test_guidance_input_starts_as_the_checkpoint_and_every_format_keeps_the_records(
        fixtures, tmp_path):
    from safetensors import safe_open

    from ccld.loading import describe_checkpoint
    from ccld.models.unet import infer_unet_config, load_unet, with_records
    from ccld.training.checkpointing import export_weights

    torch.manual_seed(0)
    teacher = CCLDUNet(8, (1, 1, 1, 1)).eval()
    teacher.autoencoder_scale.fill_(0.5)
    student = with_records(teacher, guidance_input=True, guidance_range=(1.0, 8.0),
                           distilled_steps=4).eval()
    x, t, embed = torch.randn(3, 4, 8, 8), torch.rand(3), torch.randn(3, 512)
    with torch.no_grad():  # zero-initialised: exactly the teacher, at any w
        assert torch.equal(student(x, t, embed, guidance=torch.tensor([1.0, 3.0, 8.0])),
                           teacher(x, t, embed))
        assert torch.equal(student(x, t, embed), teacher(x, t, embed))
    assert teacher.config == {"base_channels": 8, "channel_multipliers": [1, 1, 1, 1],
                              "embed_dim": 512}  # plain nets keep their config and keys
    records = {"guidance_input": True, "guidance_range": [1.0, 8.0], "distilled_steps": 4}
    assert student.config == {**teacher.config, **records}
    assert torch.equal(student.distilled_timesteps, torch.tensor([1.0, 0.75, 0.5, 0.25]))

    with torch.no_grad():  # trained a little: w now matters, and every format keeps it
        student.guidance_embed.linear.weight.normal_()
        v = student(x, t, embed, guidance=torch.tensor(5.0))
    ckpt, safetensors = export_weights(student, tmp_path, "model_student")
    lightning = tmp_path / "lightning.ckpt"
    torch.save({"state_dict": {f"model_ema.{k}": v for k, v in student.state_dict().items()}},
               lightning)
    for path in (ckpt, safetensors, lightning):
        again = load_unet(path)
        assert again.config == student.config and float(again.autoencoder_scale) == 0.5
        with torch.no_grad():
            assert (again(x, t, embed, guidance=torch.tensor(5.0)) - v).abs().max() < 1e-5
        info = describe_checkpoint(path)
        assert info["guidance_input"] is True and info["distilled_steps"] == 4
        assert "distilled, 4 steps, guidance 3 in 1 row(s)" in info["distilled"]
    assert infer_unet_config(state(ckpt)) == student.config
    with safe_open(str(safetensors), "pt") as f:  # for tools that read the metadata
        assert json.loads(f.metadata()["config"]) == student.config
    assert main(["info", str(safetensors)]) == 0


def test_pipeline_folder_keeps_a_students_records(fixture_pipeline, tmp_path):
    from ccld import CCLDPipeline
    from ccld.models.unet import with_records

    student = with_records(fixture_pipeline.unet, guidance_input=True, guidance_range=(2, 6),
                           distilled_steps=2).eval()
    pipe = CCLDPipeline(student, fixture_pipeline.autoencoder, fixture_pipeline.cloob)
    again = CCLDPipeline.from_pretrained(pipe.save_pretrained(tmp_path / "m"))
    assert again.unet.config == student.config
    assert again.sampling_defaults == {"method": "distilled", "steps": 2, "guidance": 3.0,
                                       "rows_per_image": 1}
    config = json.loads((tmp_path / "m" / "unet" / "config.json").read_text())
    config["distilled_steps"] = "two"
    (tmp_path / "m" / "unet" / "config.json").write_text(json.dumps(config))
    with pytest.raises(Exception, match="distilled_steps is 'two', not a positive integer"):
        CCLDPipeline.from_pretrained(tmp_path / "m")
