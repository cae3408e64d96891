"""Labelled image grids: prompts × seeds, or prompts × LoRA multipliers, in one PNG.

    grid = image_grid(cells, row_labels=["a photo of a hand"], col_labels=["seed 1", "seed 2"])

Column labels go in a band on top, row labels in a column on the left (wrapped, cut with "…" when
too long). A missing cell (None) stays blank.
"""

from __future__ import annotations

from typing import Sequence

from PIL import Image, ImageDraw, ImageFont

BACKGROUND = (255, 255, 255)
TEXT_COLOR = (0, 0, 0)


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _text_width(font, text: str) -> float:
    return font.getlength(text)


def wrap_text(text: str, font, width: float, max_lines: int) -> list[str]:
    """Greedy word wrap to `width` pixels; a cut-off text ends with "…"."""
    lines: list[str] = []
    current = ""
    for word in text.split():
        candidate = f"{current} {word}".strip()
        if _text_width(font, candidate) <= width or not current:
            current = candidate
        else:
            lines.append(current)
            current = word
    if current:
        lines.append(current)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = lines[-1].rstrip(",. ") + "…"
    return [_fit(line, font, width) for line in lines]


def _fit(line: str, font, width: float) -> str:
    if _text_width(font, line) <= width:
        return line
    while line and _text_width(font, line + "…") > width:
        line = line[:-1]
    return line + "…"


def image_grid(cells: Sequence[Sequence[Image.Image | None]], row_labels: Sequence[str] = (),
               col_labels: Sequence[str] = (), font_size: int | None = None) -> Image.Image:
    """A grid of equally sized cells (size of the first image), with optional row/column labels."""
    n_rows = len(cells)
    n_cols = max((len(row) for row in cells), default=0)
    first = next((im for row in cells for im in row if im is not None), None)
    if first is None:
        raise ValueError("image_grid needs at least one image")
    cell_w, cell_h = first.size
    size = font_size or max(10, min(28, cell_w // 12))
    font = _font(size)
    line_h = int(size * 1.25)
    pad = max(2, size // 3)

    label_w = max(cell_w, 160) if row_labels else 0
    label_h = (2 * line_h + 2 * pad) if col_labels else 0
    grid = Image.new("RGB", (label_w + n_cols * cell_w, label_h + n_rows * cell_h), BACKGROUND)
    draw = ImageDraw.Draw(grid)

    for c, label in enumerate(col_labels[:n_cols]):
        lines = wrap_text(label, font, cell_w - 2 * pad, max_lines=2)
        for i, line in enumerate(lines):
            x = label_w + c * cell_w + (cell_w - _text_width(font, line)) / 2
            draw.text((x, pad + i * line_h), line, fill=TEXT_COLOR, font=font)
    max_row_lines = max(1, (cell_h - 2 * pad) // line_h)
    for r, label in enumerate(row_labels[:n_rows]):
        lines = wrap_text(label, font, label_w - 2 * pad, max_lines=max_row_lines)
        top = label_h + r * cell_h + (cell_h - len(lines) * line_h) / 2
        for i, line in enumerate(lines):
            draw.text((pad, top + i * line_h), line, fill=TEXT_COLOR, font=font)

    for r, row in enumerate(cells):
        for c, image in enumerate(row):
            if image is not None:
                grid.paste(image.convert("RGB").resize((cell_w, cell_h)) if image.size != (cell_w, cell_h)
                           else image.convert("RGB"), (label_w + c * cell_w, label_h + r * cell_h))
    return grid


def panel_grid(panels: Sequence[tuple[str, Sequence[Sequence[Image.Image | None]]]], row_labels: Sequence[str] = (),
               col_labels: Sequence[str] = (), font_size: int | None = None) -> Image.Image:
    """Panels side by side, each a grid of the same rows and columns under its own title (e.g. one panel
    per LoRA multiplier, seeds across and prompts down); the row labels stand once, left of the first."""
    if not panels:
        raise ValueError("panel_grid needs at least one panel")
    grids = [image_grid(cells, row_labels if i == 0 else (), col_labels, font_size)
             for i, (_, cells) in enumerate(panels)]
    first = next(im for _, cells in panels for row in cells for im in row if im is not None)
    size = font_size or max(12, min(32, first.width // 8))
    font = _font(size)
    pad = max(3, size // 3)
    title_h = int(size * 1.25) + 2 * pad
    gap = max(8, first.width // 8)
    width = sum(g.width for g in grids) + gap * (len(grids) - 1)
    out = Image.new("RGB", (width, title_h + max(g.height for g in grids)), BACKGROUND)
    draw = ImageDraw.Draw(out)
    x = 0
    for (title, _), grid, index in zip(panels, grids, range(len(grids))):
        left = grid.width - len(panels[index][1][0]) * first.width if panels[index][1] else 0  # its label column
        line = _fit(title, font, grid.width - left - 2 * pad)
        draw.text((x + left + (grid.width - left - _text_width(font, line)) / 2, pad), line, fill=TEXT_COLOR,
                  font=font)
        out.paste(grid, (x, title_h))
        x += grid.width + gap
    return out
