"""The emotion code T_i: CLIP text embeddings of labels, loaded from local folders (SD 1.5 layout or
flat), the random default, caching, determinism and the errors a user meets."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from consistent_avatar.data.layout import EMOTIONS
from consistent_avatar.errors import ConsistentAvatarError
from consistent_avatar.text_embedding import (
    EOS,
    EmotionTextEncoder,
    generated_vocabulary,
    save_random_clip_text_encoder,
)

HIDDEN = 32


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_random_clip_text_encoder(tmp_path_factory.mktemp("clip") / "sd15", hidden_size=HIDDEN, seed=0)


@pytest.fixture(scope="module")
def in_memory() -> EmotionTextEncoder:
    return EmotionTextEncoder.random(hidden_size=HIDDEN, seed=0)


def test_saved_random_encoder_loads_back_identically(
    saved: Path, in_memory: EmotionTextEncoder, tmp_path: Path
) -> None:
    assert sorted(p.name for p in saved.iterdir()) == ["text_encoder", "tokenizer"]
    expected = in_memory.embed(list(EMOTIONS))
    loaded = EmotionTextEncoder.from_pretrained(saved)
    np.testing.assert_array_equal(loaded.embed(list(EMOTIONS)), expected)
    assert loaded.source == f"clip:{saved.resolve()}"
    # SD 1.5 ships vocab.json + merges.txt only; a flat folder holds model and tokenizer files together.
    flat = tmp_path / "flat"
    shutil.copytree(saved / "text_encoder", flat)
    for f in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        shutil.copy(saved / "tokenizer" / f, flat / f)
    np.testing.assert_array_equal(EmotionTextEncoder.from_pretrained(flat).embed(list(EMOTIONS)), expected)


def test_embedding_is_the_pooled_output_at_end_of_text(in_memory: EmotionTextEncoder) -> None:
    ids = in_memory.tokenizer("surprised", return_tensors="pt")["input_ids"]
    tokens = in_memory.tokenizer.convert_ids_to_tokens(ids[0])
    assert tokens == ["<|startoftext|>", "surprised</w>", EOS]  # the merges make each label one token
    with torch.no_grad():
        hidden = in_memory.model(input_ids=ids).last_hidden_state[0, -1].numpy()
    np.testing.assert_allclose(in_memory.embed(["surprised"])[0], hidden, rtol=1e-6, atol=1e-6)


def test_shapes_cache_and_templates(in_memory: EmotionTextEncoder) -> None:
    calls = []
    hook = in_memory.model.register_forward_hook(lambda *_: calls.append(1))
    try:
        e = in_memory.embed(["happy", "sad", "happy"])
        assert e.shape == (3, HIDDEN) and e.dtype == np.float32
        np.testing.assert_array_equal(e[0], e[2])
        n = len(calls)
        in_memory.embed(["sad", "happy"])
        assert len(calls) == n  # cached: no new forward pass
        assert in_memory.embed([]).shape == (0, HIDDEN)
    finally:
        hook.remove()
    framed = EmotionTextEncoder(in_memory.model, in_memory.tokenizer, template="a photo of a {label} face")
    assert framed.prompt("sad") == "a photo of a sad face"
    assert not np.allclose(framed.embed(["sad"]), in_memory.embed(["sad"]))


def test_distinct_labels_give_distinct_embeddings(in_memory: EmotionTextEncoder) -> None:
    e = in_memory.embed(list(EMOTIONS))
    d = np.linalg.norm(e[:, None] - e[None], axis=2)
    assert (d[~np.eye(len(EMOTIONS), dtype=bool)] > 1e-2 * np.linalg.norm(e, axis=1).mean()).all()


def test_random_encoder_is_deterministic_by_seed_and_warns(caplog: pytest.LogCaptureFixture) -> None:
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    with caplog.at_level(logging.WARNING, logger="consistent_avatar.text_embedding"):
        a = EmotionTextEncoder.random(hidden_size=HIDDEN, seed=5)
    assert torch.equal(torch.rand(1), before)  # the global RNG is left alone
    assert "RANDOMLY INITIALISED" in caplog.text
    b = EmotionTextEncoder.random(hidden_size=HIDDEN, seed=5)
    c = EmotionTextEncoder.random(hidden_size=HIDDEN, seed=6)
    np.testing.assert_array_equal(a.embed(["fear"]), b.embed(["fear"]))
    assert not np.allclose(a.embed(["fear"]), c.embed(["fear"]))
    assert a.source == "random-init-clip:seed5"


def test_default_random_encoder_is_768_wide() -> None:
    enc = EmotionTextEncoder.random()
    assert enc.hidden_size == 768 and enc.embed(["neutral"]).shape == (1, 768)


def test_vocabulary_covers_every_byte_and_special_tokens() -> None:
    vocab, merges = generated_vocabulary()
    assert len(set(vocab.values())) == len(vocab) and max(vocab.values()) == len(vocab) - 1
    assert vocab[EOS] == len(vocab) - 1
    assert merges and all(a + b in vocab for a, b in merges)


def test_loading_errors_name_the_path(saved: Path, tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(ConsistentAvatarError, match=f"{missing} does not exist"):
        EmotionTextEncoder.from_pretrained(missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConsistentAvatarError, match=f"no CLIP text encoder in {empty}"):
        EmotionTextEncoder.from_pretrained(empty)
    no_tok = tmp_path / "no_tok"
    shutil.copytree(saved / "text_encoder", no_tok / "text_encoder")
    with pytest.raises(ConsistentAvatarError, match=f"{no_tok} has text_encoder/ but no tokenizer/"):
        EmotionTextEncoder.from_pretrained(no_tok)
    no_weights = tmp_path / "no_weights"
    shutil.copytree(saved, no_weights)
    (no_weights / "text_encoder" / "model.safetensors").unlink()
    with pytest.raises(ConsistentAvatarError, match=f"no weights in {no_weights / 'text_encoder'}"):
        EmotionTextEncoder.from_pretrained(no_weights)
    no_vocab = tmp_path / "no_vocab"
    shutil.copytree(saved, no_vocab)
    for f in ("tokenizer.json", "merges.txt"):
        (no_vocab / "tokenizer" / f).unlink()
    with pytest.raises(ConsistentAvatarError, match=f"no CLIP tokenizer in {no_vocab / 'tokenizer'}"):
        EmotionTextEncoder.from_pretrained(no_vocab)
    bad_config = tmp_path / "bad_config"
    shutil.copytree(saved, bad_config)
    (bad_config / "text_encoder" / "config.json").write_text("{not json")
    with pytest.raises(
        ConsistentAvatarError, match=f"could not load the CLIP text encoder from {bad_config}"
    ):
        EmotionTextEncoder.from_pretrained(bad_config)


def test_bad_arguments(in_memory: EmotionTextEncoder) -> None:
    with pytest.raises(ConsistentAvatarError, match="must contain {label}"):
        EmotionTextEncoder(in_memory.model, in_memory.tokenizer, template="a face")
    with pytest.raises(ConsistentAvatarError, match="wrap a single label"):
        in_memory.embed("happy")
    with pytest.raises(ConsistentAvatarError, match="non-empty strings"):
        in_memory.embed(["happy", ""])
    with pytest.raises(ConsistentAvatarError, match="divisible"):
        save_random_clip_text_encoder(Path("/nonexistent/never"), hidden_size=30, num_heads=4)
