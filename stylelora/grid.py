"""Labelled image grids (demo before/after, X/Y sweeps)."""

from __future__ import annotations

from PIL import Image, ImageDraw, ImageFont


def image_grid(rows: list[list[Image.Image]], *, row_labels: list[str] | None = None,
               col_labels: list[str] | None = None, pad: int = 4) -> Image.Image:
    """Paste ``rows`` of equally sized images into one picture, with optional row and column labels."""
    font = ImageFont.load_default()
    w, h = rows[0][0].size
    left = (max(_text_width(font, s) for s in row_labels) + 2 * pad) if row_labels else 0
    # a column label longer than its cell ("pastel 0.75" over a 64 px toy image) is wrapped onto more lines,
    # never drawn into the next column's label
    col_lines = [_wrap(font, s, w) for s in col_labels or []]
    line_h = _text_height(font) + 2
    top = (max(len(lines) for lines in col_lines) * line_h + 2 * pad) if col_labels else 0
    ncols = max(len(r) for r in rows)
    grid = Image.new("RGB", (left + ncols * (w + pad) + pad, top + len(rows) * (h + pad) + pad), "white")
    draw = ImageDraw.Draw(grid)
    for j, lines in enumerate(col_lines):
        for k, line in enumerate(lines):
            draw.text((left + pad + j * (w + pad), pad + k * line_h), line, fill="black", font=font)
    for i, row in enumerate(rows):
        y = top + pad + i * (h + pad)
        if row_labels:
            draw.text((pad, y + h // 2 - _text_height(font) // 2), row_labels[i], fill="black", font=font)
        for j, img in enumerate(row):
            grid.paste(img.convert("RGB").resize((w, h)), (left + pad + j * (w + pad), y))
    return grid


def _text_width(font, s: str) -> int:
    box = font.getbbox(s)
    return box[2] - box[0]


def _text_height(font) -> int:
    box = font.getbbox("Ag")
    return box[3] - box[1]


def _wrap(font, text: str, width: int) -> list[str]:
    """``text`` in lines no wider than ``width`` pixels: at spaces, and inside a word only when it alone is wider."""
    lines: list[str] = []
    for word in text.split():
        if lines and _text_width(font, f"{lines[-1]} {word}") <= width:
            lines[-1] += f" {word}"
            continue
        while _text_width(font, word) > width and len(word) > 1:
            cut = max([1] + [i for i in range(2, len(word)) if _text_width(font, word[:i]) <= width])
            lines.append(word[:cut])
            word = word[cut:]
        lines.append(word)
    return lines or [""]
