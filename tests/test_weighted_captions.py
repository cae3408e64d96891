"""weighted_captions: prompt weights in training captions, against hand-computed states."""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import pytest
import torch

from library.models.tokenizer import load_tokenizer
from library.text_encoding import encode_texts, token_ids
from library.training.weighted_captions import encode_weighted_captions, plain_text, weighted_token_chunks


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


class PositionEncoder(torch.nn.Module):
    """A stand-in text encoder whose output state at position i of a chunk is [i + 1, 2(i + 1)]: the weights must
    act on these outputs (not on the input embeddings) for the hand-computed values to come out."""

    device = torch.device("cpu")

    def forward(self, ids):
        pos = torch.arange(1, ids.shape[1] + 1, dtype=torch.float32).expand(ids.shape[0], -1)
        return SimpleNamespace(last_hidden_state=torch.stack([pos, 2 * pos], dim=-1))


def test_weights_follow_the_prompt_syntax(tokenizer):
    hand = token_ids(tokenizer, "hand")
    assert len(hand) == 1
    for caption, weight in [("(hand)", 1.1), ("((hand))", 1.1 * 1.1), ("[hand]", 1 / 1.1), ("(hand:1.5)", 1.5),
                            ("[(hand:2)]", 2 / 1.1), ("hand", 1.0)]:
        ids, weights = weighted_token_chunks(tokenizer, [caption])
        assert ids.shape == weights.shape == (1, 1, 77)
        assert ids[0, 0, :3].tolist() == [tokenizer.bos_token_id, hand[0], tokenizer.eos_token_id], caption
        assert weights[0, 0, 1].item() == pytest.approx(weight), caption
        assert weights[0, 0, [0, 2, 3, 76]].tolist() == [1.0] * 4  # BOS, EOS and padding are not weighted
    # escaped brackets are text, weighted 1
    ids, weights = weighted_token_chunks(tokenizer, [r"\(hand\)"])
    assert ids[0, 0, 1:4].tolist() == token_ids(tokenizer, "(hand)") and bool((weights == 1).all())
    assert plain_text(r"a (red:1.3) \(hand\), [palm]") == "a  red  (hand),  palm"  # pieces joined by spaces


def test_states_are_scaled_then_rescaled_to_the_unweighted_mean(tokenizer):
    states = encode_weighted_captions(tokenizer, PositionEncoder(), ["(hand:2) palm", "hand palm"])
    assert states.shape == (2, 77, 2)
    pos = torch.arange(1, 78, dtype=torch.float32)
    # unweighted: the encoder's own states
    assert torch.equal(states[1], torch.stack([pos, 2 * pos], dim=-1))
    # weighted: position 1 ("hand") ×2; the mean over the chunk was (1 + … + 77)·3 / (77·2) = 58.5 and becomes
    # (3003 + 2)·3 / 154, so every state is then multiplied by 3003 / 3005
    expected = pos.clone()
    expected[1] = 2 * 2
    expected = expected * 3003 / 3005
    assert torch.allclose(states[0, :, 0], expected) and torch.allclose(states[0, :, 1], 2 * expected)
    assert states[0].mean().item() == pytest.approx(states[1].mean().item())


def test_long_captions_keep_the_batch_shape(tokenizer):
    long = ", ".join(["hand"] * 100)  # 199 tokens: cut to two chunks of 75
    ids, weights = weighted_token_chunks(tokenizer, [f"({long})", "palm"], max_token_length=150)
    assert ids.shape == (2, 2, 77)
    assert weights[0, 1, 1].item() == pytest.approx(1.1) and weights[0, 1, 76].item() == 1.0  # EOS of chunk 2
    # the short caption's second chunk is an empty one: BOS, EOS, padding, weight 1
    assert ids[1, 1, :2].tolist() == [tokenizer.bos_token_id, tokenizer.eos_token_id]
    assert bool((weights[1] == 1).all())
    states = encode_weighted_captions(tokenizer, PositionEncoder(), [f"({long})", "palm"], max_token_length=150)
    assert states.shape == (2, 154, 2)
    # each chunk is rescaled on its own: every token of the second chunk weighs 1.1 but its BOS and EOS
    pos = torch.arange(1, 78, dtype=torch.float32)
    w = torch.full((77,), 1.1)
    w[0] = w[76] = 1.0
    ratio = pos.sum() / (pos * w).sum()
    assert torch.allclose(states[0, :77, 0], pos * w * ratio)


def test_unweighted_captions_encode_as_before(tokenizer):
    from library.models.architecture import TINY_TEXT_CONFIG, build_text_encoder

    torch.manual_seed(0)
    encoder = build_text_encoder(TINY_TEXT_CONFIG).eval()
    captions = ["hand, palm, five fingers", "", "a photo of a hand"]
    with torch.no_grad():
        for max_len in (75, 150):
            for clip_skip in (1, 2):
                assert torch.equal(encode_weighted_captions(tokenizer, encoder, captions, max_len, clip_skip),
                                   encode_texts(tokenizer, encoder, captions, max_len, clip_skip))


def test_the_training_loop_encodes_weighted_captions_when_asked(tokenizer):
    from library.training.loop import encode_captions

    def run_with(weighted: bool, grad: bool):
        job = SimpleNamespace(weighted_captions=weighted, max_token_length=75, clip_skip=1)
        return SimpleNamespace(job=job, model=SimpleNamespace(tokenizer=tokenizer, text_encoder=PositionEncoder()),
                               method=SimpleNamespace(needs_text_encoder_grad=grad), text_cache={},
                               accelerator=SimpleNamespace(autocast=contextlib.nullcontext))

    for grad in (False, True):  # the cached path (frozen text encoder) and the direct one
        weighted = encode_captions(run_with(True, grad), ["(hand:2) palm", "hand palm"])
        plain = encode_captions(run_with(False, grad), ["(hand:2) palm", "hand palm"])
        assert torch.allclose(weighted[0, 1, 0], torch.tensor(4 * 3003 / 3005))
        assert torch.equal(weighted[1], plain[1]) and not torch.equal(weighted[0], plain[0])


def test_a_job_with_weighted_captions_loads(tmp_path):
    from library.config import load_job
    from support import write_job_file

    images = tmp_path / "img"
    images.mkdir()
    path = write_job_file(tmp_path, {"pretrained_model_name_or_path": "m.safetensors", "weighted_captions": True},
                          [{"image_dir": str(images)}])
    assert load_job("train_network", config_path=str(path)).weighted_captions is True
    assert load_job("train_textual_inversion", ["--config", str(path), "--token_string", "<hand>",
                                                "--init_word", "hand"]).weighted_captions is True
