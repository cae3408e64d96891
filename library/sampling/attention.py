"""A1111 prompt weighting on top of `library.text_encoding`'s 75-token chunks.

Syntax (as A1111's WebUI reads it):
- `(word)` ×1.1 per pair, `[word]` ÷1.1 per pair, `(word:1.5)` sets a factor; groups nest and multiply;
- `\\(`, `\\)`, `\\[`, `\\]`, `\\\\` are literal characters; an unmatched `)` or `]` is literal text; an
  unclosed `(` or `[` applies to the end of the prompt;
- `BREAK` (upper case, a whole word) ends the current 75-token chunk.

Encoding: each weighted piece is tokenized on its own and the tokens are laid out in chunks of 75
(BOS + 75 + EOS, padded to 77), exactly like `text_encoding.tokenize_chunks`, so an unweighted prompt
encodes to the same states as a training caption. Each chunk's hidden states are multiplied by their
tokens' weights and then rescaled so that the chunk's mean is what it was (A1111's rule). A1111 takes
that mean over the whole batch; here it is per prompt, so an image never depends on its batch-mates.
A1111's "move the chunk break back to the last comma" is not done (training does not do it either).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from library.text_encoding import CHUNK, encode_token_chunks

ROUND_FACTOR = 1.1
SQUARE_FACTOR = 1 / 1.1
BREAK = "BREAK"
_BREAK_WEIGHT = -1.0  # marks a BREAK in the parsed list

_TOKENS = re.compile(
    r"""
    \\[()\[\]\\]                              # an escaped bracket or backslash
  | \\                                        # a lone backslash is literal
  | \(
  | \[
  | :\s*([+-]?(?:\d+(?:\.\d*)?|\.\d+))\s*\)   # ":1.2)" closes a weighted group
  | \)
  | \]
  | [^\\()\[\]:]+                             # plain text
  | :                                         # a colon that is not a weight
    """,
    re.VERBOSE,
)
_BREAK_SPLIT = re.compile(r"\s*\bBREAK\b\s*")


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """Prompt text → [(piece, weight)], adjacent equal weights merged; BREAK appears as ("BREAK", -1).

    >>> parse_prompt_attention("a (red:1.5) [hat]")
    [('a ', 1.0), ('red', 1.5), (' ', 1.0), ('hat', 0.909...)]
    """
    pieces: list[list] = []
    round_open: list[int] = []
    square_open: list[int] = []

    def scale_from(start: int, factor: float) -> None:
        for piece in pieces[start:]:
            if piece[1] != _BREAK_WEIGHT:
                piece[1] *= factor

    def add_text(chunk: str) -> None:
        for i, part in enumerate(_BREAK_SPLIT.split(chunk)):
            if i > 0:
                pieces.append([BREAK, _BREAK_WEIGHT])
            if part:
                pieces.append([part, 1.0])

    for match in _TOKENS.finditer(text):
        token, weight = match.group(0), match.group(1)
        if token.startswith("\\") and len(token) == 2:
            pieces.append([token[1], 1.0])
        elif token == "(":
            round_open.append(len(pieces))
        elif token == "[":
            square_open.append(len(pieces))
        elif weight is not None and round_open:
            scale_from(round_open.pop(), float(weight))
        elif token == ")" and round_open:
            scale_from(round_open.pop(), ROUND_FACTOR)
        elif token == "]" and square_open:
            scale_from(square_open.pop(), SQUARE_FACTOR)
        else:
            add_text(token)
    for start in round_open:
        scale_from(start, ROUND_FACTOR)
    for start in square_open:
        scale_from(start, SQUARE_FACTOR)

    merged: list[tuple[str, float]] = []
    for piece, weight in pieces:
        if merged and weight != _BREAK_WEIGHT and merged[-1][1] == weight:
            merged[-1] = (merged[-1][0] + piece, weight)
        else:
            merged.append((piece, weight))
    return merged or [("", 1.0)]


@dataclass(frozen=True)
class WeightedTokens:
    """Token ids [n_chunks, 77] and their weights [n_chunks, 77] (BOS/EOS/padding weigh 1)."""

    ids: torch.Tensor
    weights: torch.Tensor

    @property
    def weighted(self) -> bool:
        return bool((self.weights != 1.0).any())


def chunk_weighted_tokens(pieces: Sequence[tuple[list[int], float]], bos: int, eos: int, pad: int,
                          max_chunks: int | None = None) -> WeightedTokens:
    """Lay out (token ids, weight) pieces in 75-token chunks; a piece with weight -1 is a BREAK."""
    chunks: list[tuple[list[int], list[float]]] = []
    ids: list[int] = []
    weights: list[float] = []

    def close_chunk() -> None:
        nonlocal ids, weights
        chunks.append((ids, weights))
        ids, weights = [], []

    for tokens, weight in pieces:
        if weight == _BREAK_WEIGHT:
            if ids:
                close_chunk()
            continue
        for token in tokens:
            ids.append(token)
            weights.append(weight)
            if len(ids) == CHUNK:
                close_chunk()
    if ids or not chunks:
        close_chunk()
    if max_chunks is not None:
        chunks = chunks[:max_chunks]

    rows, row_weights = [], []
    for body, body_weights in chunks:
        padding = CHUNK - len(body)
        rows.append([bos] + body + [eos] + [pad] * padding)
        row_weights.append([1.0] + body_weights + [1.0] + [1.0] * padding)
    return WeightedTokens(torch.tensor(rows, dtype=torch.long), torch.tensor(row_weights, dtype=torch.float32))


def tokenize_weighted(tokenizer, text: str, max_chunks: int | None = None,
                      expand: Callable[[str], str] | None = None) -> WeightedTokens:
    """A1111-weighted prompt → chunked token ids and weights. `expand` rewrites each piece's text
    before tokenizing (used to expand multi-vector embedding names)."""
    pieces: list[tuple[list[int], float]] = []
    for piece, weight in parse_prompt_attention(text):
        if weight == _BREAK_WEIGHT:
            pieces.append(([], weight))
            continue
        piece = expand(piece) if expand else piece
        pieces.append((tokenizer(piece, add_special_tokens=False, truncation=False).input_ids, weight))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return chunk_weighted_tokens(pieces, tokenizer.bos_token_id, tokenizer.eos_token_id, pad, max_chunks)


def apply_token_weights(states: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Scale chunk states [n_chunks, 77, width] by token weights [n_chunks, 77], keeping each chunk's mean."""
    original_mean = states.float().mean(dim=(1, 2), keepdim=True)
    scaled = states.float() * weights.to(states.device)[..., None]
    new_mean = scaled.mean(dim=(1, 2), keepdim=True)
    # a mean of ~0 (possible with untrained encoders) would blow the ratio up: leave such chunks unscaled
    ratio = torch.where(new_mean.abs() > 1e-6, original_mean / new_mean, torch.ones_like(new_mean))
    return (scaled * ratio).to(states.dtype)


def encode_weighted(text_encoder, tokens: WeightedTokens, clip_skip: int = 1) -> torch.Tensor:
    """Hidden states [1, n_chunks*77, width] of one weighted prompt."""
    n_chunks, length = tokens.ids.shape
    states = encode_token_chunks(text_encoder, tokens.ids[None], clip_skip)
    if not tokens.weighted:
        return states
    per_chunk = states.reshape(n_chunks, length, states.shape[-1])
    return apply_token_weights(per_chunk, tokens.weights).reshape(1, n_chunks * length, -1)
