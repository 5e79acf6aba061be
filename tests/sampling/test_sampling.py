import pytest
import torch
from safetensors.torch import load_file

from ccld import sampling
from ccld.models.unet import load_unet
from conftest import max_rel_err

METHODS = ["ddpm", "ddim_eta0.0", "ddim_eta0.7", "prk", "plms", "pie", "plms2", "iplms"]


@pytest.fixture(scope="module")
def reference(fixtures):
    return load_unet(fixtures / "unet.ckpt"), load_file(fixtures / "sampling.safetensors")


def test_spliced_schedule(reference):
    _, ref = reference
    assert max_rel_err(sampling.get_timesteps(8), ref["steps"]) < 1e-6


@pytest.mark.parametrize("name", METHODS)
def test_sampler_matches_reference(reference, name):
    unet, ref = reference
    model = sampling.guided_model(unet, ref["embeds"], ref["weights"])
    generator = torch.Generator().manual_seed(3)  # the fixture reseeds before each method
    method, _, eta = name.partition("_eta")
    out = sampling.sample(method, model, ref["noise"], ref["steps"], eta=float(eta or 0),
                          generator=generator)
    assert max_rel_err(out, ref[name]) < 1e-4


def test_guidance_is_one_batched_forward(reference):
    unet, ref = reference
    calls = []

    def counting(x, t, embed):
        calls.append(x.shape[0])
        return unet(x, t, embed)

    x = ref["noise"]
    v = sampling.guided_model(counting, ref["embeds"], ref["weights"])(x, torch.full([2], 0.5))
    assert calls == [2 * 3]
    with torch.no_grad():
        expected = sum(w * unet(x, torch.full([2], 0.5), e[None].expand(2, -1))
                       for w, e in zip(ref["weights"], ref["embeds"]))
    assert max_rel_err(v, expected) < 1e-5


def test_condition_weights_put_the_rest_on_unconditional():
    assert sampling.condition_weights([3.0, -1.0]).tolist() == [-1.0, 3.0, -1.0]


@pytest.mark.parametrize("method", list(sampling.SAMPLERS))
def test_forward_counts(method):
    calls = []

    def model(x, t):
        calls.append(1)
        return torch.zeros_like(x)

    steps = sampling.get_timesteps(15)
    sampling.sample(method, model, torch.randn(1, 4, 8, 8), steps, generator=torch.Generator())
    assert len(calls) == sampling.get_sampler(method).forwards(15)


def _gaussian_model(mean, std):
    """The exact v of data ~ N(mean, std^2) per element: a model whose solution is known."""
    def model(x, t):
        alpha, sigma = sampling.t_to_alpha_sigma(t.view(-1, 1, 1, 1))
        var = alpha ** 2 * std ** 2 + sigma ** 2
        x0 = mean + alpha * std ** 2 * (x - alpha * mean) / var  # E[x0 | x]
        eps = sigma * (x - alpha * mean) / var  # E[eps | x], written to stay finite at t = 0
        return alpha * eps - sigma * x0
    return model


def _on_the_ode_trajectory(z, t, mean=0.3, std=0.5):
    """Where the ODE of `_gaussian_model(mean, std)` that ends at mean + std * z is at t:
    alpha * mean + sqrt(alpha^2 std^2 + sigma^2) * z."""
    alpha, sigma = sampling.t_to_alpha_sigma(t)
    return alpha * mean + (alpha ** 2 * std ** 2 + sigma ** 2).sqrt() * z


# first-order DDIM also stops one step short of t = 0 (it returns its x0 estimate there)
@pytest.mark.parametrize("method,tol", [("plms", 2e-2), ("dpm++2m", 2e-2), ("unipc", 2e-2),
                                        ("iplms", 2e-2),
                                        ("prk", 2e-2), ("plms2", 2e-2), ("ddim", 1e-1)])
def test_deterministic_samplers_solve_the_probability_flow_ode(method, tol):
    # for Gaussian data the ODE maps noise z to mean + std * z exactly
    model = _gaussian_model(0.3, 0.5)
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    steps = sampling.get_timesteps(50)
    out = sampling.sample(method, model, _on_the_ode_trajectory(z, steps[0]), steps)
    assert (out - (0.3 + 0.5 * z)).abs().max() < tol


def test_unipc_gets_closer_with_more_steps():
    # its schedule ends at t = 0.06 up to 11 steps; a fixed end would leave every longer run
    # as far off as the clean-latent prediction from there (0.036 here at 50 and 100 steps)
    model = _gaussian_model(0.3, 0.5)
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    errors = []
    for n in (11, 20, 50, 100):
        steps = sampling.get_sampler("unipc").timesteps(n)
        out = sampling.unipc(model, _on_the_ode_trajectory(z, steps[0]), steps)
        errors.append((out - (0.3 + 0.5 * z)).abs().max().item())
    assert errors == sorted(errors, reverse=True) and errors[-1] < 1e-3, errors
    assert sampling.power_timesteps(11)[-1].item() == pytest.approx(0.06)  # the default's end


def test_a_registered_sampler_reaches_the_cli_the_web_app_and_the_pipeline(model_files, tmp_path):
    """Adding a sampler is one `register_sampler` call: the CLI's and the web app's choices, the
    forward count and the pipeline (schedule included) all read the registry."""
    from ccld import CCLDPipeline
    from ccld.apps.cli import build_parser

    schedules = []

    def heun_like(model, x, timesteps, *, callback=None):  # two model calls per step
        for t in timesteps:
            x = x - 0.01 * (model(x, t.expand(x.shape[0])) + model(x, t.expand(x.shape[0])))
        return x

    def half_schedule(n_steps, start=1.0, device=None):
        schedules.append(n_steps)
        return torch.linspace(start / 2, 0.1, n_steps, device=device)

    sampling.register_sampler("toy-heun", heun_like, forwards=lambda n: 2 * n,
                              schedule=half_schedule)
    try:
        assert build_parser().parse_args(["generate", "x", "--method", "toy-heun"]).method == "toy-heun"
        assert sampling.get_sampler("toy-heun").forwards(5) == 10

        gr = pytest.importorskip("gradio")
        from ccld.apps import web

        demo = web.build_app(object(), store=web.ResultStore(tmp_path / "results"), examples=[])
        dropdown = next(b for b in demo.blocks.values()
                        if isinstance(b, gr.Dropdown) and b.elem_id == "method")
        assert "toy-heun" in [value for _, value in dropdown.choices]

        pipe = CCLDPipeline.from_files(**model_files)  # its own: a hook is added to its U-Net
        calls = []
        pipe.unet.register_forward_hook(lambda *_: calls.append(1))
        pipe.generate_latents("a red circle", num_images=1, steps=3, method="toy-heun")
        assert len(calls) == sampling.get_sampler("toy-heun").forwards(3) and schedules == [3]
        assert pipe.describe("a red circle", (), num_images=1, steps=3, method="toy-heun",
                             guidance=3.0, seed=0, eta=0.0, init_image=None,
                             latent_scale=None, size=256)["method"] == "toy-heun"
    finally:
        sampling.SAMPLERS.pop("toy-heun", None)


@pytest.mark.parametrize("method", list(sampling.SAMPLERS))
def test_every_sampler_refuses_empty_timesteps_by_name(method):
    def model(x, t):
        return torch.zeros_like(x)

    empty = torch.zeros([0])
    for run in (lambda: sampling.sample(method, model, torch.randn(1, 4, 8, 8), empty),
                lambda: sampling.get_sampler(method).fn(model, torch.randn(1, 4, 8, 8), empty)):
        with pytest.raises(ValueError, match="timesteps must be a 1-d tensor of at least one time"):
            run()
