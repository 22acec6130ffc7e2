"""Draw an attention alignment heatmap (source tokens on x, target tokens on y) into an image file.

Used by `attnserve translate --plot` and offline; needs matplotlib (the `plot` extra, which the serving images
leave out). Uses matplotlib's non-interactive Agg canvas, so it works without a display. Tokens in scripts the
default font lacks (CJK, ...) are drawn with an installed font that has them when there is one; otherwise they
show as boxes, without warnings.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from functools import cache
from pathlib import Path

import numpy as np

# Families tried after the default for glyphs it lacks (matplotlib >= 3.6 falls back per glyph).
_FALLBACK_FAMILIES = (
    "Noto Sans CJK JP",
    "Noto Sans CJK SC",
    "Noto Sans CJK TC",
    "Noto Sans CJK KR",
    "Source Han Sans",
    "WenQuanYi Zen Hei",
    "WenQuanYi Micro Hei",
    "Droid Sans Fallback",
    "AR PL UMing CN",
    "IPAGothic",
    "TakaoGothic",
    "Noto Sans",
    "Noto Sans Arabic",
    "Noto Sans Devanagari",
)


@cache
def _font_families() -> list[str]:
    """DejaVu Sans first, then every installed fallback family (asking only for installed ones avoids
    matplotlib's 'font family not found' messages)."""
    from matplotlib import font_manager

    installed = {font.name for font in font_manager.fontManager.ttflist}
    return ["DejaVu Sans", *(family for family in _FALLBACK_FAMILIES if family in installed)]


def _display(token: str) -> str:
    # Sentencepiece marks word starts with U+2581; show spaces so labels read naturally, and make
    # whitespace-only pieces visible.
    token = token.replace("\u2581", " ")
    return token if token.strip() else repr(token)


def plot_alignment(
    source_tokens: Sequence[str],
    target_tokens: Sequence[str],
    matrix: np.ndarray | Sequence[Sequence[float]],
    path: Path | str,
    title: str | None = None,
) -> Path:
    """Write a heatmap of `matrix` ([len(target_tokens), len(source_tokens)] attention weights in 0..1)
    to `path`; the format follows the suffix (.png, .svg, .pdf). Returns the path written.

    Raises ValueError when the matrix shape does not match the token counts.
    """
    weights = np.asarray(matrix, dtype=np.float64)
    if weights.ndim != 2 or weights.shape != (len(target_tokens), len(source_tokens)):
        raise ValueError(
            f"attention matrix has shape {weights.shape}, expected "
            f"({len(target_tokens)}, {len(source_tokens)}) = (target tokens, source tokens)"
        )
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure  # a Figure without pyplot keeps no global state

    path = Path(path)
    cell = 0.38
    width = min(4.0 + cell * len(source_tokens), 40.0)
    height = min(2.5 + cell * len(target_tokens), 40.0)
    with warnings.catch_warnings(), matplotlib.rc_context({"font.family": _font_families()}):
        # A glyph no installed font has is drawn as a box; the warning about it is noise here.
        warnings.filterwarnings("ignore", message=r".*[Gg]lyph .* missing from.*")
        warnings.filterwarnings("ignore", message=r".*Matplotlib currently does not support.*")
        figure = Figure(figsize=(width, height), layout="constrained")
        axes = figure.add_subplot()
        image = axes.imshow(weights, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto", interpolation="nearest")
        source_labels = [_display(token) for token in source_tokens]
        # Upright labels read best for characters; longer pieces need the room of a vertical label.
        rotation = 90 if max((len(label) for label in source_labels), default=0) > 3 else 0
        axes.set_xticks(range(len(source_tokens)), source_labels, rotation=rotation)
        axes.set_yticks(range(len(target_tokens)), [_display(token) for token in target_tokens])
        axes.set_xlabel("source tokens")
        axes.set_ylabel("generated tokens")
        if title:
            axes.set_title(title)
        figure.colorbar(image, ax=axes, label="attention weight")
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, dpi=110)
    return path
