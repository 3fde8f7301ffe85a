"""Which VAE made a set of latents, by the model's content rather than by a path or a file.

``cavatar prepare --vae DIR`` records it with the shards' latents; a bundle records its own VAE's in
``bundle.json`` when it is written; ``cavatar render`` compares the two before taking the shards'
coarse-TSD latent instead of encoding it.

A path says nothing about the weights behind it, and neither do a file's bytes: the usual workflow
prepares with the pretrained SD VAE folder and exports bundles that re-save that VAE with
``save_pretrained``, which changes the file whenever the round trip changes the dtype, the key names
(diffusers renames the old attention keys on load), the tensor order or the safetensors metadata. So
the identity is of the model *as diffusers loads it*:

* ``tensors_sha256``: sha256 over the state dict's keys in sorted order, each with its dtype, shape and
  raw (little-endian) bytes. **Dtype rule:** floating-point tensors are hashed as float32 (upcast:
  exact from float16 / bfloat16), whatever dtype the model is in, so a float16 file loaded as float32
  and re-saved as float32 (or a float32 model saved from float16 values) is the same VAE. A model cast
  *down* (float32 → float16) has other values, so another identity: its latents differ too.
  Other dtypes are hashed as they are.
* ``config``: a fingerprint of the config keys that change the latent (:data:`LATENT_CONFIG`), each
  from the config, else this diffusers' constructor default, else the value it had before diffusers
  knew the key — so diffusers' bookkeeping (``_name_or_path``, ``_diffusers_version``), keys that do
  not touch the latent (``sample_size``, ``force_upcast``, ``latents_mean``/``latents_std``) and
  defaults another diffusers version adds do not tell two copies of one VAE apart.
* ``format``: :data:`FORMAT`. An identity without it (``{"weights_sha256", "config"}``: the file hash
  that shards prepared before this format recorded) never matches here: render encodes instead (re-prepare
  to use the latents); training, which has always matched such shards by their VAE folder's path, still
  does (:func:`consistent_avatar.training.data.shard_latents_problem`).
"""

from __future__ import annotations

import hashlib
import inspect
import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .io import fingerprint_of

if TYPE_CHECKING:  # pragma: no cover
    import torch.nn as nn

FORMAT = "diffusers-state-fp32/1"
CONFIG_FILE = "config.json"

#: ``{"format": FORMAT, "tensors_sha256": hex, "config": fingerprint}``
VAEIdentity = dict[str, str]

#: The ``AutoencoderKL`` config keys that, with the weights, decide the latent of an image (and the
#: image of a latent), each with its value before diffusers had the key (what a config without it
#: built then). Left out: ``sample_size`` (tiling only), ``force_upcast`` (a pipeline's dtype policy),
#: ``latents_mean`` / ``latents_std`` (SDXL pipelines' normalisation, not applied here).
LATENT_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D"],
    "block_out_channels": [64],
    "layers_per_block": 1,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "scaling_factor": 0.18215,
    "shift_factor": None,
    "use_quant_conv": True,
    "use_post_quant_conv": True,
    "mid_block_add_attention": True,
}


def latent_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The :data:`LATENT_CONFIG` keys of ``config`` as JSON values (tuples → lists); a key it lacks
    takes this diffusers' ``AutoencoderKL`` default, or the historical one when this diffusers has none."""
    from diffusers import AutoencoderKL

    params = inspect.signature(AutoencoderKL.__init__).parameters
    out: dict[str, Any] = {}
    for key, before in LATENT_CONFIG.items():
        if key in config:
            out[key] = config[key]
        elif key in params and params[key].default is not inspect.Parameter.empty:
            out[key] = params[key].default
        else:
            out[key] = before
    return json.loads(json.dumps(out))


def config_fingerprint(config: Mapping[str, Any]) -> str:
    return fingerprint_of(latent_config(config))


def tensors_sha256(model: nn.Module) -> str:
    """sha256 of ``model.state_dict()`` by content (the dtype rule: see the module docstring)."""
    import torch

    h = hashlib.sha256()
    state = model.state_dict()
    for key in sorted(state):
        t = state[key].detach()
        if t.is_floating_point():
            t = t.float()
        t = t.cpu().contiguous()
        h.update(f"{key}\0{str(t.dtype).removeprefix('torch.')}\0{list(t.shape)}\0".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def model_identity(vae: Any) -> VAEIdentity:
    """The identity of a loaded ``AutoencoderKL`` (any device, any dtype)."""
    return {"format": FORMAT, "tensors_sha256": tensors_sha256(vae), "config": config_fingerprint(vae.config)}


def vae_dir_identity(path: str | Path) -> VAEIdentity:
    """The identity of a diffusers ``AutoencoderKL`` folder, as loaded in float32 (loads its weights)."""
    from diffusers import AutoencoderKL

    from .models.components import LOCAL_LOAD

    vae = AutoencoderKL.from_pretrained(Path(path), **LOCAL_LOAD)
    return model_identity(vae)


def identity_problem(identity: Any) -> str:
    """"" when ``identity`` is a recorded identity of this :data:`FORMAT`, else what it is instead:
    ``"missing"``, ``"file-hash"`` (the earlier ``weights_sha256`` format) or ``"unknown"``."""
    if not identity:
        return "missing"
    if not isinstance(identity, Mapping):
        return "unknown"
    if identity.get("format") == FORMAT and identity.get("tensors_sha256") and identity.get("config"):
        return ""
    return "file-hash" if "weights_sha256" in identity else "unknown"
