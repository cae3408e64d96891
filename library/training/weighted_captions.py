"""weighted_captions: prompt weights in training captions, `(word:1.2)`, `(word)` ×1.1, `[word]` ÷1.1, `\\(` literal.

The captions are read with the weighted-prompt parser the sampler uses (library/sampling/attention.py, A1111's
syntax), laid out in the same 75-token chunks as unweighted captions (`max_token_length // 75` of them, so a
batch keeps one shape), encoded, and each chunk's output hidden states are multiplied by their tokens' weights
and rescaled so that the chunk's mean is what it was unweighted. That is sd-scripts' rule as its
custom_train_functions.get_weighted_text_embeddings applies it (sd-scripts takes the mean over the whole
caption, which is the same for captions of one chunk, the default max_token_length = 75) and A1111's, so a
caption is encoded in training exactly as the same text is when sampling. A caption without brackets encodes
to the states `text_encoding.encode_texts` gives it.
"""

from __future__ import annotations

from typing import Sequence

import torch

from library.sampling.attention import BREAK, apply_token_weights, parse_prompt_attention, tokenize_weighted
from library.text_encoding import CHUNK, encode_token_chunks


def weighted_token_chunks(tokenizer, captions: Sequence[str], max_token_length: int = 75
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """(token ids, weights), both [B, n_chunks, 77] with n_chunks = max_token_length // 75: past that the text
    is cut off (as unweighted captions are); shorter captions get padding chunks of weight 1."""
    n_chunks = max(1, max_token_length // CHUNK)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    empty = [tokenizer.bos_token_id, tokenizer.eos_token_id] + [pad] * CHUNK
    ids, weights = [], []
    for caption in captions:
        tokens = tokenize_weighted(tokenizer, caption, max_chunks=n_chunks)
        missing = n_chunks - tokens.ids.shape[0]
        ids.append(torch.cat([tokens.ids, torch.tensor([empty] * missing, dtype=torch.long).view(missing, CHUNK + 2)]))
        weights.append(torch.cat([tokens.weights, torch.ones(missing, CHUNK + 2)]))
    return torch.stack(ids), torch.stack(weights)


def encode_weighted_captions(tokenizer, text_encoder, captions: Sequence[str], max_token_length: int = 75,
                             clip_skip: int = 1) -> torch.Tensor:
    """Hidden states [B, n_chunks*77, width] of weighted captions (one text-encoder call for the batch)."""
    ids, weights = weighted_token_chunks(tokenizer, captions, max_token_length)
    batch, n_chunks, length = ids.shape
    states = encode_token_chunks(text_encoder, ids, clip_skip)
    rows = []
    for b in range(batch):
        if bool((weights[b] != 1.0).any()):
            per_chunk = states[b].reshape(n_chunks, length, -1)
            rows.append(apply_token_weights(per_chunk, weights[b]).reshape(n_chunks * length, -1))
        else:
            rows.append(states[b])
    return torch.stack(rows)


def plain_text(caption: str) -> str:
    """The text a weighted caption is tokenized as (brackets and weights taken out), for length checks."""
    return " ".join(piece for piece, weight in parse_prompt_attention(caption) if (piece, weight) != (BREAK, -1.0))
