"""Plots: matplotlib on its file-only backend, figures written atomically."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from renorm.errors import RenormError
from renorm.files import write_atomic


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend, or a RenormError naming the extra to install."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RenormError("plots need matplotlib: pip install 'renorm[plot]'") from None
    return plt


def save_figure(fig: Any, path: str | Path) -> None:
    """Write a matplotlib figure as PNG, atomically, and close it."""
    plt = pyplot()
    path = Path(path)
    fig.tight_layout()
    try:
        write_atomic(path, lambda handle: fig.savefig(handle, format="png", dpi=120))
    finally:
        plt.close(fig)
