"""`ccld distill` and `ccld evaluate` on tiny models: the student learns the teacher's velocity,
the guided and true-v variants compute what they say, and the evaluation measures the pair."""

import json

import pytest
import torch

from ccld import sampling
from ccld.apps.cli import main
from ccld.models.unet import CCLDUNet
from ccld.training.distill import DistillationObjective
from ccld.training.objective import NoisedBatch
from conftest import QUIET, encoder_options, state

# training runs and launched processes, each torch on one thread
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


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

    from ccld.apps.options import describe_checkpoint
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
    start = float(sampling.get_timesteps(1)[0])  # 0.9957: where every sampler starts
    assert torch.allclose(student.distilled_timesteps, start * torch.tensor([1, 0.75, 0.5, 0.25]))

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


def test_one_progressive_round_lowers_the_two_step_vs_one_step_gap():
    from ccld.models.unet import with_records
    from ccld.training.distill import ProgressiveDistillationObjective
    from ccld.training.objective import LatentBatch, SobolTimesteps

    torch.manual_seed(0)
    teacher = CCLDUNet(8, (1, 1, 1, 1), embed_dim=16).eval()
    student = with_records(teacher, distilled_steps=2).train()  # starts as the teacher
    objective = ProgressiveDistillationObjective(teacher, student_steps=2, cond_drop=0.0)
    mean, embed = torch.randn(8, 4, 8, 8), torch.randn(8, 16)

    def batch(seed):  # the same images and conditions, new noise and timesteps each step
        return LatentBatch(mean, torch.full_like(mean, -30.0), embed, torch.tensor(1.0),
                           torch.Generator().manual_seed(seed), SobolTimesteps(seed))

    held_out = objective.noised(batch(1000))  # noise never trained on
    start = float(sampling.get_timesteps(1)[0])  # 0.9957, where every sampler starts
    assert held_out.t.unique().tolist() == pytest.approx([start / 2, start])  # the grid points

    def gap():  # |one student DDIM step - two teacher DDIM steps|, in the loss's weighting
        with torch.no_grad():
            return objective.match_two_steps(student, held_out)[0].item()

    # the target is the teacher's own two steps: a student jumping one step with the teacher's
    # velocity misses them by the gap, which training closes
    before = gap()
    optimizer = torch.optim.Adam(student.parameters(), lr=1e-4)
    for step in range(30):
        loss, _ = objective.loss(student, batch(step))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = gap()
    assert after < 0.85 * before, (before, after)  # 0.058 -> 0.044


def test_teacher_substeps_make_the_target_a_finer_teacher_solve():
    from argparse import Namespace

    from ccld.errors import CCLDError
    from ccld.training.commands import progressive_rounds
    from ccld.training.distill import ProgressiveDistillationObjective

    torch.manual_seed(0)
    teacher = CCLDUNet(8, (1, 1, 1, 1), embed_dim=16).eval()
    start = float(sampling.get_timesteps(1)[0])
    x, cond = torch.randn(2, 4, 8, 8), torch.randn(2, 16)
    batch = NoisedBatch(x, torch.full([2], start), cond, torch.zeros_like(x))
    # a 1-step student's target with 4 substeps: the clean latent of the teacher's DDIM-4
    objective = ProgressiveDistillationObjective(teacher, student_steps=1, cond_drop=0.0,
                                                 teacher_substeps=4)
    alpha, sigma = sampling.t_to_alpha_sigma(torch.tensor(start))
    landing = alpha * x - sigma * objective.target(batch, None)
    ddim4 = sampling.ddim(lambda x, t: teacher(x, t, cond), x, sampling.uniform_timesteps(4))
    assert torch.allclose(landing, ddim4, atol=1e-5)
    two = ProgressiveDistillationObjective(teacher, student_steps=1, cond_drop=0.0)
    assert not torch.allclose(alpha * x - sigma * two.target(batch, None), ddim4, atol=1e-3)

    # the first round divides --start-steps by K, the later ones halve
    def rounds(start_steps, substeps, count):
        return progressive_rounds(Namespace(start_steps=start_steps, teacher_substeps=substeps,
                                            rounds=count))
    assert rounds(64, 8, 2) == [(1, 64, 8), (2, 8, 4)]
    assert rounds(64, 2, 2) == [(1, 64, 32), (2, 32, 16)]
    with pytest.raises(CCLDError, match="cannot be divided"):
        rounds(64, 3, 1)


def test_guidance_objective_draws_w_and_the_teacher_guides_at_it():
    from ccld.models.unet import with_records
    from ccld.training.distill import DistillationObjective, guided_velocity

    torch.manual_seed(0)
    teacher = CCLDUNet(8, (1, 1, 1, 1), embed_dim=16).eval()
    x, t, cond = torch.randn(4, 4, 8, 8), torch.rand(4), torch.randn(4, 16)
    w = torch.tensor([1.0, 2.0, 5.0, 8.0])
    with torch.no_grad():
        v_c, v_u = teacher(x, t, cond), teacher(x, t, torch.zeros_like(cond))
        assert torch.allclose(guided_velocity(teacher, x, t, cond, w),
                              v_u + w.view(-1, 1, 1, 1) * (v_c - v_u), atol=1e-5)
        student = with_records(teacher, guidance_input=True, guidance_range=(1, 8)).eval()
        # a guided teacher of its own (a guidance student) gives it in one forward with w
        assert torch.equal(guided_velocity(student, x, t, cond, w), student(x, t, cond, guidance=w))
        # and a student distilled at one fixed w (--distill-guidance 3) in its plain forward:
        # guiding it again would apply the guidance twice
        fixed = with_records(teacher, guidance_range=(3, 3)).eval()
        assert torch.equal(guided_velocity(fixed, x, t, cond, torch.full([4], 3.0)),
                           fixed(x, t, cond))
    # progressive distillation of either keeps the range it gives the guided velocity for
    from argparse import Namespace

    from ccld.training.commands import distill_guidance_range

    progressive = Namespace(guidance_range=None, distill_guidance=None, objective="progressive")
    assert distill_guidance_range(progressive, fixed) == (3.0, 3.0)
    assert distill_guidance_range(progressive, student) == (1.0, 8.0)
    assert distill_guidance_range(progressive, teacher) is None
    objective = DistillationObjective(teacher, cond_drop=0.0, guidance_range=(1, 8),
                                      student_takes_guidance=True)
    batch = NoisedBatch(x, t, cond, torch.randn_like(x))
    loss, parts = objective.match_teacher(student, batch, w)
    with torch.no_grad():
        expected = (student(x, t, cond, guidance=w) - guided_velocity(teacher, x, t, cond, w))
    assert torch.allclose(loss, expected.square().mean(), atol=1e-6)


@pytest.fixture(scope="module")
def students(world, tmp_path_factory):
    """A guidance student (range 1,8) of the tiny teacher, and a 2-step progressive student of
    it (one round from 4 steps), both made by `ccld distill`."""
    out = tmp_path_factory.mktemp("students")
    common = ["--data", str(world["cache"]), "--batch-size", "4", "--lr", "1e-4",
              "--max-steps", "2", "--checkpoint-every", "0", *QUIET]
    assert main(["distill", "--objective", "guidance", "--guidance-range", "1,8",
                 "--teacher", str(world["teacher"]), "--out", str(out / "guidance"),
                 *common]) == 0
    assert main(["distill", "--objective", "progressive", "--start-steps", "4", "--rounds", "1",
                 "--teacher", str(out / "guidance" / "model_student.safetensors"),
                 "--out", str(out / "progressive"), *common]) == 0
    return {"guidance": out / "guidance" / "model_student.safetensors",
            "progressive": out / "progressive" / "model_student.safetensors"}


def test_distill_writes_students_that_say_what_they_are(world, students):
    from ccld.models.unet import load_unet

    guidance = load_unet(students["guidance"])
    assert guidance.config == {"base_channels": 16, "channel_multipliers": [1, 1, 2, 2],
                               "embed_dim": 512, "guidance_input": True,
                               "guidance_range": [1.0, 8.0]}  # started from the teacher
    assert float(guidance.autoencoder_scale) == pytest.approx(0.35)
    progressive = load_unet(students["progressive"])
    assert progressive.config == {**guidance.config, "distilled_steps": 2}  # inherits the range
    start = float(sampling.get_timesteps(1)[0])  # where every other sampler starts too
    assert progressive.distilled_timesteps.tolist() == pytest.approx([start, start / 2])


def test_generate_and_the_pipeline_sample_a_student_as_it_was_distilled(
        world, students, model_files, tmp_path):
    from PIL import Image

    from ccld import CCLDPipeline

    files = {**model_files, "autoencoder": world["autoencoder"]}
    pipe = CCLDPipeline.from_files(**{**files, "unet": students["progressive"]})
    rows = []
    pipe.unet.register_forward_hook(lambda m, args, kwargs=None: rows.append(args[0].shape[0]))
    pipe.generate_latents("a red circle", num_images=2, size=64)
    assert rows == [2, 2]  # its own 2 steps, one row per image at the default w = 3
    rows.clear()
    pipe.generate_latents("a red circle:9", num_images=2, size=64)  # outside its range:
    assert rows == [4, 4]  # ordinary guidance over its plain velocities, two rows
    rows.clear()
    pipe.generate_latents(["a red circle:3", "a blue square:2"], num_images=2, size=64, steps=3,
                          method="unipc")  # several prompts mix: a row per condition
    assert rows == [6, 6, 6]

    out = tmp_path / "out"
    assert main(["generate", "a red circle", "--unet", str(students["progressive"]),
                 "--autoencoder", str(world["autoencoder"]), "--cloob", str(files["cloob"]),
                 "--cloob-config", str(files["cloob_config"]), "--out", str(out), "-q",
                 "--device", "cpu", "--precision", "fp32"]) == 0
    with Image.open(out / "00000.png") as image:
        params = json.loads(image.text["parameters"])
    assert (params["method"], params["steps"], params["guidance"]) == ("distilled", 2, 3.0)
    assert params["distilled"] == {"unet": {"guidance_input": True, "guidance_range": [1.0, 8.0],
                                            "distilled_steps": 2},
                                   "one_row_guidance": 3.0, "rows_per_image": 1}


def test_evaluate_samples_each_model_as_what_it_is(world, students, tmp_path, capsys):
    files = encoder_options(world["autoencoder"], world["fixtures"])
    out = tmp_path / "e.json"
    assert main(["evaluate", "a quiet harbour", "--teacher", str(world["teacher"]),
                 "--student", str(students["progressive"]), "-n", "1", "--steps", "3",
                 "--size", "64", "--json", str(out), *files]) == 0
    sampled = json.loads(out.read_text())["sampled"]
    assert sampled["teacher"] == {"method": "plms", "steps": 3, "forwards": 12,
                                  "rows_per_image": 2, "one_row_guidance": None}
    assert sampled["student"] == {"method": "distilled", "steps": 2, "forwards": 2,
                                  "rows_per_image": 1, "one_row_guidance": 3.0}
    assert "student: distilled 2 steps, 2 forwards x 1 row(s) per image" in capsys.readouterr().out


def test_a_step_distilled_teacher_teaches_only_on_its_own_grid(world, students, tmp_path,
                                                              capsys):
    # the 2-step student knows jumps between its 2 grid points, not the 4 substeps asked here
    assert main(["distill", "--objective", "progressive", "--start-steps", "4",
                 "--teacher-substeps", "4", "--rounds", "1", "--data", str(world["cache"]),
                 "--teacher", str(students["progressive"]), "--out", str(tmp_path / "p"),
                 "--max-steps", "1", *QUIET]) == 2
    assert "the teacher is a 2-step student: it can teach only on its own grid, not in 4 " \
        "steps; give --start-steps 2 --teacher-substeps 2" in capsys.readouterr().err


def test_a_progressive_round_resumes_exactly(world, tmp_path):
    common = ["distill", "--objective", "progressive", "--start-steps", "4", "--rounds", "2",
              "--data", str(world["cache"]), "--teacher", str(world["teacher"]),
              "--batch-size", "4", "--lr", "1e-4", "--checkpoint-every", "0", *QUIET]
    assert main([*common, "--out", str(tmp_path / "whole"), "--max-steps", "2"]) == 0
    # the same run stopped half way through its first round, then resumed: round 1 continues
    # from its checkpoint, round 2 starts from its student
    assert main([*common[:6], "1", *common[7:], "--out", str(tmp_path / "parts"),
                 "--max-steps", "1"]) == 0
    assert main([*common, "--out", str(tmp_path / "parts"), "--max-steps", "2"]) == 2  # no --resume
    assert main([*common, "--out", str(tmp_path / "parts"), "--max-steps", "2", "--resume"]) == 0
    whole = state(tmp_path / "whole" / "model_student.ckpt")
    parts = state(tmp_path / "parts" / "model_student.ckpt")
    assert whole.keys() == parts.keys() and all(torch.equal(whole[k], parts[k]) for k in whole)
    assert whole["distilled_timesteps"].tolist() == pytest.approx([0.9957], abs=1e-4)


def test_a_first_round_learns_the_guided_teacher_from_a_guidance_students_weights(world,
                                                                                   tmp_path):
    """The few-step benchmark's recipe: a fixed-w guidance student, then progressive rounds
    whose first learns the plain teacher's classifier-free-guided solve (--distill-guidance)
    starting from the guidance student's weights (--student-init); later rounds halve, each
    taught by the previous student, whose plain velocity is already guided."""
    from ccld.models.unet import load_unet

    common = ["--data", str(world["cache"]), "--batch-size", "4", "--max-steps", "1",
              "--checkpoint-every", "0", "--distill-guidance", "3", *QUIET]
    assert main(["distill", "--objective", "guidance", "--teacher", str(world["teacher"]),
                 "--out", str(tmp_path / "guidance"), "--lr", "1e-2", *common]) == 0
    guidance = tmp_path / "guidance" / "model_student.safetensors"
    assert main(["distill", "--objective", "progressive", "--teacher", str(world["teacher"]),
                 "--student-init", str(guidance), "--start-steps", "4", "--rounds", "2",
                 "--out", str(tmp_path / "progressive"), "--lr", "1e-12", *common]) == 0
    first = load_unet(tmp_path / "progressive" / "round-01" / "model_student.safetensors")
    last = load_unet(tmp_path / "progressive" / "model_student.safetensors")
    base = {"base_channels": 16, "channel_multipliers": [1, 1, 2, 2], "embed_dim": 512,
            "guidance_range": [3.0, 3.0]}  # fixed w: no guidance input
    assert first.config == {**base, "distilled_steps": 2}
    assert last.config == {**base, "distilled_steps": 1}
    # an update of 1e-12 leaves each student where it started: the first round's at the
    # guidance student (not the teacher), the second's at the first round's student
    start, teacher = state(guidance.with_suffix(".ckpt")), state(world["teacher"])
    key = "net.0.main.0.weight"
    for student in (first, last):
        weight = student.state_dict()[key]
        assert torch.allclose(weight, start[key], atol=1e-6)
        assert not torch.allclose(weight, teacher[key], atol=1e-6)


def test_widen_makes_a_wider_student_of_the_teacher(world, tmp_path, capsys):
    from ccld.models.unet import load_unet

    common = ["distill", "--objective", "guidance", "--distill-guidance", "3",
              "--data", str(world["cache"]), "--teacher", str(world["teacher"]),
              "--batch-size", "4", "--max-steps", "1", "--checkpoint-every", "0", *QUIET]
    assert main([*common, "--widen", "2", "--out", str(tmp_path / "wide")]) == 0
    student = load_unet(tmp_path / "wide" / "model_student.safetensors")
    assert student.config == {"base_channels": 32, "channel_multipliers": [1, 1, 2, 2],
                              "embed_dim": 512, "guidance_range": [3.0, 3.0]}
    assert main([*common, "--widen", "2", "--base-channels", "8",
                 "--out", str(tmp_path / "x")]) == 2
    assert "--widen makes the student from the teacher" in capsys.readouterr().err
    assert main([*common, "--widen", "0", "--out", str(tmp_path / "y")]) == 2
    assert "--widen must be at least 1" in capsys.readouterr().err
