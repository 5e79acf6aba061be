"""The Python API refuses what it cannot paint with a CCLDError naming the argument, before any
work, and leaves the pipeline usable."""

import pickle

import numpy as np
import pytest
import torch

from ccld import CCLDError, CCLDPipeline


@pytest.fixture(scope="module")
def pipe(model_files):
    return CCLDPipeline.from_files(**model_files)  # its own: these tests try to move it


@pytest.mark.parametrize("prompts, message", [
    (123, "prompts must be a prompt or a list of them"),
    (["a", None], "prompts holds None"),
    ([("a",)], r"prompts holds \('a',\); a prompt with its weight is a \(value, weight\) pair"),
])
def test_prompts_of_the_wrong_type_are_named(pipe, prompts, message):
    with pytest.raises(CCLDError, match=message):
        pipe(prompts, steps=1, size=64, progress=False)


def test_numpy_and_torch_numbers_and_a_tensor_init_image_paint(pipe):
    images = pipe("a hill", seed=np.int64(3), steps=np.int32(2), guidance=torch.tensor(2.0),
                  size=64, init_image=torch.zeros(3, 64, 64), strength=np.float64(0.5),
                  progress=False)
    assert len(images) == 1 and images[0].size == (64, 64)


@pytest.mark.parametrize("device, message", [
    ("bogus", "device 'bogus' is not a device; give one of cpu, cuda, cuda:N or mps"),
    ("meta", "device 'meta': ccld paints on cpu, cuda, mps"),
    pytest.param("cuda", "device 'cuda': CUDA is not available in this torch",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here")),
])
def test_a_device_it_cannot_paint_on_is_refused_and_the_pipeline_still_paints(pipe, device,
                                                                             message):
    with pytest.raises(CCLDError, match=message):
        pipe.to(device)
    assert pipe.device.type == "cpu"
    assert len(pipe("a hill", steps=1, size=64, progress=False)) == 1


def test_the_command_line_checks_the_device_before_loading(tmp_path, capsys):
    from ccld.apps.cli import main

    # no model options: the default models are not even looked for
    assert main(["generate", "x", "--device", "tpu", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "--device 'tpu'" in err and err.count("\n") == 1


def test_a_pipeline_does_not_pickle_its_mapped_files(pipe):
    with pytest.raises(CCLDError, match="does not pickle; save it with save_pretrained"):
        pickle.dumps(pipe)


def test_saving_onto_a_file_and_loading_a_number_are_named(pipe, tmp_path):
    target = tmp_path / "a-file"
    target.write_text("keep me")
    with pytest.raises(CCLDError, match="a file, not a folder"):
        pipe.save_pretrained(target)
    assert target.read_text() == "keep me"
    with pytest.raises(CCLDError, match=r"from_pretrained\(5\): not a folder"):
        CCLDPipeline.from_pretrained(5)
