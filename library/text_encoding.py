"""Captions and prompts → CLIP hidden states, the way SD1.x UIs do it.

- Prompts longer than 75 tokens are split into chunks of 75; each chunk gets its own BOS/EOS and
  padding to 77 and is encoded separately; the states are concatenated (A1111's scheme), so a
  150-token job gives [B, 154, width]. Training and sampling share this code, so what the model
  learns is what the UIs feed it.
- clip_skip = N takes the N-th last layer's output and applies the final layer norm (A1111, sd-scripts).
"""

from __future__ import annotations

from typing import Sequence

import torch

CHUNK = 75  # tokens per chunk, without BOS/EOS


def tokenize_chunks(tokenizer, texts: Sequence[str], max_token_length: int = 75) -> torch.Tensor:
    """Token ids [B, n_chunks, 77]; text past max_token_length is cut off."""
    n_chunks = max(1, max_token_length // CHUNK)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    rows = []
    for text in texts:
        ids = token_ids(tokenizer, text)[: n_chunks * CHUNK]
        chunks = []
        for c in range(n_chunks):
            body = ids[c * CHUNK:(c + 1) * CHUNK]
            chunk = [bos] + body + [eos]
            chunks.append(chunk + [pad] * (CHUNK + 2 - len(chunk)))
        rows.append(chunks)
    return torch.tensor(rows, dtype=torch.long)


def token_ids(tokenizer, text: str) -> list[int]:
    """The text's token ids without BOS/EOS, uncut (and without transformers' warning about length: callers
    cut to max_token_length and say so themselves)."""
    return tokenizer(text, add_special_tokens=False, truncation=False, verbose=False).input_ids


def long_captions(tokenizer, captions, max_token_length: int) -> list[tuple[object, int]]:
    """(source, token count) of each caption longer than max_token_length tokens, longest first."""
    seen: dict[str, int] = {}
    found = []
    for source, text in captions:
        if text not in seen:
            seen[text] = len(token_ids(tokenizer, text))
        if seen[text] > max_token_length:
            found.append((source, seen[text]))
    return sorted(found, key=lambda item: -item[1])


def encode_token_chunks(text_encoder, ids: torch.Tensor, clip_skip: int = 1) -> torch.Tensor:
    """Hidden states [B, n_chunks*77, width] for token ids [B, n_chunks, 77]."""
    batch, n_chunks, length = ids.shape
    flat = ids.reshape(batch * n_chunks, length).to(text_encoder.device)
    if clip_skip <= 1:
        states = text_encoder(flat).last_hidden_state
    else:
        out = text_encoder(flat, output_hidden_states=True)
        states = final_layer_norm(text_encoder)(out.hidden_states[-clip_skip])
    return states.reshape(batch, n_chunks * length, states.shape[-1])


def final_layer_norm(text_encoder) -> torch.nn.Module:
    """CLIP's last LayerNorm (transformers ≥ 5 dropped the `text_model.` level; older versions have it)."""
    for name in ("final_layer_norm", "text_model.final_layer_norm"):
        try:
            return text_encoder.get_submodule(name)
        except AttributeError:
            continue
    raise TypeError("the text encoder has no final_layer_norm; it is not a CLIP text model")


def encode_texts(tokenizer, text_encoder, texts: Sequence[str], max_token_length: int = 75,
                 clip_skip: int = 1) -> torch.Tensor:
    return encode_token_chunks(text_encoder, tokenize_chunks(tokenizer, texts, max_token_length), clip_skip)
