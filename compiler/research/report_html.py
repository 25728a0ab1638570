"""The `vitc analyze` page: one self-contained HTML file, charts as inline SVG (matplotlib, the optional
``vitc[plots]`` extra), attention maps as inline PNG (Pillow).

No external CSS, JavaScript, fonts or images: the page opens offline and can be mailed as one file. Without
matplotlib the page keeps its tables and maps, and each chart is one line saying how to get it.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from vitc.compiler import plots

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

RED, BLUE, GREEN, ORANGE, PURPLE, GREY = "#c0392b", "#2166ac", "#1b7837", "#e08214", "#762a83", "#777777"
ROLE_COLORS = {"qkv": RED, "q": RED, "k": ORANGE, "v": PURPLE, "proj": GREEN, "fc1": BLUE, "fc2": "#111111",
               "attn_qk": "#8c510a", "attn_av": "#01665e"}
ROLE_ORDER = ("qkv", "q", "k", "v", "attn_qk", "attn_av", "proj", "fc1", "fc2", "linear", "matmul", "conv", "head")

CSS = """
body{font:14px/1.45 system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;margin:24px auto;max-width:1280px;
color:#222;padding:0 16px}
h1{font-size:22px;margin-bottom:4px}h2{font-size:18px;margin-top:36px;border-bottom:1px solid #ddd;padding-bottom:4px}
h3{font-size:15px;margin:18px 0 6px}p.meta{color:#555;margin-top:0}
table{border-collapse:collapse;font-size:12.5px}th,td{padding:3px 8px;border-bottom:1px solid #eee;text-align:right}
th{background:#f6f6f6;position:sticky;top:0}td.l,th.l{text-align:left}td.name{max-width:420px;overflow-wrap:anywhere}
.note{color:#666;font-size:12.5px}
details{margin:6px 0}summary{cursor:pointer;font-weight:600}figure{margin:0}figcaption{font-size:12px;color:#444}
.maps td,.maps th{text-align:center;vertical-align:top}.maps img{image-rendering:auto;display:block;margin:auto}
.bad{color:#b2182b;font-weight:600}code{font-size:12.5px;background:#f4f4f4;padding:0 3px}
.chart{margin:4px 0 10px}.chart svg{max-width:100%;height:auto}
"""


def esc(s) -> str:
    return html.escape(str(s), quote=True)


def fmt(v, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if not math.isfinite(v):
            return "-"
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5):
            return f"{v:.{digits - 1}e}"
        return f"{v:.{digits}g}" if abs(v) < 100 else f"{v:.1f}"
    return esc(v)


# -- charts (matplotlib, the optional vitc[plots] extra) --------------------------------------------------------------
def _plot(ax: Axes, series: Sequence[dict], *, title: str, xlabel: str = "", ylabel: str = "", log_y: bool = False,
          step: bool = False, markers: bool | None = None, x_integer: bool = False) -> None:
    """Series: dicts with ``label``, ``x``, ``y``, ``color`` and optional ``dash``. ``step``: a histogram outline
    (x are bin edges, one more than y). Missing and non-finite values, and non-positive ones on a log axis, are
    gaps."""
    from matplotlib.ticker import MaxNLocator

    drawn = []
    for s in series:
        y = np.array([np.nan if v is None else v for v in s["y"]], np.float64)
        if log_y:
            y[y <= 0] = np.nan
        if not np.isfinite(y).any():
            continue
        style = {"color": s["color"], "linestyle": "--" if s.get("dash") else "-", "label": s["label"]}
        if step:
            ax.stairs(y, s["x"], linewidth=1.3, **style)
        else:
            ax.plot(s["x"], y, marker="o" if (markers if markers is not None else len(y) <= 30) else None, **style)
        drawn.append(y[np.isfinite(y)])
    if not drawn:
        ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center", color=GREY)
    elif not log_y and min(d.min() for d in drawn) < 0 < max(d.max() for d in drawn):
        ax.axhline(0, color="#999999", linewidth=0.8)
    elif log_y:
        _log_decades(ax, min(d.min() for d in drawn), max(d.max() for d in drawn))
    if x_integer:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if step:  # counts
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)


def _log_decades(ax: Axes, lo: float, hi: float) -> None:
    """A log y axis over the whole decades around ``lo``..``hi`` (both positive), labelled as plain numbers."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    e0, e1 = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
    ax.set_yscale("log")
    ax.set_ylim(10.0 ** e0, 10.0 ** max(e1, e0 + 1))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())


# figure legend position -> (matplotlib loc, extra width px, extra height px)
LEGENDS = {"top": ("outside upper left", 0, 26), "right": ("outside right upper", 150, 0)}


def _panel_chart(panels: Sequence[tuple[Sequence[dict], dict]], *, ncols: int, cell: tuple[int, int],
                 legend: str | None = None) -> str:
    """One figure, one axes per panel (its series and :func:`_plot` keywords) in rows of ``ncols``, each axes
    ``cell`` pixels, as inline SVG; ``legend`` ("top", "right"): one legend for the figure, each label once.
    Without matplotlib: a one-line note in the figure's place."""
    if not panels:
        return ""
    if not plots.available():
        return f'<p class="note chart">{esc(plots.MISSING_NOTE)}</p>'
    cols, rows = min(len(panels), ncols), math.ceil(len(panels) / ncols)
    loc, extra_w, extra_h = LEGENDS[legend] if legend else ("", 0, 0)

    def draw(fig: Figure) -> None:
        axes = fig.subplots(rows, cols, squeeze=False).ravel()
        for ax in axes[len(panels):]:
            ax.set_visible(False)
        handles: dict[str, object] = {}
        for ax, (series, kw) in zip(axes, panels):
            _plot(ax, series, **kw)
            for h, lab in zip(*ax.get_legend_handles_labels()):
                handles.setdefault(lab, h)
        if loc and handles:
            fig.legend(list(handles.values()), list(handles), loc=loc, ncols=len(handles) if legend == "top" else 1)

    return f'<div class="chart">{plots.svg(draw, cols * cell[0] + extra_w, rows * cell[1] + extra_h)}</div>'


# -- data reduction and attention-map images (Pillow) ------------------------------------------------------------------
def envelope(y: Sequence[float], buckets: int, how: str) -> tuple[list[float], list[float]]:
    """(x, y) with ``y`` reduced to at most ``buckets`` points, each the max (``how="max"``) or min of its run of
    channels, so a long channel axis keeps its extremes in a small SVG."""
    a = np.asarray(y, np.float64)
    if len(a) <= buckets:
        return list(range(len(a))), a.tolist()
    edges = np.linspace(0, len(a), buckets + 1).round().astype(int)
    red = np.maximum.reduceat if how == "max" else np.minimum.reduceat
    vals = red(a, edges[:-1])
    xs = ((edges[:-1] + edges[1:] - 1) / 2).tolist()
    return xs, vals.tolist()


def png_data_uri(rgb: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.asarray(rgb, np.uint8)).save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


# inferno-like colormap anchors
_CMAP = np.array([(0, 0, 4), (40, 11, 84), (101, 21, 110), (159, 42, 99), (212, 72, 66), (245, 125, 21),
                  (250, 193, 39), (252, 255, 164)], np.float64)


def colormap(v: np.ndarray) -> np.ndarray:
    """Values in [0, 1] -> RGB uint8."""
    pos = np.clip(v, 0, 1) * (len(_CMAP) - 1)
    grid = np.arange(len(_CMAP))
    return np.stack([np.interp(pos, grid, _CMAP[:, c]) for c in range(3)], axis=-1).round().astype(np.uint8)


def overlay(image: np.ndarray, heat: np.ndarray, alpha: float = 0.6, min_size: int = 176) -> np.ndarray:
    """The attention grid, min-max normalized, bilinearly upsampled and blended over the image (HWC uint8)."""
    from PIL import Image

    h, w = image.shape[:2]
    hm = np.asarray(heat, np.float64)
    lo, hi = np.percentile(hm, 1), np.percentile(hm, 99)  # one artefact patch must not wash out the rest
    hm = np.clip((hm - lo) / max(float(hi - lo), 1e-12), 0, 1)
    up = Image.fromarray((hm * 255).round().astype(np.uint8)).resize((w, h), Image.BILINEAR)
    col = colormap(np.asarray(up, np.float64) / 255.0)
    out = (image.astype(np.float64) * (1 - alpha) + col * alpha).round().astype(np.uint8)
    if min(h, w) < min_size:
        k = math.ceil(min_size / min(h, w))
        out = np.asarray(Image.fromarray(out).resize((w * k, h * k), Image.NEAREST))
    return out


def _upscale(image: np.ndarray, min_size: int = 176) -> np.ndarray:
    from PIL import Image

    h, w = image.shape[:2]
    if min(h, w) >= min_size:
        return image
    k = math.ceil(min_size / min(h, w))
    return np.asarray(Image.fromarray(image).resize((w * k, h * k), Image.NEAREST))


# -- the page ---------------------------------------------------------------------------------------------------------
def _label(o: dict) -> str:
    return f"{o['role']} b{o['block']}" if o.get("block") is not None else str(o["role"])


def _role_key(role: str) -> tuple[int, str]:
    return ROLE_ORDER.index(role) if role in ROLE_ORDER else 99, role


def _roles_sorted(roles) -> list[str]:
    return sorted(roles, key=_role_key)


def _series_styles(has_cls: bool) -> list[tuple[str, str, str, bool]]:
    """(key mode/group, legend label, color, dashed)."""
    if has_cls:
        return [("per_tensor/cls", "per-tensor, class token", RED, False),
                ("per_tensor/patch", "per-tensor, patch tokens", RED, True),
                ("per_channel/cls", "per-channel, class token", BLUE, False),
                ("per_channel/patch", "per-channel, patch tokens", BLUE, True)]
    return [("per_tensor/all", "per-tensor, all tokens", RED, False),
            ("per_channel/all", "per-channel, all tokens", BLUE, False)]


def _summary(r: dict) -> str:
    items = []
    ops = r["operators"]
    rated = [o for o in ops if o["errors"]["per_tensor"] is not None]
    worst = sorted(rated, key=lambda o: o["errors"]["per_tensor"]["all"]["sqnr_db"])

    def sq(o, mode="per_tensor", g="all"):
        e = o["errors"][mode]
        return None if e is None or g not in e else e[g]["sqnr_db"]

    if worst:
        w = worst[0]
        s = (f"Worst operator quantized alone (per-tensor activations): <b>{esc(_label(w))}</b> "
             f"(<code>{esc(w['node'])}</code>), output SQNR {fmt(sq(w))} dB"
             + ("" if w["quantized_in_build"] else ", kept float by the policy") + ".")
        wb = next((o for o in worst if o["quantized_in_build"]), None)
        if wb is not None and wb is not w:
            s += (f" Worst among those the build quantizes: <b>{esc(_label(wb))}</b>, {fmt(sq(wb))} dB.")
        items.append(s)
    pc = [o for o in rated if o["errors"]["per_channel"] is not None]
    if pc:
        gains = [sq(o, "per_channel") - sq(o) for o in pc]
        lost = [o for o, g in zip(pc, gains) if g < 0]
        clip_t = [np.mean(list(o["clipped_input_fraction"].get("per_tensor", {}).values()) or [0]) for o in pc]
        clip_c = [np.mean(list(o["clipped_input_fraction"].get("per_channel", {}).values()) or [0]) for o in pc]
        s = (f"Per-channel activations change the output SQNR by {fmt(float(np.median(gains)))} dB on the median "
             f"linear ({fmt(float(min(gains)))} to {fmt(float(max(gains)))} dB over {len(pc)}).")
        if lost:
            s += (f" They lose on {len(lost)} ({', '.join(esc(_label(o)) for o in lost[:8])}"
                  f"{', ...' if len(lost) > 8 else ''}): each channel's calibrated range is narrower than the "
                  f"held-out data, {100 * float(np.median(clip_c)):.3f}% of the input values saturate (median) "
                  f"against {100 * float(np.median(clip_t)):.4f}% per-tensor.")
        items.append(s)
    if r["tokens"]["class_token"]:
        pairs = [(o, sq(o, g="cls"), sq(o, g="patch")) for o in rated if o["op"] != "Conv"]
        pairs = [(o, c, p) for o, c, p in pairs if c is not None and p is not None]
        if pairs:
            gaps = [p - c for _, c, p in pairs]
            big = max(pairs, key=lambda t: t[2] - t[1])
            items.append(f"Class token vs patch tokens (per-tensor): the class token's output SQNR is lower on "
                         f"{sum(g > 0 for g in gaps)} of {len(gaps)} operators, median gap "
                         f"{fmt(float(np.median(gaps)))} dB; largest at <b>{esc(_label(big[0]))}</b>: class token "
                         f"{fmt(big[1])} dB, patch tokens {fmt(big[2])} dB.")
    by_role: dict[str, list[float]] = {}
    for o in rated:
        if o["block"] is not None:
            by_role.setdefault(o["role"], []).append(sq(o))
    if by_role:
        order = sorted(by_role.items(), key=lambda kv: float(np.median(kv[1])))
        items.append("Median per-tensor output SQNR by role (dB, worst first): "
                     + ", ".join(f"{esc(k)} {fmt(float(np.median(v)))}" for k, v in order) + ".")
    rng = r["input_ranges"]
    if rng:
        by_op = {o["node"]: o for o in ops}
        t, v = max(rng.items(), key=lambda kv: kv[1]["all"]["max_channel_range"])
        who = ", ".join(_label(by_op[c]) for c in v.get("consumers", []) if c in by_op)
        per_role: dict[str, list[float]] = {}
        for v2 in rng.values():
            cons = [by_op[c] for c in v2.get("consumers", []) if c in by_op]
            if cons and cons[0]["block"] is not None:
                per_role.setdefault("/".join(sorted({c["role"] for c in cons})), []).append(
                    v2["all"]["max_channel_range"])
        items.append(f"Largest input channel range (max - min of one channel): {fmt(v['all']['max_channel_range'])} "
                     f"at the input of {esc(who)}. Median over blocks of the largest channel range of each input: "
                     + ", ".join(f"{esc(k)} {fmt(float(np.median(x)))}" for k, x in
                                 sorted(per_role.items(), key=lambda kv: -float(np.median(kv[1])))) + ".")
    a = r["attention"]
    if "output_sqnr_db" in a:
        items.append(f"Whole quantized model ({esc(a['quantized_model'])}): output SQNR {fmt(a['output_sqnr_db'])} dB "
                     f"against float on {a['samples_compared']} held-out samples "
                     f"(worst {fmt(a['worst_sample_sqnr_db'])} dB).")
    return "<ul>" + "".join(f"<li>{i}</li>" for i in items) + "</ul>"


def _ranking_table(r: dict) -> str:
    has_cls = r["tokens"]["class_token"]
    groups = ["cls", "patch"] if has_cls else ["all"]
    head = ["#", "operator", "node", "in build", "SQNR dB per-tensor", "per-channel", "gain dB"]
    head += [f"rel. err. {g} per-tensor" for g in groups] + [f"rel. err. {g} per-channel" for g in groups]
    head += ["input max ch. range (all / no CLS)" if has_cls else "input max ch. range"]
    rows = ["<table><tr>" + "".join(f'<th class="{"l" if h in ("operator", "node", "in build") else ""}">'
                                    f"{esc(h)}</th>" for h in head) + "</tr>"]
    for w in r["ranking"]:
        pc = w["sqnr_db_per_channel"]
        gain = None if pc is None else pc - w["sqnr_db_per_tensor"]
        rng = w["input_max_channel_range"]
        keys = ("all", "no_cls") if has_cls else ("all",)
        rng_s = "-" if rng is None else " / ".join(fmt(rng.get(g)) for g in keys)
        ops = {o["node"]: o for o in r["operators"]}
        o = ops[w["node"]]
        build = (o["build_activation"] or "") if o["quantized_in_build"] else "float"
        cells = [str(w["rank"]), esc(_label(w)), f'<span title="{esc(w["node"])}">{esc(w["node"])}</span>', esc(build),
                 fmt(w["sqnr_db_per_tensor"]), fmt(pc), fmt(gain)]
        cells += [fmt(w["rel_per_tensor"].get(g)) for g in groups]
        cells += [fmt((w["rel_per_channel"] or {}).get(g)) for g in groups]
        cells += [rng_s]
        rows.append("<tr>" + "".join(f'<td class="{"l" if i in (1, 3) else "name l" if i == 2 else ""}">{c}</td>'
                                     for i, c in enumerate(cells)) + "</tr>")
    rows.append("</table>")
    return "".join(rows)


def _by_block_charts(r: dict, metric: str, label: str) -> str:
    has_cls = r["tokens"]["class_token"]
    panels = []
    for role in _roles_sorted(r["by_block"]):
        data = r["by_block"][role]
        series = []
        for key, name, color, dash in _series_styles(has_cls):
            if key not in data:
                continue
            blocks = sorted(data[key], key=int)
            series.append({"label": name, "color": color, "dash": dash, "x": [int(b) for b in blocks],
                           "y": [float(np.mean([e[metric] for e in data[key][b]])) for b in blocks]})
        panels.append((series, {"title": f"{role}: {label}", "xlabel": "block", "log_y": metric != "sqnr_db",
                                "x_integer": True}))
    return _panel_chart(panels, ncols=3, cell=(380, 230), legend="top")


def _range_summary(r: dict) -> str:
    ops = {o["node"]: o for o in r["operators"]}
    per_group: dict[str, dict[str, dict[int, float]]] = {}
    for t, v in r["input_ranges"].items():
        cons = [ops[c] for c in v.get("consumers", []) if c in ops]
        if not cons or cons[0]["block"] is None:
            continue
        role = "/".join(_roles_sorted({c["role"] for c in cons}))
        for g in ("all", "no_cls", "cls"):
            if g in v:
                per_group.setdefault(g, {}).setdefault(role, {})[cons[0]["block"]] = v[g]["max_channel_range"]
    names = {"all": "all tokens", "no_cls": "without the class token", "cls": "class token only"}
    panels = []
    for g in (g for g in ("all", "no_cls", "cls") if g in per_group):
        series = []
        for i, role in enumerate(sorted(per_group[g], key=lambda k: _role_key(k.split("/")[0]))):
            d = per_group[g][role]
            color = ROLE_COLORS.get(role.split("/")[0], [RED, BLUE, GREEN, ORANGE, PURPLE][i % 5])
            series.append({"label": f"input of {role}", "color": color, "x": sorted(d), "y": [d[b] for b in sorted(d)]})
        panels.append((series, {"title": f"max channel range, {names[g]}", "xlabel": "block",
                                "ylabel": "max over channels of (max - min)", "x_integer": True}))
    return _panel_chart(panels, ncols=3, cell=(400, 250), legend="top")


def _range_panels(r: dict) -> str:
    ops = {o["node"]: o for o in r["operators"]}
    by_block: dict = {}
    for t, v in r["input_ranges"].items():
        cons = [ops[c] for c in v.get("consumers", []) if c in ops]
        if not cons:
            continue
        by_block.setdefault(cons[0]["block"], []).append((t, v, cons))
    names = {"all": "all tokens", "no_cls": "without class token", "cls": "class token only"}
    out = []
    for block in sorted(by_block, key=lambda b: (b is None, b if b is not None else 0)):
        parts = []
        for t, v, cons in by_block[block]:
            panels = []
            for g in (g for g in ("all", "no_cls", "cls") if g in v):
                xa, mx = envelope(v[g]["max"], 260, "max")
                xb, mn = envelope(v[g]["min"], 260, "min")
                panels.append(([{"label": "max", "x": xa, "y": mx, "color": RED},
                                {"label": "min", "x": xb, "y": mn, "color": BLUE}],
                               {"title": names[g], "xlabel": "channel", "markers": False}))
            who = ", ".join(_label(c) for c in cons)
            parts.append(f'<h3>input of {esc(who)} <span class="note">({esc(t)}; max channel range '
                         f'{fmt(v["all"]["max_channel_range"])}; red: max, blue: min per channel)</span></h3>'
                         + _panel_chart(panels, ncols=3, cell=(330, 190)))
        title = "before the blocks / after them" if block is None else f"block {block}"
        out.append(f"<details><summary>{esc(title)}</summary>{''.join(parts)}</details>")
    return "".join(out)


def _histograms(r: dict) -> str:
    modes = (("per_tensor", "per-tensor activations", RED), ("per_channel", "per-channel activations", BLUE))
    names = {"cls": "class token", "patch": "patch tokens", "all": "all tokens"}
    out = []
    for h in r["histograms"]:
        groups = [g for g in ("cls", "patch") if any(f"{m}/{g}" in h["series"] for m, _, _ in modes)] or ["all"]
        panels = [([{"label": name, "x": h["log10_bin_edges"], "y": h["series"][f"{m}/{g}"]["counts"], "color": color}
                    for m, name, color in modes if f"{m}/{g}" in h["series"]],
                   {"title": f"{_label(h)}: {names[g]}", "xlabel": "log10 relative error per output channel",
                    "ylabel": "channels", "step": True}) for g in groups]
        out.append(_panel_chart(panels, ncols=2, cell=(380, 220), legend="right"))
    return "".join(out)


def _maps(r: dict, images: list[dict]) -> str:
    a = r["attention"]
    if a.get("maps_skipped"):
        return f'<p class="note">Attention maps skipped: {esc(a["maps_skipped"])}.</p>'
    if not images:
        return '<p class="note">No attention maps.</p>'
    by_index = {m["index"]: m for m in a.get("maps", [])}
    head = ["input", "float: last block", "quantized: last block", "float: rollout", "quantized: rollout"]
    rows = ['<table class="maps"><tr>' + "".join(f"<th>{h}</th>" for h in head) + "</tr>"]
    for im in images:
        m = by_index.get(im["index"], {})
        cells = [f'<img alt="input {im["index"]}" src="{png_data_uri(_upscale(im["image"]))}">'
                 f'<figcaption>held-out #{im["index"]}</figcaption>']
        for key, cor in (("float_last", None), ("quant_last", "correlation_last"), ("float_rollout", None),
                         ("quant_rollout", "correlation_rollout")):
            cap = f"correlation with float {m[cor]:.4f}" if cor and m.get(cor) is not None else "&nbsp;"
            cells.append(f'<img alt="{key}" src="{png_data_uri(overlay(im["image"], im[key]))}">'
                         f"<figcaption>{cap}</figcaption>")
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    rows.append("</table>")
    return (f'<p class="note">{esc(a.get("method", ""))}. Each map is scaled on its own between its 1st and 99th '
            f'percentile. Quantized model: {esc(a["quantized_model"])}; its output SQNR against float on the '
            f'held-out samples: {fmt(a.get("output_sqnr_db"))} dB.</p>' + "".join(rows))


def _rotation_table(r: dict) -> str:
    rot = r.get("rotation")
    if rot is None:
        return ""
    p = rot.get("pass") or {}
    if not rot["operators"]:
        why = "; ".join(p.get("notes", [])) or "the rotation pass did not run"
        return f"<h2>Residual-stream rotation</h2><p class=\"note\">Not rotated: {esc(why)}</p>"
    rows = []
    for o in sorted(rot["operators"], key=lambda o: (o["block"] is None, o["block"] or 0, _role_key(o["role"]))):
        b, a = o["before"], o["after"]
        rows.append(f"<tr><td>{esc(o['block'] if o['block'] is not None else '-')}</td><td>{esc(o['role'])}</td>"
                    f"<td>{fmt(b['spread'])}</td><td>{fmt(a['spread'])}</td><td>{fmt(b['max_abs'])}</td>"
                    f"<td>{fmt(a['max_abs'])}</td><td><code>{esc(o['node'])}</code></td></tr>")
    return ("<h2>Residual-stream rotation: input channel ranges before and after</h2>"
            '<p class="note">Per linear input, over the held-out samples: spread = largest channel range (max - min) / '
            "median channel range, and the largest |x|, in the unrotated and the rotated graph. A per-tensor int8 "
            "range spends its levels on the loudest channel, so a lower spread leaves more of them to the rest.</p>"
            "<table><tr><th>block</th><th>role</th><th>spread before</th><th>spread after</th><th>max |x| before</th>"
            "<th>max |x| after</th><th>node</th></tr>" + "".join(rows) + "</table>")


def render_report(r: dict, images: list[dict]) -> str:
    tok = r["tokens"]
    held, cal = r["held_out"], r["calibration"]
    name = r["model"].rsplit("/", 1)[-1]
    n_pc = sum(1 for o in r["operators"] if o["errors"]["per_channel"] is not None)
    meta = (f"model <code>{esc(r['model'])}</code> &middot; target {esc(r['target'])} &middot; policy "
            f"{esc(r['policy']['name'])} &middot; calibration: {esc(cal.get('samples'))} samples, "
            f"{esc(cal.get('kind', cal.get('source')))}, observer {esc(cal.get('observer'))} &middot; held-out: "
            f"{esc(held['samples'])} samples, {esc(held.get('kind', held.get('source')))}")
    tok_s = (f"{esc(tok['tokens'])} tokens per input; " if tok["tokens"] else "") + esc(tok["decision"]) + (
        f"; patch grid {tok['patch_grid'][0]}x{tok['patch_grid'][1]}" if tok["patch_grid"] else "")
    float_nodes = r["policy"]["analysed_float_nodes"]
    kept = f"; kept float by the policy but analysed with its default rule: {len(float_nodes)}" if float_nodes else ""
    m = r["method"]
    method = "".join(f"<li><b>{esc(k.replace('_', ' '))}</b>: {esc(v)}</li>" for k, v in m.items() if k != "eps")
    metric_note = ("Class token: solid; patch tokens: dashed. " if tok["class_token"] else "") + \
        "Red: per-tensor activations; blue: per-channel activations (linears only). Mean over the operators of a " \
        "role in a block."
    parts = [
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">",
        f"<title>vitc analyze: {esc(name)}</title><style>{CSS}</style></head><body>",
        f"<h1>Quantization analysis: {esc(name)}</h1><p class=\"meta\">{meta}</p>",
        f"<p class=\"meta\">Tokens: {tok_s}. {len(r['operators'])} operators analysed ({n_pc} with per-channel "
        f"activations){kept}.</p>",
        "<h2>Summary</h2>", _summary(r),
        f"<h2>Operators that hurt most</h2><p class=\"note\">{esc(m['ranking'])}; each operator quantized alone, "
        f"the rest of the model float. Relative error: {esc(m['relative_error'])}. \"in build\": the policy's "
        f"activation setting, or float.</p>",
        _ranking_table(r),
        "<h2>Error per block and role</h2>", f'<p class="note">{esc(metric_note)}</p>',
        "<h3>Relative error</h3>", _by_block_charts(r, "rel", "relative error"),
        "<h3>MSE</h3>", _by_block_charts(r, "mse", "MSE"),
        "<h3>Output SQNR (dB, higher is better)</h3>", _by_block_charts(r, "sqnr_db", "SQNR dB"),
        "<h2>Channel ranges of the operator inputs</h2>",
        '<p class="note">Per channel of each linear\'s input, over the held-out samples: max - min, the largest '
        'over channels, per block. Below, per input, each channel\'s max (red) and min (blue).</p>',
        _range_summary(r), _range_panels(r), _rotation_table(r),
        "<h2>Per-channel error of the worst operators</h2>",
        '<p class="note">Histogram over output channels of the relative error (mean over the tokens of the group), '
        'log10 bins.</p>', _histograms(r),
        "<h2>Attention maps</h2>", _maps(r, images),
        "<h2>How this was measured</h2>", f"<ul>{method}</ul>",
        f'<p class="note">Every number behind these figures is in analysis.json. Seconds: '
        f'{esc(", ".join(f"{k} {v}" for k, v in r.get("seconds", {}).items()))}.</p>',
        "</body></html>",
    ]
    return "\n".join(parts)
