"""Decoupled cross-attention (paper eq. 4): exactness at scale 0, effect at scale 1, wiring, compile."""

from __future__ import annotations

import copy
import inspect

import pytest
import torch

from consistent_avatar.errors import ConsistentAvatarError
from consistent_avatar.models import build_fcsd, build_tsdm, load_preset
from consistent_avatar.models.components import load_controlnet, load_unet
from consistent_avatar.models.decoupled_attention import (
    COND_TOKENS_KWARG,
    DecoupledCrossAttnProcessor,
    copy_decoupled_weights,
    decoupled_processors,
    install_decoupled_attention,
    set_decoupled_scale,
)

B = 2


@pytest.fixture(scope="module")
def preset():
    return load_preset("tiny")


def _inputs(preset, seed: int = 0, n_tokens: int = 3):
    g = torch.Generator().manual_seed(seed)
    s, c, d = preset.latent_size, preset.latent_channels, preset.unet.cross_attention_dim
    return (
        torch.randn(B, c, s, s, generator=g),
        torch.tensor([3, 700]),
        torch.randn(B, preset.conditioning.null_context_tokens, d, generator=g),
        torch.randn(B, n_tokens, preset.conditioning.token_dim, generator=g),
    )


def _run(unet, x, t, ctx, tokens=None):
    kwargs = {COND_TOKENS_KWARG: tokens} if tokens is not None else None
    with torch.no_grad():
        return unet(x, t, encoder_hidden_states=ctx, cross_attention_kwargs=kwargs).sample


def test_scale_zero_is_exactly_the_base_unet_and_scale_one_is_not(preset) -> None:
    base, _ = load_unet(preset, seed=0)
    model = copy.deepcopy(base)
    install_decoupled_attention(model, preset.conditioning.token_dim, scale=0.0)
    x, t, ctx, tokens = _inputs(preset)
    reference = _run(base, x, t, ctx)
    assert torch.equal(_run(model, x, t, ctx, tokens), reference)
    # at scale 0 the tokens have no influence at all
    assert torch.equal(_run(model, x, t, ctx, tokens * 5 + 1), reference)
    set_decoupled_scale(model, 1.0)
    at_one = _run(model, x, t, ctx, tokens)
    assert not torch.allclose(at_one, reference, atol=1e-4)
    assert not torch.allclose(_run(model, x, t, ctx, tokens * 5 + 1), at_one, atol=1e-4)
    set_decoupled_scale(model, 0.0)
    assert torch.equal(_run(model, x, t, ctx, tokens), reference)


def test_every_cross_attention_gets_new_kv_and_self_attention_accepts_the_tokens(preset) -> None:
    unet, _ = load_unet(preset, seed=0)
    attn2 = [n for n, m in unet.named_modules() if n.endswith("attn2")]
    added = install_decoupled_attention(unet, 256)
    assert len(added) == len(attn2) > 0
    procs = decoupled_processors(unet)
    assert sorted(procs) == sorted(attn2)
    for layer, proc in procs.items():
        attn = unet.get_submodule(layer)
        assert proc.to_k_cond.weight.shape == (attn.to_k.out_features, 256)
        assert proc.to_v_cond.weight.shape == (attn.to_v.out_features, 256)
    names = {n for n, _ in unet.named_parameters()}
    assert {f"{layer}.processor.to_k_cond.weight" for layer in attn2} <= names
    # diffusers passes a cross_attention_kwargs key only to processors whose __call__ names it
    for proc in unet.attn_processors.values():
        assert COND_TOKENS_KWARG in inspect.signature(proc.__call__).parameters


def test_missing_tokens_and_double_install_are_errors(preset) -> None:
    unet, _ = load_unet(preset, seed=0)
    install_decoupled_attention(unet, 256)
    x, t, ctx, _ = _inputs(preset)
    with pytest.raises(ConsistentAvatarError, match="cond_tokens"):
        _run(unet, x, t, ctx)
    with pytest.raises(ConsistentAvatarError, match="already installed"):
        install_decoupled_attention(unet, 256)
    with pytest.raises(ConsistentAvatarError, match="no decoupled attention"):
        set_decoupled_scale(torch.nn.Linear(2, 2), 0.5)


def test_gradients_reach_the_new_projections_and_the_tokens(preset) -> None:
    unet, _ = load_unet(preset, seed=0)
    unet.requires_grad_(False)
    added = install_decoupled_attention(unet, 256)
    x, t, ctx, tokens = _inputs(preset)
    tokens.requires_grad_(True)
    out = unet(x, t, encoder_hidden_states=ctx, cross_attention_kwargs={COND_TOKENS_KWARG: tokens}).sample
    out.square().mean().backward()
    assert tokens.grad is not None and tokens.grad.abs().sum() > 0
    for proc in added.values():
        assert isinstance(proc, DecoupledCrossAttnProcessor)
        assert proc.to_v_cond.weight.grad is not None and proc.to_v_cond.weight.grad.abs().sum() > 0
    assert all(p.grad is None for n, p in unet.named_parameters() if ".processor." not in n)


def test_controlnet_decoupled_layers_start_as_copies_of_the_unet(preset) -> None:
    unet, _ = load_unet(preset, seed=0)
    controlnet, _ = load_controlnet(preset, unet)
    install_decoupled_attention(unet, 256)
    install_decoupled_attention(controlnet, 256)
    copied = copy_decoupled_weights(unet, controlnet)
    cn_procs, unet_procs = decoupled_processors(controlnet), decoupled_processors(unet)
    assert copied == len(cn_procs) > 0
    for layer, proc in cn_procs.items():
        assert torch.equal(proc.to_k_cond.weight, unet_procs[layer].to_k_cond.weight)


def test_stage_models_at_scale_zero_equal_their_base_networks(preset) -> None:
    x, t, _, tokens3 = _inputs(preset, seed=1)
    tokens4 = torch.randn(B, 4, 256)
    coarse = torch.randn_like(x)
    tsdm = build_tsdm(preset, seed=0)
    set_decoupled_scale(tsdm, 0.0)
    # reference: an unmodified UNet with the same (widened) weights and no decoupled processors
    ref_unet, _ = load_unet(preset, seed=0)
    state = {k: v for k, v in tsdm.unet.state_dict().items() if ".processor." not in k}
    ref_unet.conv_in = copy.deepcopy(tsdm.unet.conv_in)
    ref_unet.load_state_dict(state)
    ctx = tsdm.null_context(B)
    with torch.no_grad():
        assert torch.equal(tsdm(x, t, tokens3, coarse), ref_unet(torch.cat([x, coarse], 1), t, ctx).sample)

    fcsd = build_fcsd(preset, seed=0)
    set_decoupled_scale(fcsd, 0.0)
    ref_unet, _ = load_unet(preset, seed=0)
    ref_cn, _ = load_controlnet(preset, ref_unet)
    ref_unet.load_state_dict({k: v for k, v in fcsd.unet.state_dict().items() if ".processor." not in k})
    ref_cn.load_state_dict({k: v for k, v in fcsd.controlnet.state_dict().items() if ".processor." not in k})
    control = torch.rand(B, 6, preset.resolution, preset.resolution) * 2 - 1
    ctx = fcsd.null_context(B)
    with torch.no_grad():
        down, mid = ref_cn(x, t, encoder_hidden_states=ctx, controlnet_cond=control, return_dict=False)
        ref = ref_unet(
            x,
            t,
            encoder_hidden_states=ctx,
            down_block_additional_residuals=down,
            mid_block_additional_residual=mid,
        ).sample
        assert torch.equal(fcsd(x, t, tokens4, control), ref)
        set_decoupled_scale(fcsd, 1.0)
        assert not torch.allclose(fcsd(x, t, tokens4, control), ref, atol=1e-4)


def test_compiles_as_one_graph_and_scale_changes_need_no_recompile(preset) -> None:
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    tsdm = build_tsdm(preset, seed=0).eval()
    x, t, _, tokens = _inputs(preset, seed=2)
    coarse = torch.randn_like(x)
    compiled = torch.compile(tsdm, fullgraph=True, backend="eager")
    with torch.no_grad():
        eager_one = tsdm(x, t, tokens, coarse)
        assert torch.equal(compiled(x, t, tokens, coarse), eager_one)
        set_decoupled_scale(tsdm, 0.0)
        at_zero = compiled(x, t, tokens, coarse)
        assert torch.equal(at_zero, tsdm(x, t, tokens, coarse))
        assert not torch.allclose(at_zero, eager_one, atol=1e-4)
    assert counters["stats"]["unique_graphs"] == 1
    torch._dynamo.reset()
