"""Which VAE made a set of latents, by content rather than by path.

``cavatar prepare --vae DIR`` records it with the shards' latents; ``cavatar render`` compares it with
a bundle's VAE before taking the shards' coarse-TSD latent instead of encoding it. A path says nothing
about the weights behind it (a folder re-used for another VAE, a bundle trained elsewhere), so the
identity is the sha256 of the safetensors weights — computed as ``bundle.json`` records the bundle's
``vae/`` files, so a bundle's identity needs no weights read — plus a fingerprint of the effective
config (diffusers' bookkeeping keys dropped, the defaults filled in: a VAE saved again by
``save_pretrained`` gains ``_name_or_path`` but is the same model).
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .io import fingerprint_of

WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"  # what save_pretrained writes (the bundle's vae/)
CONFIG_FILE = "config.json"

#: ``{"weights_sha256": hex, "config": fingerprint}``
VAEIdentity = dict[str, str]


def effective_vae_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """``AutoencoderKL``'s constructor defaults overlaid with ``config`` minus its ``_`` keys, as JSON
    values (tuples → lists): two configs that build the same model compare equal."""
    from diffusers import AutoencoderKL

    params = inspect.signature(AutoencoderKL.__init__).parameters.values()
    empty = inspect.Parameter.empty
    merged = {p.name: p.default for p in params if p.name != "self" and p.default is not empty}
    merged.update({k: v for k, v in config.items() if not k.startswith("_")})
    return json.loads(json.dumps(merged))


def identity_of(weights_sha256: str, config: Mapping[str, Any]) -> VAEIdentity:
    return {"weights_sha256": weights_sha256, "config": fingerprint_of(effective_vae_config(config))}


def vae_dir_identity(path: str | Path) -> VAEIdentity | None:
    """The identity of a diffusers ``AutoencoderKL`` folder; None when it has no safetensors weights
    (a ``.bin`` only folder: the bundle would store other bytes, so nothing could match)."""
    from .bundle import file_sha256

    root = Path(path)
    weights, config = root / WEIGHTS_FILE, root / CONFIG_FILE
    if not weights.is_file() or not config.is_file():
        return None
    return identity_of(file_sha256(weights), json.loads(config.read_text()))


def bundle_vae_identity(
    files: Mapping[str, Any], config: Mapping[str, Any] | None, vae_dir: str = "vae"
) -> VAEIdentity | None:
    """A bundle's VAE identity from its manifest's file entries (``{relpath: FileEntry}``) and its
    ``vae/config.json``; None when either is missing."""
    entry = files.get(f"{vae_dir}/{WEIGHTS_FILE}")
    if entry is None or config is None:
        return None
    return identity_of(str(entry.sha256), config)
