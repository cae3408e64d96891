"""The CLIP tokenizer of SD1.x, shipped with the package (no hub access).

`clip_tokenizer/` holds vocab.json and merges.txt built by tools/build_clip_tokenizer.py from OpenAI's
BPE merges. A diffusers folder's own tokenizer/ takes precedence when present.
"""

from __future__ import annotations

import os
from pathlib import Path

SHIPPED_TOKENIZER = Path(__file__).resolve().parent / "clip_tokenizer"
BOS_ID, EOS_ID = 49406, 49407


def load_tokenizer(folder: str | os.PathLike | None = None):
    """A transformers CLIPTokenizer (max length 77, padded with EOS) from `folder` or the shipped files."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(folder or SHIPPED_TOKENIZER), local_files_only=True)
