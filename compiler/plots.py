"""Charts with matplotlib, the optional ``vitc[plots]`` extra.

Figures are :class:`matplotlib.figure.Figure` objects drawn without pyplot (no interactive backend, no global
figure list) and rendered to SVG text or PNG bytes in memory. The SVG ids are salted with a fixed string and the
metadata carries no date, so the same data gives the same bytes.
"""

from __future__ import annotations

import io
import re
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from vitc.compiler.errors import VitcError

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

INSTALL = "pip install 'vitc[plots]'"
MISSING_NOTE = "install vitc[plots] for charts"
PX = 1 / 96  # inches per CSS pixel: figure sizes are given in the pixels the page shows
STYLE = {
    "svg.hashsalt": "vitc",
    "svg.fonttype": "none",  # SVG text stays text: small and selectable
    "font.sans-serif": ["DejaVu Sans"],  # the font matplotlib ships and measures with; the browser's sans-serif else
    "font.size": 8.5,
    "axes.titlesize": 9.5,
    "axes.titleweight": "bold",
    "axes.titlelocation": "left",
    "axes.labelsize": 8.5,
    "axes.labelcolor": "#444444",
    "axes.edgecolor": "#bbbbbb",
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "axes.axisbelow": True,
    "grid.color": "#eeeeee",
    "legend.frameon": False,
    "legend.fontsize": 8.5,
    "lines.linewidth": 1.5,
    "lines.markersize": 3.5,
}
_SVG_METADATA = {"Date": None, "Creator": None, "Format": None, "Type": None}
_PNG_METADATA = {"Software": None}
_SVG_GROUP_ID = re.compile(r' id="[a-z][\w.]*_\d+"')  # "axes_1", "line2d_3": group names nothing refers to

Draw = Callable[["Figure"], None]


def available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def require(what: str) -> None:
    """Fail with one line naming the extra when matplotlib is not installed."""
    if not available():
        raise VitcError(f"{what} needs matplotlib, which is not installed", hint=INSTALL)


def render(draw: Draw, width_px: float, height_px: float, fmt: str, dpi: float = 96) -> bytes:
    """``draw`` fills a figure of ``width_px`` x ``height_px`` (constrained layout); the figure as ``fmt`` bytes."""
    import matplotlib
    from matplotlib.figure import Figure

    with matplotlib.rc_context(STYLE):
        fig = Figure(figsize=(width_px * PX, height_px * PX), dpi=dpi, layout="constrained")
        draw(fig)
        buf = io.BytesIO()
        fig.savefig(buf, format=fmt, dpi=dpi, metadata=_SVG_METADATA if fmt == "svg" else _PNG_METADATA)
    return buf.getvalue()


def svg(draw: Draw, width_px: float, height_px: float) -> str:
    """The figure as an ``<svg>`` element to inline in HTML: no XML declaration or doctype, no indentation, and
    without matplotlib's group ids, which repeat from one figure to the next."""
    text = render(draw, width_px, height_px, "svg").decode("utf-8")
    text = re.sub(r">\s+<", "><", re.sub(r"\s*\n\s*", " ", text[text.index("<svg"):]))
    return _SVG_GROUP_ID.sub("", text).strip()


def hbars(ax: Axes, labels: Sequence[str], values: Sequence[float], colors: Sequence[str], notes: Sequence[str],
          whiskers: Sequence[tuple[float, float]] = ()) -> None:
    """Horizontal bars, the first on top, each labelled on the left and with its note after the bar (after its
    whisker when ``whiskers`` gives one per bar)."""
    ends = [max(v, 0.0) for v in values]
    ax.barh(range(len(values)), ends, color=colors, height=0.72)
    for y, (lo, hi) in enumerate(whiskers):
        ax.plot([lo, hi], [y, y], color="black", marker="|", markersize=9, linewidth=1.4)
        ends[y] = max(ends[y], hi)
    for y, (x, note) in enumerate(zip(ends, notes)):
        ax.annotate(note, (x, y), xytext=(5, 0), textcoords="offset points", va="center")
    ax.set_yticks(range(len(values)), labels)
    ax.set_ylim(len(values) - 0.5, -0.5)
    ax.set_xlim(0, max(ends + [1e-9]) * 1.25)
    ax.grid(axis="y", visible=False)
