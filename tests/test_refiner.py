"""The optional SDXL-refiner pass (models/refiner.py), on tiny random SDXL-refiner weights."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    StableDiffusionXLImg2ImgPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

from consistent_avatar.errors import ConsistentAvatarError
from consistent_avatar.models.refiner import Refiner

WIDTH = 32  # text width = projection = cross-attention width
TIME_DIM = 8


def tiny_clip_tokenizer(folder: Path) -> CLIPTokenizer:
    """A CLIP BPE tokenizer from a generated vocab.json / merges.txt (letters only, no merges)."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in "abcdefghijklmnopqrstuvwxyz":
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer.from_pretrained(folder, model_max_length=77)


def save_tiny_refiner(root: Path, tmp: Path, *, seed: int = 0) -> Path:
    """Random SDXL-refiner components in the real refiner's layout (no text_encoder/tokenizer)."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        cross_attention_dim=WIDTH,
        addition_embed_type="text_time",
        addition_time_embed_dim=TIME_DIM,
        # refiner: 5 time ids (size, crop, aesthetic score) + the pooled text embedding
        projection_class_embeddings_input_dim=5 * TIME_DIM + WIDTH,
        norm_num_groups=32,
    )
    vae = AutoencoderKL(
        block_out_channels=(32, 64),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        sample_size=32,
        scaling_factor=0.13025,
        force_upcast=True,
    )
    tokenizer = tiny_clip_tokenizer(tmp / "tokenizer_src")
    text_encoder = CLIPTextModelWithProjection(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=WIDTH,
            intermediate_size=37,
            num_hidden_layers=2,  # SDXL reads the penultimate layer
            num_attention_heads=4,
            projection_dim=WIDTH,
            max_position_embeddings=77,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
    )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
    )
    pipe = StableDiffusionXLImg2ImgPipeline(
        vae=vae,
        text_encoder=None,
        text_encoder_2=text_encoder,
        tokenizer=None,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=scheduler,
        requires_aesthetics_score=True,
        force_zeros_for_empty_prompt=False,
        add_watermarker=False,
    )
    pipe.save_pretrained(root)
    return root


@pytest.fixture(scope="module")
def refiner_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("refiner")
    return save_tiny_refiner(tmp / "sdxl-refiner", tmp)


@pytest.fixture(scope="module")
def refiner(refiner_dir: Path) -> Refiner:
    return Refiner.from_pretrained(refiner_dir, strength=0.5, num_steps=4)


def frames(batch: int = 2, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, 32, 32, generator=g) * 2 - 1


def test_layout_is_the_refiners(refiner_dir: Path) -> None:
    index = json.loads((refiner_dir / "model_index.json").read_text())
    assert index["text_encoder"] == [None, None] and index["tokenizer"] == [None, None]
    assert index["requires_aesthetics_score"] is True


def test_refine_shape_range_and_effect(refiner: Refiner) -> None:
    x = frames()
    y = refiner.refine(x, seed=0)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert torch.isfinite(y).all()
    assert y.min() >= -1.0 and y.max() <= 1.0
    assert (y - x).abs().mean() > 1e-3  # it did something
    assert refiner.effective_steps() == 2


def test_unit_range_is_the_same_refinement(refiner: Refiner) -> None:
    x = frames()
    signed = refiner.refine(x, seed=3)
    unit = refiner.refine((x + 1) / 2, seed=3, value_range="unit")
    assert unit.min() >= 0.0 and unit.max() <= 1.0
    torch.testing.assert_close(unit, (signed + 1) / 2, atol=1e-4, rtol=1e-4)


def test_seeded_determinism(refiner: Refiner) -> None:
    x = frames()
    a = refiner.refine(x, seed=11)
    b = refiner.refine(x, seed=11)
    c = refiner.refine(x, seed=12)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_strength(refiner: Refiner) -> None:
    x = frames()
    assert torch.equal(refiner.refine(x, strength=0.0), x)  # no denoising step → unchanged
    assert torch.equal(refiner.refine(x, strength=0.2), x)  # int(4 · 0.2) = 0 steps, documented
    assert refiner.effective_steps(1.0) == 4
    weak, strong = refiner.refine(x, strength=0.25), refiner.refine(x, strength=1.0)
    assert not torch.allclose(weak, strong)
    with pytest.raises(ConsistentAvatarError, match="strength"):
        refiner.refine(x, strength=1.5)


def test_empty_prompt_cached_and_text_encoder_released(refiner: Refiner, refiner_dir: Path) -> None:
    assert refiner.pipeline.text_encoder_2 is None
    tok = CLIPTokenizer.from_pretrained(refiner_dir / "tokenizer_2")
    enc = CLIPTextModelWithProjection.from_pretrained(refiner_dir / "text_encoder_2")
    ids = tok("", padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids
    with torch.no_grad():
        out = enc(ids, output_hidden_states=True)
    embeds = refiner.prompt_embeds
    torch.testing.assert_close(embeds["prompt_embeds"], out.hidden_states[-2])
    torch.testing.assert_close(embeds["pooled_prompt_embeds"], out.text_embeds)
    assert "negative_prompt_embeds" not in embeds  # guidance 1: no CFG


def test_classifier_free_guidance(refiner_dir: Path) -> None:
    r = Refiner.from_pretrained(refiner_dir, strength=0.5, num_steps=2, guidance_scale=3.0)
    assert set(r.prompt_embeds) == {
        "prompt_embeds",
        "pooled_prompt_embeds",
        "negative_prompt_embeds",
        "negative_pooled_prompt_embeds",
    }
    x = frames(batch=3)
    y = r.refine(x, seed=1)
    assert y.shape == x.shape and torch.equal(y, r.refine(x, seed=1))


def test_missing_weights_are_named(tmp_path: Path, refiner_dir: Path) -> None:
    missing = tmp_path / "no-such-refiner"
    with pytest.raises(ConsistentAvatarError, match=str(missing)):
        Refiner.from_pretrained(missing)
    partial = tmp_path / "partial"
    shutil.copytree(refiner_dir, partial)
    shutil.rmtree(partial / "unet")
    with pytest.raises(ConsistentAvatarError, match="unet"):
        Refiner.from_pretrained(partial)


def test_bad_images(refiner: Refiner) -> None:
    x = frames()
    with pytest.raises(ConsistentAvatarError, match="value_range"):
        refiner.refine(x, value_range="unit")  # [-1, 1] frames declared as [0, 1]
    with pytest.raises(ConsistentAvatarError, match=r"\(B, 3, H, W\)"):
        refiner.refine(x[:, :1])
    with pytest.raises(ConsistentAvatarError, match="divisible"):
        refiner.refine(x[..., :31])
    with pytest.raises(ConsistentAvatarError, match="num_steps"):
        Refiner(refiner.pipeline, num_steps=0)
