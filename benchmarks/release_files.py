"""Random-weight stand-ins for the published files, in exactly their release formats and sizes.

    python benchmarks/release_files.py FOLDER     # writes the three parts, prints their paths

- `model_student.ckpt`: `torch.save` of the bare state dict of the 105M student (192; 1,1,2,2)
- `ae_model.ckpt` + `ae_model.yaml`: the LDM KL-f8 autoencoder as `{'state_dict': ...}` with
  latent-diffusion key names (and a training-loss entry, as the release has), 335 MB
- `cloob_laion_400m_vit_b_16_16_epochs-<sha256>.pkl`: the Haiku parameter trees of CLOOB
  ViT-B/16 as a pickle of numpy arrays: about 600 MB of parameters (the release file is 750 MB)

Speed and memory do not depend on the weights, so the benchmarks time ccld on these exactly as a
user's first and later runs on the real downloads would go.
"""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path

import torch

STUDENT = (192, (1, 1, 2, 2))
CLOOB_NAME = "cloob_laion_400m_vit_b_16_16_epochs"
AUTOENCODER_YAML = """\
model:
  base_learning_rate: 4.5e-6
  target: ldm.models.autoencoder.AutoencoderKL
  params:
    monitor: "val/rec_loss"
    embed_dim: 4
    lossconfig:
      target: ldm.modules.losses.LPIPSWithDiscriminator
      params: {disc_start: 50001, kl_weight: 0.000001, disc_weight: 0.5}
    ddconfig:
      double_z: True
      z_channels: 4
      resolution: 256
      in_channels: 3
      out_ch: 3
      ch: 128
      ch_mult: [1, 2, 4, 4]
      num_res_blocks: 2
      attn_resolutions: []
      dropout: 0.0
"""


def ldm_autoencoder_state_dict(ch=128, mult=(1, 2, 4, 4), blocks=2, z=4, seed=0) -> dict:
    """Random weights under latent-diffusion's key names for a KL autoencoder of this shape."""
    g = torch.Generator().manual_seed(seed)
    sd = {}

    def conv(name, c_in, c_out, k=3):
        sd[f"{name}.weight"] = torch.randn(c_out, c_in, k, k, generator=g) * (c_in * k * k) ** -0.5
        sd[f"{name}.bias"] = torch.zeros(c_out)

    def norm(name, c):
        sd[f"{name}.weight"], sd[f"{name}.bias"] = torch.ones(c), torch.zeros(c)

    def resnet(name, c_in, c_out):
        norm(f"{name}.norm1", c_in)
        conv(f"{name}.conv1", c_in, c_out)
        norm(f"{name}.norm2", c_out)
        conv(f"{name}.conv2", c_out, c_out)
        if c_in != c_out:
            conv(f"{name}.nin_shortcut", c_in, c_out, 1)

    def middle(prefix, c):
        resnet(f"{prefix}.mid.block_1", c, c)
        norm(f"{prefix}.mid.attn_1.norm", c)
        for proj in ("q", "k", "v", "proj_out"):
            conv(f"{prefix}.mid.attn_1.{proj}", c, c, 1)
        resnet(f"{prefix}.mid.block_2", c, c)

    conv("encoder.conv_in", 3, ch)
    c = ch
    for i, m in enumerate(mult):
        for j in range(blocks):
            resnet(f"encoder.down.{i}.block.{j}", c, ch * m)
            c = ch * m
        if i < len(mult) - 1:
            conv(f"encoder.down.{i}.downsample.conv", c, c)
    middle("encoder", c)
    norm("encoder.norm_out", c)
    conv("encoder.conv_out", c, 2 * z)
    conv("decoder.conv_in", z, c)
    middle("decoder", c)
    for i in reversed(range(len(mult))):
        for j in range(blocks + 1):
            resnet(f"decoder.up.{i}.block.{j}", c, ch * mult[i])
            c = ch * mult[i]
        if i > 0:
            conv(f"decoder.up.{i}.upsample.conv", c, c)
    norm("decoder.norm_out", c)
    conv("decoder.conv_out", c, 3)
    conv("quant_conv", 2 * z, 2 * z, 1)
    conv("post_quant_conv", z, z, 1)
    sd["loss.logvar"] = torch.zeros(())  # the release carries its training loss's state too
    return sd


def haiku_cloob_params(config_name=CLOOB_NAME, seed=0) -> dict:
    """The released pickle's content for a random CLOOB: {'params': (image, text), 'step'}.

    The inverse of `ccld.models.cloob.convert_haiku_params`, from its own tables.
    """
    from ccld.models import cloob as cloob_module

    torch.manual_seed(seed)
    state = cloob_module.CLOOB(cloob_module.resolve_cloob_config(config_name)).state_dict()
    trees = {}
    for haiku_base, torch_base in cloob_module._BASES.items():
        tree = trees.setdefault(torch_base, {})
        layers = {int(k.split(".")[2]) for k in state if k.startswith(f"{torch_base}.layers.")}
        for rest, (module, names) in cloob_module._MODULES.items():
            places = ([(f"layer_{i}/{rest}", f"layers.{i}.{module}") for i in sorted(layers)]
                      if "/" in rest else [(rest, module)])
            for haiku_path, torch_path in places:
                for name, (key, relayout) in names.items():
                    full = ".".join(filter(None, [torch_base, torch_path, key]))
                    if full not in state or (rest == "embed" and (name == "w") != (state[full].ndim == 4)):
                        continue
                    t = state[full]
                    if relayout is torch.t:  # Haiku's Linear keeps [in, out]
                        t = t.t()
                    elif relayout is not None:  # its Conv2D kernel is HWIO, PyTorch's OIHW
                        t = t.permute(2, 3, 1, 0)
                    path = "/".join(filter(None, [haiku_base, haiku_path]))
                    tree.setdefault(path, {})[name] = t.contiguous().numpy()
    return {"params": (trees["image_encoder"], trees["text_encoder"]), "step": 0}


def write_release_files(folder: Path) -> dict:
    """The three parts in their release formats; returns the `ccld generate` options for them."""
    from ccld.models.unet import CCLDUNet

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    unet = folder / "model_student.ckpt"
    torch.save(CCLDUNet(*STUDENT, autoencoder_scale=4.3084).state_dict(), unet)
    autoencoder = folder / "ae_model.ckpt"
    torch.save({"state_dict": ldm_autoencoder_state_dict()}, autoencoder)
    (folder / "ae_model.yaml").write_text(AUTOENCODER_YAML)
    data = pickle.dumps(haiku_cloob_params(), protocol=4)
    cloob = folder / f"{CLOOB_NAME}-{hashlib.sha256(data).hexdigest()}.pkl"
    cloob.write_bytes(data)
    return {"--unet": str(unet), "--autoencoder": str(autoencoder), "--cloob": str(cloob)}


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Write random-weight stand-ins for the "
                                     "published model files (about 1.3 GB) into FOLDER.")
    parser.add_argument("folder", type=Path)
    for option, path in write_release_files(parser.parse_args().folder).items():
        print(option, path, f"{Path(path).stat().st_size / 1e6:.0f} MB")
