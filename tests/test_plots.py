"""compiler/plots.py: matplotlib figures rendered in memory, byte for byte reproducible, and one clear error
naming the extra when matplotlib is missing."""

import sys

import pytest

from vitc.compiler import plots
from vitc.compiler.errors import VitcError


def draw(fig) -> None:
    ax = fig.subplots()
    ax.plot([0, 1, 2], [3, 1, 2], label="a")
    ax.set(title="t", xlabel="x")
    fig.legend(loc="outside upper left")


def test_svg_is_inline_ready_and_reproducible():
    a, b = plots.svg(draw, 300, 200), plots.svg(draw, 300, 200)
    assert a == b and a.startswith("<svg") and a.endswith("</svg>") and "<?xml" not in a and "DOCTYPE" not in a
    assert ">t<" in a and ">x<" in a and "<metadata" not in a and "\n" not in a
    png = plots.render(draw, 300, 200, "png")
    assert png[:4] == b"\x89PNG" and png == plots.render(draw, 300, 200, "png")  # conftest: nothing in the cwd


def test_require_without_matplotlib(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    assert not plots.available()
    with pytest.raises(VitcError) as e:
        plots.require("--png")
    assert str(e.value) == "--png needs matplotlib, which is not installed; pip install 'vitc[plots]'"
