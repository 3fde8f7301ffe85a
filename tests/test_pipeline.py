"""The render pipeline (consistent_avatar.pipeline) on the tiny preset, CPU."""

from __future__ import annotations

import copy
import re
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from bundle_factory import tiny_models

from consistent_avatar.bundle import EmotionTable, RefinerReference, load_bundle, save_bundle
from consistent_avatar.data.layout import EMOTIONS
from consistent_avatar.errors import ConsistentAvatarError
from consistent_avatar.models import load_preset
from consistent_avatar.models.refiner import Refiner
from consistent_avatar.pipeline import EMOTION_TOKEN, ConsistentAvatarPipeline
from consistent_avatar.tsd import temporally_sensitive_detail

B = 2
STEPS = 2


@pytest.fixture(scope="module")
def preset():
    return load_preset("tiny")


@pytest.fixture(scope="module")
def models(preset):
    return tiny_models(preset, seed=0)


@pytest.fixture(scope="module")
def emotions():
    return EmotionTable(EMOTIONS, torch.randn(len(EMOTIONS), 768, generator=torch.Generator().manual_seed(3)))


@pytest.fixture(scope="module")
def pipe(preset, models, emotions) -> ConsistentAvatarPipeline:
    return ConsistentAvatarPipeline(
        preset=preset,
        tsdm={"teacher": models["tsdm"], "lcm": models["lcm_tsdm"]},
        fcsd={"teacher": models["fcsd"], "lcm": models["lcm_fcsd"]},
        emotions=emotions,
        actor="tiny-actor",
    )


def inputs(preset, seed: int = 0, batch: int = B) -> dict[str, object]:
    g = torch.Generator().manual_seed(seed)
    r = preset.resolution
    return {
        "coarse_rgb": (torch.rand(batch, 3, r, r, generator=g) * 255).to(torch.uint8),
        "coarse_normal": torch.rand(batch, 3, r, r, generator=g),
        "pose": torch.randn(batch, 6, generator=g) * 0.1,
        "expression": torch.randn(batch, 100, generator=g),
        "emotion": ["happy", "angry", "sad", "fear"][:batch],
    }


def networks(pipe: ConsistentAvatarPipeline) -> dict[str, torch.nn.Module]:
    """Every network a call could run, by name (VAE halves separately: encode/decode are not forward)."""
    out: dict[str, torch.nn.Module] = {}
    for variant, t in pipe.tsdm.items():
        out |= {f"tsdm.{variant}.unet": t.unet, f"tsdm.{variant}.encoder": t.conditioning}
    for variant, f in pipe.fcsd.items():
        out |= {
            f"fcsd.{variant}.unet": f.unet,
            f"fcsd.{variant}.controlnet": f.controlnet,
            f"fcsd.{variant}.encoder": f.conditioning,
        }
    vae = next(iter(pipe.fcsd.values())).vae
    out |= {"vae.encoder": vae.encoder, "vae.decoder": vae.decoder}
    return out


@contextmanager
def count_calls(pipe: ConsistentAvatarPipeline) -> Iterator[Counter[str]]:
    calls: Counter[str] = Counter()
    handles = [
        module.register_forward_pre_hook(lambda _m, _a, name=name: calls.update([name]))
        for name, module in networks(pipe).items()
    ]
    try:
        yield calls
    finally:
        for h in handles:
            h.remove()


SWITCHES = [
    {},
    {"baseline": True},
    {"without_normal": True},
    {"without_emotion": True},
    {"without_lcm": True},
    {"sampler": "dpm"},
]


# ---------------------------------------------------------------- shapes, determinism, ablations


@pytest.mark.parametrize("switches", SWITCHES, ids=lambda s: ",".join(s) or "full")
def test_shapes_and_determinism_under_each_switch(pipe, preset, switches) -> None:
    x = inputs(preset)
    first = pipe(**x, num_steps=STEPS, seed=11, return_intermediates=True, **switches)
    again = pipe(**x, num_steps=STEPS, seed=11, **switches)
    r = preset.resolution
    assert first.frames.shape == (B, 3, r, r) and first.frames.dtype == torch.float32
    assert 0.0 <= float(first.frames.min()) and float(first.frames.max()) <= 1.0
    assert torch.equal(first.frames, again.frames)
    assert first.coarse_tsd is not None and first.coarse_tsd.shape == (B, 3, r, r)
    if switches.get("baseline"):
        assert first.aligned_tsd is None and "tsd" not in first.latents
    else:
        assert first.aligned_tsd is not None and first.aligned_tsd.shape == (B, 3, r, r)
        assert float(first.aligned_tsd.abs().max()) <= 1.0
    assert first.latents["frame"].shape == (B, preset.latent_channels, preset.latent_size, preset.latent_size)
    s = first.settings
    assert s["variant"] == ("teacher" if switches.get("without_lcm") or "sampler" in switches else "lcm")
    assert s["sampler"] == switches.get("sampler", "ddim" if switches.get("without_lcm") else "lcm")
    assert {k: s[k] for k in switches if k in s and k != "sampler"} == {
        k: v for k, v in switches.items() if k != "sampler"
    }
    assert set(first.timings) >= {"tsd", "stage3", "total"} and first.timings["total"] > 0
    assert ("stage2" in first.timings) != bool(switches.get("baseline"))
    u8 = first.frames_uint8()
    assert u8.shape == (B, r, r, 3) and u8.dtype == torch.uint8


@pytest.mark.parametrize("switches", SWITCHES[1:], ids=lambda s: ",".join(s))
def test_every_switch_changes_the_frames(pipe, preset, switches) -> None:
    x = inputs(preset, 1)
    full = pipe(**x, num_steps=STEPS, seed=3).frames
    assert not torch.equal(pipe(**x, num_steps=STEPS, seed=3, **switches).frames, full)


def test_seed_matters_and_per_frame_seeds_are_batch_independent(pipe, preset) -> None:
    x = inputs(preset, 2, batch=3)
    a = pipe(**x, num_steps=STEPS, seed=1).frames
    assert not torch.equal(a, pipe(**x, num_steps=STEPS, seed=2).frames)
    batched = pipe(**x, num_steps=STEPS, seed=[5, 6, 7]).frames
    alone = torch.cat(
        [
            pipe(**{k: v[i : i + 1] for k, v in x.items()}, num_steps=STEPS, seed=[5 + i]).frames
            for i in range(3)
        ]
    )
    torch.testing.assert_close(batched, alone, atol=1e-4, rtol=0)
    gens = [torch.Generator().manual_seed(s) for s in (5, 6, 7)]
    assert torch.equal(pipe(**x, num_steps=STEPS, generator=gens).frames, batched)


def test_baseline_feeds_the_coarse_tsd_to_stage_3(pipe, preset) -> None:
    x = inputs(preset, 4)
    out = pipe(**x, num_steps=STEPS, baseline=True, return_intermediates=True)
    expected = temporally_sensitive_detail(x["coarse_rgb"], pipe.tsd)
    assert torch.equal(out.coarse_tsd, expected)


def test_without_normal_is_the_zero_normal_map(pipe, preset) -> None:
    x = inputs(preset, 5)
    ablated = pipe(**x, num_steps=STEPS, without_normal=True).frames
    assert torch.equal(
        pipe(**{**x, "coarse_normal": None}, num_steps=STEPS, without_normal=True).frames, ablated
    )
    grey = torch.full_like(x["coarse_normal"], 0.5)  # (0 + 1) / 2: the zero vector in the layout's encoding
    assert torch.equal(pipe(**{**x, "coarse_normal": grey}, num_steps=STEPS).frames, ablated)


def test_without_emotion_ignores_the_emotion_and_zeroes_its_token(pipe, preset) -> None:
    x = inputs(preset, 6)
    ablated = pipe(**x, num_steps=STEPS, without_emotion=True).frames
    assert torch.equal(pipe(**{**x, "emotion": None}, num_steps=STEPS, without_emotion=True).frames, ablated)
    assert torch.equal(
        pipe(**{**x, "emotion": "neutral"}, num_steps=STEPS, without_emotion=True).frames, ablated
    )
    # the token the switch zeroes is the emotion's: f_d row 3 is the only one that depends on it
    f = pipe.fcsd["lcm"]
    tsd = torch.rand(1, 3, preset.resolution, preset.resolution) * 2 - 1
    p, e = torch.zeros(1, 6), torch.zeros(1, 100)
    t1 = f.condition(tsd, p, e, pipe.emotions.embeddings[:1])
    t2 = f.condition(tsd, p, e, pipe.emotions.embeddings[1:2])
    changed = [i for i in range(t1.shape[1]) if not torch.equal(t1[:, i], t2[:, i])]
    assert changed == [EMOTION_TOKEN]


def test_without_lcm_uses_the_teachers_with_their_default_steps(pipe, preset) -> None:
    out = pipe(**inputs(preset), without_lcm=True)
    assert (out.settings["variant"], out.settings["sampler"], out.settings["num_steps"]) == (
        "teacher",
        "ddim",
        25,
    )
    with count_calls(pipe) as calls:
        pipe(**inputs(preset), without_lcm=True, sampler="dpm", num_steps=3)
    assert calls["tsdm.teacher.unet"] == 3 and calls["fcsd.teacher.unet"] == 3 and calls["tsdm.lcm.unet"] == 0
    with pytest.raises(ConsistentAvatarError, match="without_lcm samples the teacher"):
        pipe(**inputs(preset), without_lcm=True, sampler="lcm")


def test_emotion_as_label_id_or_embedding_is_the_same(pipe, preset, emotions) -> None:
    x = inputs(preset, 7)
    ids = [EMOTIONS.index(e) for e in x["emotion"]]
    by_label = pipe(**x, num_steps=STEPS).frames
    for emotion in (ids, torch.tensor(ids), emotions.embeddings[ids].clone()):
        assert torch.equal(pipe(**{**x, "emotion": emotion}, num_steps=STEPS).frames, by_label)
    one = pipe(**{**x, "emotion": "sad"}, num_steps=STEPS).frames
    assert torch.equal(pipe(**{**x, "emotion": ["sad", "sad"]}, num_steps=STEPS).frames, one)
    assert torch.equal(pipe(**{**x, "emotion": EMOTIONS.index("sad")}, num_steps=STEPS).frames, one)


def test_uint8_and_float_images_are_the_same_input(pipe, preset) -> None:
    x = inputs(preset, 8)
    as_float = {**x, "coarse_rgb": x["coarse_rgb"].float() / 255.0}
    as_u8 = {**x, "coarse_normal": (x["coarse_normal"] * 255).round().to(torch.uint8)}
    as_float["coarse_normal"] = as_u8["coarse_normal"].float() / 255.0
    torch.testing.assert_close(
        pipe(**as_float, num_steps=STEPS).frames, pipe(**as_u8, num_steps=STEPS).frames, atol=1e-5, rtol=0
    )


# ---------------------------------------------------------------- efficiency by construction


def test_one_batched_network_call_per_step_and_vae_only_where_needed(pipe, preset) -> None:
    x = inputs(preset, 9, batch=3)
    with count_calls(pipe) as calls:
        pipe(**x, num_steps=3)
    assert calls["tsdm.lcm.unet"] == 3 and calls["fcsd.lcm.unet"] == 3 and calls["fcsd.lcm.controlnet"] == 3
    assert calls["tsdm.lcm.encoder"] == 1 and calls["fcsd.lcm.encoder"] == 1
    assert calls["vae.encoder"] == 1 and calls["vae.decoder"] == 2  # coarse TSD in; aligned TSD, frame out
    assert not [k for k in calls if ".teacher." in k]
    with count_calls(pipe) as calls:
        pipe(**x, num_steps=3, baseline=True)
    assert calls["vae.encoder"] == 0 and calls["vae.decoder"] == 1 and calls["tsdm.lcm.unet"] == 0


def test_a_precomputed_coarse_latent_skips_the_vae_encode_and_gives_the_same_frames(pipe, preset) -> None:
    """coarse_latent= (the shards' latent_tsd_coarse, from the same VAE): no VAE encode, same frames."""
    from consistent_avatar.models.components import vae_encode
    from consistent_avatar.tsd import temporally_sensitive_detail

    x = inputs(preset, 9, batch=3)
    plain = pipe(**x, num_steps=STEPS, return_intermediates=True)
    tsd = temporally_sensitive_detail(x["coarse_rgb"], pipe.tsd)
    latent = vae_encode(pipe.tsdm["lcm"].vae, tsd)
    with count_calls(pipe) as calls:
        given = pipe(**x, num_steps=STEPS, coarse_latent=latent.half(), return_intermediates=True)  # stored as fp16
    assert calls["vae.encoder"] == 0 and calls["vae.decoder"] == 2
    torch.testing.assert_close(given.frames, plain.frames, atol=2e-3, rtol=0)  # fp16 storage rounding only
    assert not torch.equal(pipe(**x, num_steps=STEPS, coarse_latent=torch.zeros_like(latent)).frames, plain.frames)


# ---------------------------------------------------------------- bad input: refused before any network


R = 64
BAD_INPUTS = [
    ({"coarse_rgb": torch.zeros(B, 3, 32, 32, dtype=torch.uint8)}, "coarse_rgb must have shape .*resize"),
    ({"coarse_rgb": torch.zeros(B, R, R, 3, dtype=torch.uint8)}, "channels last"),
    ({"coarse_rgb": torch.zeros(B, 4, R, R, dtype=torch.uint8)}, "coarse_rgb must have shape"),
    ({"coarse_rgb": torch.zeros(3, R, R, dtype=torch.uint8)}, "batch dimension"),
    ({"coarse_rgb": torch.full((B, 3, R, R), 255.0)}, r"coarse_rgb has values in .*\[0, 1\]"),
    ({"coarse_rgb": torch.full((B, 3, R, R), float("nan"))}, "coarse_rgb contains NaN"),
    ({"coarse_rgb": torch.zeros(B, 3, R, R, dtype=torch.int32)}, "uint8"),
    ({"coarse_rgb": [[0]]}, "coarse_rgb must be a torch.Tensor"),
    ({"coarse_normal": torch.rand(B, 3, R, R) * 2 - 1}, "coarse_normal has values"),
    ({"coarse_normal": torch.rand(B + 1, 3, R, R)}, "coarse_normal has batch size 3"),
    ({"coarse_normal": None}, "coarse_normal is required"),
    ({"pose": torch.zeros(B, 5)}, r"pose must have shape \(B, 6\)"),
    ({"pose": torch.zeros(B + 1, 6)}, "pose has batch size"),
    ({"pose": torch.zeros(B, 6, dtype=torch.long)}, "pose must be a floating"),
    ({"expression": torch.zeros(B, 50)}, r"expression must have shape \(B, 100\)"),
    ({"expression": torch.full((B, 100), float("inf"))}, "expression contains NaN"),
    ({"emotion": ["happy", "elated"]}, "unknown emotion label 'elated'"),
    ({"emotion": ["happy"]}, "emotion has 1 entries"),
    ({"emotion": torch.tensor([0, 8])}, r"ids must lie in \[0, 8\)"),
    ({"emotion": torch.zeros(B, 512)}, r"embeddings must have shape \(2, 768\)"),
    ({"emotion": torch.full((B, 768), float("nan"))}, "emotion embeddings contain NaN"),
    ({"emotion": None}, "emotion is required"),
    ({"emotion": [1, "happy"]}, "only labels"),
    ({"num_steps": 0}, "num_steps"),
    ({"num_steps": 60}, "num_steps"),  # beyond the LCM grid (50)
    ({"sampler": "euler"}, "sampler must be one of"),
    ({"seed": [1]}, "1 seeds given for a batch of 2"),
    ({"seed": "7"}, "seed must be"),
    ({"baseline": 1}, "baseline must be True or False"),
    ({"refine": True}, "no refiner is loaded"),
    ({"coarse_latent": torch.zeros(B, 4, 3, 3)}, r"coarse_latent must have shape \(2, 4, 8, 8\)"),
    ({"coarse_latent": torch.full((B, 4, 8, 8), float("nan"))}, "coarse_latent contains NaN"),
    ({"coarse_latent": torch.zeros(B, 4, 8, 8, dtype=torch.long)}, "coarse_latent must be a floating-point"),
]


@pytest.mark.parametrize(("change", "message"), BAD_INPUTS, ids=[m for _, m in BAD_INPUTS])
def test_bad_input_is_refused_before_any_network_runs(pipe, preset, change, message) -> None:
    x = {**inputs(preset, 10), "num_steps": STEPS, **change}
    with count_calls(pipe) as calls, pytest.raises(ConsistentAvatarError, match=message):
        pipe(**x)
    assert sum(calls.values()) == 0, calls
    with count_calls(pipe) as calls:  # the hooks do see a valid call
        pipe(**inputs(preset, 10), num_steps=1)
    assert calls["fcsd.lcm.unet"] == 1


# ---------------------------------------------------------------- construction, placement, compile


def test_pipeline_without_students_defaults_to_its_teachers(preset, models, emotions) -> None:
    teachers = ConsistentAvatarPipeline(
        preset=preset, tsdm={"teacher": models["tsdm"]}, fcsd={"teacher": models["fcsd"]}, emotions=emotions
    )
    out = teachers(**inputs(preset), num_steps=STEPS)
    assert (out.settings["variant"], out.settings["sampler"]) == ("teacher", "ddim")
    with pytest.raises(ConsistentAvatarError, match="needs the lcm weights of fcsd"):
        teachers(**inputs(preset), sampler="lcm")


def test_bad_construction(preset, models, emotions) -> None:
    with pytest.raises(ConsistentAvatarError, match="must be a FCSD"):
        ConsistentAvatarPipeline(
            preset=preset,
            tsdm={"teacher": models["tsdm"]},
            fcsd={"teacher": models["tsdm"]},
            emotions=emotions,
        )
    with pytest.raises(ConsistentAvatarError, match="variant 'student'"):
        ConsistentAvatarPipeline(
            preset=preset,
            tsdm={"student": models["tsdm"]},
            fcsd={"teacher": models["fcsd"]},
            emotions=emotions,
        )
    with pytest.raises(ConsistentAvatarError, match="emotion embeddings have 4 dims"):
        ConsistentAvatarPipeline(
            preset=preset,
            tsdm={},
            fcsd={"teacher": models["fcsd"]},
            emotions=EmotionTable(("a",), torch.zeros(1, 4)),
        )


def test_to_bf16_and_back_to_another_pipeline(preset, models, emotions) -> None:
    own = {k: copy.deepcopy(v) for k, v in models.items()}
    own["tsdm"].vae = own["fcsd"].vae = own["lcm_tsdm"].vae = own["lcm_fcsd"].vae  # one shared VAE, as loaded
    p = ConsistentAvatarPipeline(
        preset=preset, tsdm={"lcm": own["lcm_tsdm"]}, fcsd={"lcm": own["lcm_fcsd"]}, emotions=emotions
    ).to(dtype=torch.bfloat16)
    assert p.dtype == torch.bfloat16 and next(p.fcsd["lcm"].controlnet.parameters()).dtype == torch.bfloat16
    assert p.fcsd["lcm"].vae.dtype == torch.bfloat16
    out = p(**inputs(preset), num_steps=STEPS)
    assert out.frames.dtype == torch.float32 and bool(torch.isfinite(out.frames).all())


def own_students(preset, models, emotions) -> ConsistentAvatarPipeline:
    """A pipeline over private copies of the LCM students (for tests that compile or re-layout them)."""
    own = {k: copy.deepcopy(models[k]) for k in ("lcm_tsdm", "lcm_fcsd")}
    return ConsistentAvatarPipeline(
        preset=preset, tsdm={"lcm": own["lcm_tsdm"]}, fcsd={"lcm": own["lcm_fcsd"]}, emotions=emotions
    )


def test_compile_keeps_the_outputs(preset, models, emotions) -> None:
    p = own_students(preset, models, emotions)
    x = inputs(preset, 12)
    eager = p(**x, num_steps=STEPS).frames
    p.compile(backend="eager", channels_last=True)  # dynamo tracing on CPU; inductor/CUDA graphs on GPU
    conv = p.fcsd["lcm"].vae.decoder.conv_in.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    torch.testing.assert_close(p(**x, num_steps=STEPS).frames, eager, atol=1e-5, rtol=0)


def test_compile_auto_means_cuda_graphs_and_channels_last_on_a_gpu_only(preset, models, emotions, monkeypatch) -> None:
    calls: list[dict] = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: calls.append(kw))
    p = own_students(preset, models, emotions)
    formats: list[object] = []
    monkeypatch.setattr(p, "to", lambda *a, memory_format=None, **k: formats.append(memory_format) or p)
    p.compile()  # on the CPU: inductor's default mode, weights left as they are
    assert calls and all(kw == {"backend": "inductor", "fullgraph": False, "dynamic": False} for kw in calls)
    assert formats == []
    calls.clear()
    p._device = torch.device("cuda")  # option resolution only: nothing runs
    p.compile()
    assert calls and all(kw["mode"] == "reduce-overhead" for kw in calls) and formats == [torch.channels_last]
    vaes = len({id(p.tsdm["lcm"].vae), id(p.fcsd["lcm"].vae)})
    assert len(calls) == 3 + 2 * vaes  # TSDM UNet, FCSD ControlNet + UNet, each distinct VAE's encoder and decoder
    calls.clear()
    p.compile(mode="max-autotune-no-cudagraphs", channels_last=False, vae=False)
    assert [kw["mode"] for kw in calls] == ["max-autotune-no-cudagraphs"] * 3 and formats == [torch.channels_last]


def test_channels_last_keeps_the_outputs_and_other_formats_are_refused(preset, models, emotions) -> None:
    p = own_students(preset, models, emotions)
    x = inputs(preset, 13)
    plain = p(**x, num_steps=STEPS).frames
    p.to(memory_format=torch.channels_last)
    assert p.tsdm["lcm"].unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(p(**x, num_steps=STEPS).frames, plain, atol=1e-5, rtol=0)
    with pytest.raises(ConsistentAvatarError, match="memory_format"):
        p.to(memory_format=torch.preserve_format)


# ---------------------------------------------------------------- refiner


@pytest.fixture(scope="module")
def refiner_dir(tmp_path_factory) -> Path:
    from test_refiner import save_tiny_refiner  # tiny random SDXL-refiner weights, real layout

    tmp = tmp_path_factory.mktemp("refiner")
    return save_tiny_refiner(tmp / "sdxl-refiner", tmp)


def test_bundle_refiner_reference_is_loaded_and_applied(
    tmp_path, preset, models, emotions, refiner_dir
) -> None:
    out = save_bundle(
        tmp_path / "b",
        actor="ref",
        preset=preset,
        weights=models,
        emotion_labels=emotions.labels,
        emotion_table=emotions.embeddings,
        refiner=RefinerReference(path=str(refiner_dir), strength=0.5, num_steps=4),
    )
    bundle = load_bundle(out, variants=("lcm",))
    p = ConsistentAvatarPipeline.from_bundle(bundle)
    assert isinstance(p.refiner, Refiner) and p.refiner.strength == 0.5
    x = inputs(preset, 13)
    refined = p(**x, num_steps=STEPS)
    plain = p(**x, num_steps=STEPS, refine=False)
    assert refined.settings["refiner"] and not plain.settings["refiner"] and "refiner" in refined.timings
    assert refined.frames.shape == plain.frames.shape and not torch.equal(refined.frames, plain.frames)
    assert torch.equal(p(**x, num_steps=STEPS).frames, refined.frames)
    # Per-frame seeds: a refined frame does not depend on the batch it is rendered in.
    b = x["coarse_rgb"].shape[0]
    seeds = [100 + i for i in range(b)]
    whole = p(**x, num_steps=STEPS, seed=seeds).frames
    last = {k: v[-1:] for k, v in x.items()}
    alone = p(**last, num_steps=STEPS, seed=seeds[-1:]).frames
    torch.testing.assert_close(alone[0], whole[-1], atol=2e-3, rtol=0)
    no_refiner = ConsistentAvatarPipeline.from_bundle(bundle, refiner=False)
    assert no_refiner.refiner is None and torch.equal(no_refiner(**x, num_steps=STEPS).frames, plain.frames)
    assert ConsistentAvatarPipeline.from_bundle(bundle, refiner=True).refiner is not None
    # a bundle whose reference points nowhere, and one without a reference
    common = {
        "preset": preset,
        "weights": models,
        "emotion_labels": emotions.labels,
        "emotion_table": emotions.embeddings,
    }
    dangling = save_bundle(tmp_path / "c", actor="c", refiner=str(tmp_path / "moved"), **common)
    with pytest.raises(ConsistentAvatarError, match="refiner=False"):
        ConsistentAvatarPipeline.from_bundle(load_bundle(dangling, variants=("lcm",)))
    without = load_bundle(save_bundle(tmp_path / "d", actor="d", **common), variants=("lcm",))
    assert ConsistentAvatarPipeline.from_bundle(without).refiner is None
    with pytest.raises(ConsistentAvatarError, match="references no refiner"):
        ConsistentAvatarPipeline.from_bundle(without, refiner=True)
    with_path = ConsistentAvatarPipeline.from_bundle(without, refiner=refiner_dir)
    assert isinstance(with_path.refiner, Refiner) and with_path.refiner.strength == 0.2


def test_phase_timings_sum_cuda_event_pairs_per_phase() -> None:
    """On a GPU phases are timed with CUDA events read after the call's one sync; a phase timed
    twice (e.g. a refiner pass) adds up. Events stand in as objects with ``elapsed_time`` (ms)."""
    from consistent_avatar.pipeline import _PhaseTimer

    class Event:
        def __init__(self, ms: float) -> None:
            self.ms = ms

        def elapsed_time(self, end: "Event") -> float:
            return end.ms - self.ms

    timer = _PhaseTimer(torch.device("cuda"))
    timer.seconds["tsd"] = 0.5  # a host-clock phase beside the event pairs
    timer.events += [("stage2", Event(0), Event(200)), ("stage3", Event(200), Event(450)),
                     ("stage3", Event(500), Event(550))]
    assert timer.read() == pytest.approx({"tsd": 0.5, "stage2": 0.2, "stage3": 0.3})


def test_seeds_make_generators_on_the_pipeline_device() -> None:
    """A seed seeds a generator where the noise is drawn (a GPU generator on a GPU: no blocking copy
    per step); caller-given generators are used as they are."""
    from consistent_avatar.pipeline import _generators

    g = _generators(3, None, 2, "cpu")
    assert isinstance(g, torch.Generator) and g.device.type == "cpu"
    assert torch.equal(torch.randn(4, generator=g), torch.randn(4, generator=torch.Generator().manual_seed(3)))
    gens = _generators([1, 2], None, 2, "cpu")
    assert [x.initial_seed() for x in gens] == [1, 2]
    mine = torch.Generator().manual_seed(9)
    assert _generators(0, mine, 2, "cuda") is mine


@pytest.mark.parametrize("stage, baseline", [("stage 2 (TSDM)", False), ("stage 3 (FCSD)", True)])
def test_non_finite_latents_are_an_error_not_frames(preset, emotions, stage: str, baseline: bool) -> None:
    """A stage whose sampled latents hold NaN/inf (broken weights, a bf16 overflow) fails the call,
    naming the stage, instead of handing on NaN frames that a render would write as done. The check is
    a device flag read after the call's final sync (no extra sync inside the loops)."""
    m = copy.deepcopy(tiny_models(preset, seed=0))
    broken = m["lcm_tsdm"] if not baseline else m["lcm_fcsd"]
    with torch.no_grad():
        broken.unet.conv_out.bias.fill_(float("nan"))
    pipe = ConsistentAvatarPipeline(
        preset=preset,
        tsdm={"teacher": m["tsdm"], "lcm": m["lcm_tsdm"]},
        fcsd={"teacher": m["fcsd"], "lcm": m["lcm_fcsd"]},
        emotions=emotions,
        actor="broken",
    )
    with pytest.raises(ConsistentAvatarError, match=rf"^{re.escape(stage)}.* sampled NaN or infinite latents \(lcm weights, lcm, 2 steps, float32\): check"):
        pipe(**inputs(preset), num_steps=2, baseline=baseline)


def test_a_compiled_pipeline_adopts_another_actor_in_place(preset, models, emotions) -> None:
    """adopt(): another actor's weights copied into this (compiled, channels-last) pipeline's own
    parameters — their memory unchanged, as CUDA graphs need — render that actor's frames, traced by
    dynamo and compiled by inductor alike; a pipeline of another layout is refused before anything is
    copied."""
    first = own_students(preset, models, emotions)
    other_models = tiny_models(preset, seed=7)
    other_emotions = EmotionTable(EMOTIONS, torch.randn(len(EMOTIONS), 768, generator=torch.Generator().manual_seed(8)))
    other = ConsistentAvatarPipeline(
        preset=preset, tsdm={"lcm": other_models["lcm_tsdm"]}, fcsd={"lcm": other_models["lcm_fcsd"]},
        emotions=other_emotions, actor="other",
    )
    x = inputs(preset, 13)
    expected = other(**x, num_steps=STEPS).frames
    first.compile(backend="eager", channels_last=True)
    before = first(**x, num_steps=STEPS).frames
    addresses = {n: p.data_ptr() for n, p in first.fcsd["lcm"].named_parameters()}
    assert first.adopt(other) is first and first.actor == "other"
    assert {n: p.data_ptr() for n, p in first.fcsd["lcm"].named_parameters()} == addresses
    after = first(**x, num_steps=STEPS).frames
    torch.testing.assert_close(after, expected, atol=1e-5, rtol=0)
    assert not torch.allclose(before, after)

    inductor = own_students(preset, models, emotions)  # inductor's real code generation (CPU: C++)
    inductor.compile(channels_last=True)
    torch.testing.assert_close(inductor(**x, num_steps=STEPS).frames, before, atol=1e-4, rtol=0)
    inductor.adopt(other)  # generated kernels read the parameters: none were baked in as constants
    torch.testing.assert_close(inductor(**x, num_steps=STEPS).frames, expected, atol=1e-4, rtol=0)

    with_teacher = ConsistentAvatarPipeline(
        preset=preset, tsdm={"lcm": other_models["lcm_tsdm"], "teacher": other_models["tsdm"]},
        fcsd={"lcm": other_models["lcm_fcsd"]}, emotions=other_emotions,
    )
    with pytest.raises(ConsistentAvatarError, match=r"holds variants tsdm=\['lcm', 'teacher'\]"):
        first.adopt(with_teacher)
