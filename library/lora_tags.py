"""WebUI's `<lora:name:multiplier>` prompt tags: read by sample.py (the prompt's own LoRAs) and by
`evaluate.py import` (which LoRAs made an image). A leaf module: the rating tools import it without torch."""

from __future__ import annotations

import re

# `<lora:name:multiplier>` as WebUI writes it; `<lora:name>` means 1; a third part (U-Net multiplier) is
# WebUI's extension of the syntax and is kept out of the prompt too (only the first multiplier is stored).
LORA_TAG = re.compile(r"<lora:([^:>]+)(?::([^:>]*))?(?::[^>]*)?>")


def split_lora_tags(prompt: str) -> tuple[str, list[tuple[str, float]]]:
    """'a hand <lora:hands:0.75>' → ('a hand', [('hands', 0.75)]). Whitespace the tags leave is tidied."""
    loras: list[tuple[str, float]] = []

    def take(match: re.Match) -> str:
        name, multiplier = match.group(1).strip(), (match.group(2) or "").strip()
        try:
            loras.append((name, float(multiplier) if multiplier else 1.0))
        except ValueError:
            return match.group(0)  # not a tag WebUI would apply: leave it in the prompt
        return " "

    text = LORA_TAG.sub(take, prompt)
    text = re.sub(r"[ \t]+", " ", text)
    text = re.sub(r" +([,.;])", r"\1", text)
    text = re.sub(r",(\s*,)+", ",", text)  # a tag alone between two commas
    text = re.sub(r"^[\s,]+|[\s,]+$", "", text)
    return text, loras
