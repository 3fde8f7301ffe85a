"""Stage weights: DeepSpeed checkpoint → fp32 state dict → one safetensors file per trained stage.

A stage's result is the full-precision state of its model: with ZeRO the fp32 master weights are
spread over the ranks' optimiser shards (the module itself holds bf16 copies on GPU), so they are
consolidated with DeepSpeed's ``zero_to_fp32`` from the final checkpoint, never read off the bf16
module. The shared frozen VAE is stored once per actor (``vae/``, diffusers layout), so stage files
leave out its ``vae.`` keys.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import torch
from torch import nn

from ..errors import ConsistentAvatarError

VAE_PREFIX = "vae."


def checkpoint_tag(checkpoint_dir: str | Path) -> str:
    latest = Path(checkpoint_dir) / "latest"
    if not latest.is_file():
        raise ConsistentAvatarError(f"{checkpoint_dir} is not a DeepSpeed checkpoint (no 'latest' file)")
    return latest.read_text().strip()


def consolidated_state_dict(checkpoint_dir: str | Path) -> dict[str, torch.Tensor]:
    """The whole module's fp32 state dict from a DeepSpeed checkpoint (any ZeRO stage)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    tag = checkpoint_tag(checkpoint_dir)
    folder = Path(checkpoint_dir) / tag
    if any(folder.glob("*optim_states.pt")) and any(folder.glob("zero_pp_rank_*")):
        sd = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir), tag=tag)
    else:  # ZeRO disabled: the module state is the weights
        states = torch.load(folder / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
        sd = states["module"]
    return {k: v.detach().float().contiguous() if v.is_floating_point() else v.contiguous() for k, v in sd.items()}


def strip_prefix(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    if not all(k.startswith(prefix) for k in state):
        odd = next(k for k in state if not k.startswith(prefix))
        raise ConsistentAvatarError(f"state dict key {odd!r} lacks the expected prefix {prefix!r}")
    return {k[len(prefix) :]: v for k, v in state.items()}


def without_vae(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if not k.startswith(VAE_PREFIX)}


def save_weights(state: dict[str, torch.Tensor], path: str | Path) -> Path:
    """Write a safetensors file atomically (temp name, then rename)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp))
    os.replace(tmp, path)
    return path


def load_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a stage file into ``model``; only the shared VAE may be absent from the file."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise ConsistentAvatarError(f"stage weights {path} do not exist: run the stage that writes them first")
    state = load_file(str(path))
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith(VAE_PREFIX)]
    if missing or result.unexpected_keys:
        raise ConsistentAvatarError(
            f"{path} does not fit the model: missing {missing[:5]}, unexpected {result.unexpected_keys[:5]} "
            "(was it trained with another preset?)"
        )
    return model
