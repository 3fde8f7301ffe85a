"""Model layer: presets, condition tokens, TSDM (stage 2), FCSD (stage 3), component loading."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from consistent_avatar.errors import ConsistentAvatarError
from consistent_avatar.models import (
    SharedComponents,
    available_presets,
    build_fcsd,
    build_tsdm,
    load_preset,
    load_shared_components,
    parse_preset,
    save_random_components,
)
from consistent_avatar.models.components import load_controlnet, load_unet, load_vae, widen_conv_in
from consistent_avatar.models.conditioning import ConditionTokens, StageConditioning, TSDEncoder

B = 2


@pytest.fixture(scope="module")
def preset():
    return load_preset("tiny")


@pytest.fixture(scope="module")
def scheduler(preset):
    return preset.noise_schedule.make_ddpm()


def _image(preset, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(B, 3, preset.resolution, preset.resolution, generator=g) * 2 - 1


def _vectors(dim: int, seed: int) -> torch.Tensor:
    return torch.randn(B, dim, generator=torch.Generator().manual_seed(seed))


def tsdm_batch(preset) -> dict[str, torch.Tensor]:
    return {
        "coarse_tsd": _image(preset, 1),
        "target_tsd": _image(preset, 2),
        "pose": _vectors(6, 3),
        "expression": _vectors(100, 4),
    }


def fcsd_batch(preset) -> dict[str, torch.Tensor]:
    return {
        "image": _image(preset, 5),
        "tsd": _image(preset, 6),
        "normal": _image(preset, 7),
        "pose": _vectors(6, 8),
        "expression": _vectors(100, 9),
        "emotion": _vectors(preset.conditioning.emotion_dim, 10),
    }


# ---------------------------------------------------------------- presets


def test_shipped_presets_load_with_the_documented_shapes() -> None:
    assert {"tiny", "small", "sd15"} <= set(available_presets())
    tiny, small, sd15 = load_preset("tiny"), load_preset("small"), load_preset("sd15")
    assert (tiny.resolution, tiny.latent_size) == (64, 8)
    assert (small.resolution, small.latent_size) == (256, 32)
    assert (sd15.resolution, sd15.latent_size, sd15.latent_channels) == (512, 64, 4)
    assert sd15.unet.block_out_channels == (320, 640, 1280, 1280)
    assert sd15.unet.cross_attention_dim == 768
    assert sd15.vae.block_out_channels == (128, 256, 512, 512) and sd15.vae.scale_factor == 8
    for p in (tiny, small, sd15):
        assert p.conditioning.token_dim == 256 and p.conditioning.emotion_dim == 768
        assert p.unet_kwargs()["in_channels"] == 4 and p.unet_kwargs(8)["in_channels"] == 8


def _tiny_dict() -> dict:
    return json.loads(load_preset("tiny").model_dump_json())


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (("controlnet", "conditioning_embedding_out_channels"), [8, 16], "log2"),
        (("unet", "block_out_channels"), [30, 64], "divisible"),
        (("unet", "down_block_types"), ["DownBlock2D", "DownBlock2D"], "CrossAttnDownBlock2D"),
        (("unet", "attention_heads"), 4, "Extra inputs"),
        (("resolution",), 60, "divisible"),
        (("conditioning", "null_context_tokens"), 0, "null_context_tokens"),
    ],
)
def test_bad_presets_are_rejected_with_the_field_named(path, value, message) -> None:
    data = _tiny_dict()
    node = data
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    with pytest.raises(ConsistentAvatarError, match=message):
        parse_preset(data)


def test_preset_files_and_names(tmp_path: Path) -> None:
    with pytest.raises(ConsistentAvatarError, match="unknown model preset"):
        load_preset("huge")
    good = tmp_path / "mine.json"
    good.write_text(json.dumps({**_tiny_dict(), "name": "mine"}))
    assert load_preset(good).name == "mine"
    bad = tmp_path / "broken.json"
    bad.write_text("{not json")
    with pytest.raises(ConsistentAvatarError, match="not valid JSON"):
        load_preset(bad)
    with pytest.raises(ConsistentAvatarError, match="unet/config.json"):
        load_preset("tiny").with_pretrained(root=str(tmp_path)).pretrained.resolve("unet")


# ---------------------------------------------------------------- conditioning


def test_condition_modules_have_the_paper_shapes(preset) -> None:
    enc = TSDEncoder(256, (8, 16, 32), 4)
    assert enc(_image(preset, 0)).shape == (B, 256)
    tokens = ConditionTokens(256, 6, 100, 768)
    code = torch.randn(B, 256)
    assert tokens(code, _vectors(6, 0), _vectors(100, 0), _vectors(768, 0)).shape == (B, 4, 256)
    f_c = StageConditioning(preset.conditioning, preset.resolution, with_emotion=False)
    out = f_c(_image(preset, 0), _vectors(6, 0), _vectors(100, 0))
    assert out.shape == (B, 3, 256)
    # token 0 is the TSD code, unchanged by pose/expression
    assert torch.equal(out[:, 0], f_c.encoder(_image(preset, 0)))


# ---------------------------------------------------------------- stage models


def test_stage_models_shapes_at_tiny(preset) -> None:
    tsdm, fcsd = build_tsdm(preset), build_fcsd(preset)
    s, c = preset.latent_size, preset.latent_channels
    batch = tsdm_batch(preset)
    with torch.no_grad():
        z = tsdm.encode(batch["coarse_tsd"])
        assert z.shape == (B, c, s, s)
        assert tsdm.decode(z).shape == (B, 3, preset.resolution, preset.resolution)
        f_c = tsdm.condition(batch["coarse_tsd"], batch["pose"], batch["expression"])
        assert f_c.shape == (B, 3, 256)
        assert tsdm(torch.randn(B, c, s, s), torch.tensor([1, 999]), f_c, z).shape == (B, c, s, s)
        assert tsdm.unet.config.in_channels == 2 * c
        fb = fcsd_batch(preset)
        f_d = fcsd.condition(fb["tsd"], fb["pose"], fb["expression"], fb["emotion"])
        assert f_d.shape == (B, 4, 256)
        control = fcsd.control_image(fb["normal"], fb["tsd"])
        assert control.shape == (B, 6, preset.resolution, preset.resolution)
        assert fcsd(torch.randn(B, c, s, s), 10, f_d, control).shape == (B, c, s, s)


def _trainable(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_trainable_sets_follow_the_preset(preset) -> None:
    tsdm = build_tsdm(preset)
    names = _trainable(tsdm)
    assert not any(n.startswith("vae.") for n in names)
    assert {n for n, _ in tsdm.unet.named_parameters(prefix="unet")} <= names  # tiny: full UNet
    assert {n for n, _ in tsdm.conditioning.named_parameters(prefix="conditioning")} <= names

    narrow = preset.model_copy(
        update={
            "training": preset.training.model_copy(update={"tsdm_unet": "conv_in", "fcsd_unet": "frozen"})
        }
    )
    names = _trainable(build_tsdm(narrow))
    unet_names = {n for n in names if n.startswith("unet.")}
    assert unet_names == {n for n in unet_names if n.startswith("unet.conv_in.") or ".processor." in n}
    assert "unet.conv_in.weight" in names and any(".processor.to_k_cond" in n for n in names)

    fcsd = build_fcsd(narrow)
    names = _trainable(fcsd)
    assert {n for n, _ in fcsd.controlnet.named_parameters(prefix="controlnet")} <= names
    assert {n for n in names if n.startswith("unet.")} == {
        n for n, _ in fcsd.unet.named_parameters(prefix="unet") if ".processor." in n
    }
    assert not any(n.startswith("vae.") for n in names)
    assert set(map(id, fcsd.trainable_parameters())) == {id(p) for p in fcsd.parameters() if p.requires_grad}


def test_controlnet_from_unet_copies_the_encoder_half(preset) -> None:
    unet, _ = load_unet(preset, seed=0)
    controlnet, source = load_controlnet(preset, unet)
    assert source == "from_unet"
    assert controlnet.config.conditioning_channels == 6
    for part in ("conv_in", "time_embedding", "down_blocks", "mid_block"):
        ours, theirs = getattr(controlnet, part).state_dict(), getattr(unet, part).state_dict()
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    # the condition embedding reaches the latent grid from image space
    cond = torch.zeros(1, 6, preset.resolution, preset.resolution)
    emb = controlnet.controlnet_cond_embedding(cond)
    assert emb.shape[-1] == preset.latent_size


def test_building_is_deterministic_under_a_seed(preset, scheduler) -> None:
    a, b, c = build_tsdm(preset, seed=7), build_tsdm(preset, seed=7), build_tsdm(preset, seed=8)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    batch = tsdm_batch(preset)
    la = a.training_loss(batch, scheduler, torch.Generator().manual_seed(3))
    lb = b.training_loss(batch, scheduler, torch.Generator().manual_seed(3))
    assert torch.equal(la, lb)


@pytest.mark.parametrize("stage", ["tsdm", "fcsd"])
def test_loss_is_finite_and_only_trainable_parameters_get_gradients(preset, scheduler, stage) -> None:
    narrow = preset.model_copy(
        update={
            "training": preset.training.model_copy(update={"tsdm_unet": "conv_in", "fcsd_unet": "frozen"})
        }
    )
    model = build_tsdm(narrow) if stage == "tsdm" else build_fcsd(narrow)
    batch = tsdm_batch(preset) if stage == "tsdm" else fcsd_batch(preset)
    loss = model.training_loss(batch, scheduler, torch.Generator().manual_seed(0))
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    for name, p in model.named_parameters():
        if not p.requires_grad:
            assert p.grad is None, name
    got = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert any(".processor.to_v_cond" in n for n in got)
    assert any(n.startswith("conditioning.encoder.") for n in got)
    assert "conditioning.tokens.pose_proj.weight" in got
    if stage == "fcsd":
        assert "conditioning.tokens.emotion_proj.weight" in got
        # ControlNet's zero convolutions: at init only they receive gradient, the rest follows later
        assert any(n.startswith("controlnet.controlnet_down_blocks.") for n in got)


@pytest.mark.parametrize("stage", ["tsdm", "fcsd"])
def test_a_few_optimiser_steps_reduce_the_loss_on_a_fixed_batch(preset, scheduler, stage) -> None:
    model = build_tsdm(preset) if stage == "tsdm" else build_fcsd(preset)
    batch = tsdm_batch(preset) if stage == "tsdm" else fcsd_batch(preset)
    opt = torch.optim.Adam(model.trainable_parameters(), lr=1e-3)

    def loss() -> torch.Tensor:  # same noise and timesteps every step
        return model.training_loss(batch, scheduler, torch.Generator().manual_seed(11))

    first = loss().item()
    for _ in range(8):
        opt.zero_grad()
        value = loss()
        value.backward()
        opt.step()
    assert loss().item() < 0.8 * first


def test_training_objective_module_gives_the_stage_loss(preset, scheduler) -> None:
    from consistent_avatar.models import TrainingObjective

    fcsd = build_fcsd(preset)
    objective = TrainingObjective(fcsd, scheduler)
    assert {id(p) for p in objective.parameters()} == {id(p) for p in fcsd.parameters()}
    batch = fcsd_batch(preset)
    direct = fcsd.training_loss(batch, scheduler, torch.Generator().manual_seed(4))
    assert torch.equal(objective(batch, torch.Generator().manual_seed(4)), direct)


@pytest.mark.parametrize("stage", ["tsdm", "fcsd"])
def test_values_false_checks_shapes_only(preset, scheduler, stage) -> None:
    """The trainer checks values on the CPU where it reads them (StageCollate) and asks the step for
    shape checks only (no read-back from the GPU): the same loss on good data; bad values pass, a bad
    shape is still refused."""
    from consistent_avatar.models import TrainingObjective

    model = build_tsdm(preset) if stage == "tsdm" else build_fcsd(preset)
    batch = tsdm_batch(preset) if stage == "tsdm" else fcsd_batch(preset)
    lean = TrainingObjective(model, scheduler, check_values=False)
    full = TrainingObjective(model, scheduler)
    assert torch.equal(lean(batch, torch.Generator().manual_seed(2)), full(batch, torch.Generator().manual_seed(2)))
    bad = dict(batch, pose=batch["pose"].clone())
    bad["pose"][0, 0] = float("nan")
    with pytest.raises(ConsistentAvatarError, match="pose contains NaN"):
        full(bad, torch.Generator().manual_seed(2))
    lean(bad, torch.Generator().manual_seed(2))  # not looked at: the collate checked it
    with pytest.raises(ConsistentAvatarError, match="pose"):
        lean(dict(batch, pose=batch["pose"][:, :3]), torch.Generator().manual_seed(2))


def test_precomputed_latents_give_the_same_loss_as_images(preset, scheduler) -> None:
    tsdm = build_tsdm(preset)
    batch = tsdm_batch(preset)
    with torch.no_grad():
        latents = {
            "target_latent": tsdm.encode(batch["target_tsd"]),
            "coarse_latent": tsdm.encode(batch["coarse_tsd"]),
        }
    pre = {k: v for k, v in batch.items() if k != "target_tsd"} | latents
    l_img = tsdm.training_loss(batch, scheduler, torch.Generator().manual_seed(1))
    l_lat = tsdm.training_loss(pre, scheduler, torch.Generator().manual_seed(1))
    assert torch.equal(l_img, l_lat)


# ---------------------------------------------------------------- components


def test_from_pretrained_components_equal_the_in_memory_ones(preset, tmp_path: Path) -> None:
    import logging

    class Messages(logging.Handler):
        def __init__(self) -> None:
            super().__init__(logging.WARNING)
            self.seen: list[str] = []

        def emit(self, record: logging.LogRecord) -> None:
            self.seen.append(record.getMessage())

    diffusers_log = logging.getLogger("diffusers")  # diffusers' root logger does not propagate: listen there
    messages = Messages()
    diffusers_log.addHandler(messages)
    root = save_random_components(preset, tmp_path / "sd", seed=5)
    assert {p.name for p in root.iterdir()} >= {"unet", "vae", "text_encoder", "tokenizer"}
    pre = preset.with_pretrained(root=str(root))
    shared = load_shared_components(pre, seed=5)
    assert shared.sources["vae"] == str(root / "vae")
    assert shared.sources["null_context"].startswith("empty prompt")
    assert shared.null_context.shape == (
        preset.conditioning.null_context_tokens,
        preset.unet.cross_attention_dim,
    )
    assert not shared.vae.training and not any(p.requires_grad for p in shared.vae.parameters())

    in_memory = SharedComponents(vae=load_vae(preset, seed=5)[0], null_context=shared.null_context)
    x = torch.randn(B, 4, 8, 8)
    t = torch.tensor([5, 600])
    tb, fb = tsdm_batch(preset), fcsd_batch(preset)
    for build in (build_tsdm, build_fcsd):
        loaded, memory = build(pre, shared, seed=5), build(preset, in_memory, seed=5)
        assert loaded.sources["unet"] == str(root / "unet")
        assert memory.sources["unet"] == "random"
        with torch.no_grad():
            if build is build_tsdm:
                args = [tb["coarse_tsd"], tb["pose"], tb["expression"]]
                outs = [m(x, t, m.condition(*args), m.encode(tb["coarse_tsd"])) for m in (loaded, memory)]
            else:
                args = [fb["tsd"], fb["pose"], fb["expression"], fb["emotion"]]
                outs = [
                    m(x, t, m.condition(*args), m.control_image(fb["normal"], fb["tsd"]))
                    for m in (loaded, memory)
                ]
        assert torch.equal(outs[0], outs[1])
    diffusers_log.removeHandler(messages)
    # loaded without accelerate's meta-device path (not a dependency), and without diffusers' warning about it
    assert not [m for m in messages.seen if "accelerate" in m]


def test_a_three_channel_pretrained_controlnet_is_widened_to_z_c(preset, tmp_path: Path) -> None:
    from diffusers import ControlNetModel

    unet, _ = load_unet(preset, seed=0)
    rgb = ControlNetModel.from_unet(
        unet, conditioning_channels=3, conditioning_embedding_out_channels=(8, 8, 16, 16)
    )
    rgb.save_pretrained(tmp_path / "cn")
    controlnet, source = load_controlnet(preset.with_pretrained(controlnet=str(tmp_path / "cn")), unet)
    assert source == str(tmp_path / "cn") and controlnet.config.conditioning_channels == 6
    w = controlnet.controlnet_cond_embedding.conv_in.weight
    assert torch.equal(w[:, :3], rgb.controlnet_cond_embedding.conv_in.weight) and not w[:, 3:].any()


def test_widened_conv_in_ignores_the_new_channels_until_trained() -> None:
    conv = torch.nn.Conv2d(4, 8, 3, padding=1)
    wide = widen_conv_in(conv, 8)
    x, extra = torch.randn(1, 4, 6, 6), torch.randn(1, 4, 6, 6)
    assert torch.allclose(wide(torch.cat([x, extra], 1)), conv(x), atol=1e-6)


# ---------------------------------------------------------------- bad inputs


class _Spy:
    """Counts forward calls of the networks a stage model owns."""

    def __init__(self, model) -> None:
        self.calls = 0
        for module in (
            model.unet,
            model.vae.encoder,
            model.conditioning.encoder,
            getattr(model, "controlnet", None),
        ):
            if module is not None:
                module.register_forward_pre_hook(self._hit)

    def _hit(self, *_: object) -> None:
        self.calls += 1


def _bad_tsdm_batches(preset):
    r = preset.resolution
    yield "coarse_tsd", {"coarse_tsd": torch.zeros(B, 1, r, r)}
    yield "coarse_tsd", {"coarse_tsd": torch.zeros(B, 3, r // 2, r // 2)}
    yield "scaled to", {"coarse_tsd": torch.full((B, 3, r, r), 255.0)}
    yield "NaN", {"coarse_tsd": torch.full((B, 3, r, r), float("nan"))}
    yield "pose", {"pose": torch.zeros(B, 7)}
    yield "expression", {"expression": torch.zeros(B, 50)}
    yield "NaN", {"pose": torch.tensor([[float("inf")] * 6] * B)}
    yield "batch size", {"expression": torch.zeros(B + 1, 100)}
    yield "target_tsd", {"target_tsd": torch.zeros(B, 4, r, r)}
    yield "missing 'target_tsd'", {"target_tsd": None}
    yield "floating-point", {"pose": torch.zeros(B, 6, dtype=torch.long)}


def test_bad_inputs_raise_before_any_network_runs(preset, scheduler) -> None:
    tsdm = build_tsdm(preset)
    spy = _Spy(tsdm)
    for message, change in _bad_tsdm_batches(preset):
        batch = tsdm_batch(preset) | change
        with pytest.raises(ConsistentAvatarError, match=message):
            tsdm.training_loss(batch, scheduler)
    fcsd = build_fcsd(preset)
    spy_fcsd = _Spy(fcsd)
    with pytest.raises(ConsistentAvatarError, match="emotion"):
        fcsd.training_loss(fcsd_batch(preset) | {"emotion": torch.zeros(B, 512)}, scheduler)
    with pytest.raises(ConsistentAvatarError, match="normal"):
        fcsd.training_loss(fcsd_batch(preset) | {"normal": torch.zeros(B, 3, 32, 32)}, scheduler)
    with pytest.raises(ConsistentAvatarError, match="emotion"):
        tsdm.conditioning(
            *[tsdm_batch(preset)[k] for k in ("coarse_tsd", "pose", "expression")], torch.zeros(B, 768)
        )
    s, c = preset.latent_size, preset.latent_channels
    with pytest.raises(ConsistentAvatarError, match="tokens"):
        tsdm(torch.zeros(B, c, s, s), 1, torch.zeros(B, 4, 256), torch.zeros(B, c, s, s))
    with pytest.raises(ConsistentAvatarError, match="coarse_latent"):
        tsdm(torch.zeros(B, c, s, s), 1, torch.zeros(B, 3, 256), torch.zeros(B, c, s + 1, s + 1))
    with pytest.raises(ConsistentAvatarError, match="timestep"):
        tsdm(torch.zeros(B, c, s, s), torch.zeros(B, 2), torch.zeros(B, 3, 256), torch.zeros(B, c, s, s))
    with pytest.raises(ConsistentAvatarError, match="control"):
        fcsd(
            torch.zeros(B, c, s, s),
            1,
            torch.zeros(B, 4, 256),
            torch.zeros(B, 3, preset.resolution, preset.resolution),
        )
    from diffusers import DDPMScheduler

    with pytest.raises(ConsistentAvatarError, match="prediction_type"):
        tsdm.training_loss(tsdm_batch(preset), DDPMScheduler(prediction_type="v_prediction"))
    assert spy.calls == 0 and spy_fcsd.calls == 0
