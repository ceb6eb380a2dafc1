"""The one matplotlib setup every figure here uses: the file-only Agg backend, saved and closed.

matplotlib is imported on the first figure (about half a second), not when a module is imported.
"""

from __future__ import annotations

from pathlib import Path


def pyplot():
    """matplotlib.pyplot on the Agg backend (PNG files, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path, dpi: int | None = None) -> Path:
    """Lay out, write and close a figure; return its path."""
    path = Path(path)
    fig.tight_layout()
    fig.savefig(path, **({} if dpi is None else {"dpi": dpi}))
    pyplot().close(fig)
    return path
