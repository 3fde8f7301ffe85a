"""Decoupled cross-attention (paper eq. 4, after IP-Adapter) as diffusers attention processors.

Every cross-attention layer (``attn2``) of a UNet or ControlNet gets its own new key/value
projections W^k, W^v from the 256-d condition tokens (f_c or f_d) to the layer's inner width. The
layer's existing query attends to those tokens with SDPA, and the result is added to the layer's
original cross-attention result times ``scale``, before the layer's (shared) output projection:

    Z = Attention(Q, K, V) + scale · Attention(Q, W^k f, W^v f)

What the ORIGINAL cross-attention sees. The method has no text prompt. The base ``attn2`` receives a
fixed *null context* (B, n, cross_attention_dim) held by :class:`NullContext`: the CLIP encoding of
the empty prompt when a text encoder is available (what Stable Diffusion sees for unconditional /
dropped captions, so a pretrained UNet stays in distribution), otherwise a fixed random tensor
(from-scratch presets). It is a buffer, never trained, and every per-frame condition flows only
through the decoupled path. Hence ``scale = 0`` gives exactly (``torch.equal``) the output of the
unmodified UNet run on the null context, which the tests check. Projecting the tokens to
``cross_attention_dim`` and feeding them to the base path was rejected: the model would stay
conditioned at scale 0 (no clean ablation), and a pretrained layer would see inputs far from text.

How the tokens travel. ``cross_attention_kwargs={"cond_tokens": tokens}``: diffusers hands
``cross_attention_kwargs`` to every processor of every block (UNet and ControlNet alike), so no
Python-side state is mutated per call and the call is a pure function of its tensor arguments
(friendly to ``torch.compile`` and CUDA graphs). Self-attention (``attn1``) layers get
:class:`TokenAwareSelfAttnProcessor`, diffusers' own SDPA processor with a signature that accepts
the key, so diffusers does not warn about it on every call. ``scale`` is a 0-d buffer in each
processor; :func:`set_decoupled_scale` changes it in place (no recompilation, graph-safe).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from torch import nn

from ..errors import ConsistentAvatarError

COND_TOKENS_KWARG = "cond_tokens"
"""The ``cross_attention_kwargs`` key that carries the condition tokens (B, n, token_dim)."""


class TokenAwareSelfAttnProcessor(AttnProcessor2_0):
    """diffusers' default SDPA processor, accepting (and ignoring) the condition tokens."""

    def __call__(  # type: ignore[override]
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        cond_tokens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


class DecoupledCrossAttnProcessor(nn.Module):
    """The base cross-attention plus ``scale`` × attention of the same query to the condition tokens.

    Registered as ``attn.processor``, so its weights live inside the UNet's module tree (moved,
    cast and sharded with it). ``__call__`` is overridden, not ``forward``, because diffusers reads
    the processor's ``__call__`` signature to decide which kwargs to pass.
    """

    scale: torch.Tensor

    def __init__(self, token_dim: int, inner_dim: int, scale: float = 1.0) -> None:
        super().__init__()
        self.to_k_cond = nn.Linear(token_dim, inner_dim, bias=False)
        self.to_v_cond = nn.Linear(token_dim, inner_dim, bias=False)
        self.register_buffer("scale", torch.tensor(float(scale)), persistent=False)

    def __call__(  # type: ignore[override]
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        cond_tokens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if cond_tokens is None:
            raise ConsistentAvatarError(
                "decoupled cross-attention is installed but no condition tokens were given: call the model "
                f"with cross_attention_kwargs={{'{COND_TOKENS_KWARG}': tokens}}"
            )
        if encoder_hidden_states is None:
            raise ConsistentAvatarError(
                "decoupled cross-attention needs encoder_hidden_states (the null context)"
            )
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = encoder_hidden_states.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        base = F.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False
        )

        tokens = cond_tokens.to(query.dtype)
        cond_key = self.to_k_cond(tokens).view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        cond_value = self.to_v_cond(tokens).view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        decoupled = F.scaled_dot_product_attention(
            query, cond_key, cond_value, dropout_p=0.0, is_causal=False
        )
        # base + 0·decoupled == base bitwise for finite values, so scale 0 reproduces the base UNet.
        hidden_states = base + self.scale.to(base.dtype) * decoupled

        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


class NullContext(nn.Module):
    """The fixed ``encoder_hidden_states`` of the base cross-attention (see the module docstring)."""

    context: torch.Tensor

    def __init__(self, context: torch.Tensor) -> None:
        super().__init__()
        if context.ndim != 2:
            raise ConsistentAvatarError(
                f"null context must be (tokens, cross_attention_dim), got {tuple(context.shape)}"
            )
        self.register_buffer("context", context.detach().clone())

    @classmethod
    def random(cls, tokens: int, dim: int, generator: torch.Generator | None = None) -> NullContext:
        """A unit-variance context, like the per-element scale of CLIP's final-layer-normed states."""
        return cls(torch.randn(tokens, dim, generator=generator))

    def forward(self, batch: int) -> torch.Tensor:
        return self.context.unsqueeze(0).expand(batch, -1, -1)


def _processor_layer(processor_name: str) -> str:
    return processor_name[: -len(".processor")]


def install_decoupled_attention(model: nn.Module, token_dim: int = 256, scale: float = 1.0) -> nn.ModuleDict:
    """Give every ``attn2`` of ``model`` (a diffusers UNet or ControlNet) decoupled attention.

    Returns the new processors keyed by layer path (dots → ``__``) so callers can inspect them; they
    are already registered inside ``model`` — do not register the returned dict again.
    """
    existing = getattr(model, "attn_processors", None)
    if existing is None:
        raise ConsistentAvatarError(f"{type(model).__name__} has no diffusers attention processors")
    if any(isinstance(p, DecoupledCrossAttnProcessor) for p in existing.values()):
        raise ConsistentAvatarError("decoupled attention is already installed on this model")
    processors: dict[str, object] = {}
    added = nn.ModuleDict()
    for name in existing:
        layer = _processor_layer(name)
        if layer.endswith("attn2"):
            attn = model.get_submodule(layer)
            proc = DecoupledCrossAttnProcessor(token_dim, attn.to_k.out_features, scale)
            proc.to(device=attn.to_q.weight.device, dtype=attn.to_q.weight.dtype)
            processors[name] = proc
            added[layer.replace(".", "__")] = proc
        else:
            processors[name] = TokenAwareSelfAttnProcessor()
    if not added:
        raise ConsistentAvatarError(
            f"{type(model).__name__} has no cross-attention (attn2) layers to decouple"
        )
    model.set_attn_processor(processors)  # type: ignore[operator]
    return added


def decoupled_processors(model: nn.Module) -> dict[str, DecoupledCrossAttnProcessor]:
    """The installed processors of ``model`` by layer path."""
    return {
        _processor_layer(name): p
        for name, p in model.attn_processors.items()  # type: ignore[union-attr]
        if isinstance(p, DecoupledCrossAttnProcessor)
    }


def set_decoupled_scale(model: nn.Module, scale: float) -> int:
    """Set ``scale`` in every decoupled processor under ``model`` in place; returns how many."""
    count = 0
    for module in model.modules():
        if isinstance(module, DecoupledCrossAttnProcessor):
            module.scale.fill_(float(scale))
            count += 1
    if count == 0:
        raise ConsistentAvatarError("no decoupled attention is installed under this model")
    return count


def copy_decoupled_weights(source: nn.Module, target: nn.Module) -> int:
    """Copy W^k, W^v from ``source`` to the layers of ``target`` with the same path.

    A ControlNet made by ``from_unet`` mirrors the UNet's down and mid blocks; copying their
    decoupled weights keeps it an exact trainable copy of the UNet, as the ControlNet paper does.
    """
    src = decoupled_processors(source)
    copied = 0
    for layer, proc in decoupled_processors(target).items():
        if layer in src:
            proc.load_state_dict(src[layer].state_dict())
            copied += 1
    return copied
