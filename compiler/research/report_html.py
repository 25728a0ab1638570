"""The `vitc analyze` page: one self-contained HTML file, charts as inline SVG, images as inline PNG (Pillow).

No external CSS, JavaScript, fonts or images: the page opens offline and can be mailed as one file.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Sequence

import numpy as np

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
.grid{display:flex;flex-wrap:wrap;gap:10px 18px;align-items:flex-start}.note{color:#666;font-size:12.5px}
details{margin:6px 0}summary{cursor:pointer;font-weight:600}figure{margin:0}figcaption{font-size:12px;color:#444}
.maps td,.maps th{text-align:center;vertical-align:top}.maps img{image-rendering:auto;display:block;margin:auto}
.bad{color:#b2182b;font-weight:600}code{font-size:12.5px;background:#f4f4f4;padding:0 3px}
svg text{font-family:system-ui,-apple-system,'Segoe UI',Roboto,sans-serif}
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


# -- SVG charts -------------------------------------------------------------------------------------------------------
def _nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.ceil(lo / step) * step
    return [start + i * step for i in range(int((hi - start) / step + 1e-9) + 1)]


def _tick_label(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 1e4 or abs(v) < 1e-2:
        return f"{v:.0e}"
    return f"{v:g}"


def line_chart(series: Sequence[dict], *, title: str, xlabel: str = "", ylabel: str = "", log_y: bool = False,
               width: int = 380, height: int = 230, step: bool = False, markers: bool | None = None,
               x_integer: bool = False, legend: bool = True) -> str:
    """Series: dicts with ``label``, ``x``, ``y``, ``color`` and optional ``dash``. ``step``: a histogram outline
    (x are bin edges, one more than y). Non-positive values are left out of a log axis."""
    ml, mr, mt, mb = 58, 12, 22, 34
    shown = [s for s in series if len(s["y"])]
    lh = 15
    leg_h = (lh * len(shown) + 4) if legend and shown else 0
    ph, pw = height - mt - mb, width - ml - mr
    xs = [float(x) for s in shown for x in s["x"]]
    ys = []
    for s in shown:
        for y in s["y"]:
            if y is None or not math.isfinite(y) or (log_y and y <= 0):
                continue
            ys.append(math.log10(y) if log_y else float(y))
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height + leg_h}" '
           f'viewBox="0 0 {width} {height + leg_h}" role="img"><title>{esc(title)}</title>',
           f'<text x="{ml}" y="14" font-size="12.5" font-weight="600">{esc(title)}</text>']
    if not xs or not ys:
        out.append(f'<text x="{ml + 10}" y="{mt + ph / 2}" font-size="12" fill="{GREY}">no data</text></svg>')
        return "".join(out)
    x0, x1 = min(xs), max(xs)
    if x1 == x0:
        x0, x1 = x0 - 0.5, x1 + 0.5
    y0, y1 = min(ys), max(ys)
    if log_y:
        y0, y1 = math.floor(y0), math.ceil(y1)
        if y1 == y0:
            y1 = y0 + 1
    else:
        y0, y1 = min(y0, 0.0) if step else y0, y1
        if y1 == y0:
            y0, y1 = y0 - 1, y1 + 1
        pad = 0.04 * (y1 - y0)
        y0, y1 = (y0 if step else y0 - pad), y1 + pad

    def px(x):
        return ml + (float(x) - x0) / (x1 - x0) * pw

    def py(y):
        v = math.log10(y) if log_y else float(y)
        return mt + ph - (v - y0) / (y1 - y0) * ph

    out.append(f'<rect x="{ml}" y="{mt}" width="{pw}" height="{ph}" fill="#fff" stroke="#ccc"/>')
    # y grid + labels
    if log_y:
        span = int(y1 - y0)
        every = max(1, math.ceil(span / 6))
        yt = [10.0 ** e for e in range(int(y0), int(y1) + 1, every)]
    else:
        yt = _nice_ticks(y0, y1)
    for t in yt:
        y = py(t)
        if mt - 0.5 <= y <= mt + ph + 0.5:
            out.append(f'<line x1="{ml}" x2="{ml + pw}" y1="{y:.1f}" y2="{y:.1f}" stroke="#eee"/>'
                       f'<text x="{ml - 4}" y="{y + 4:.1f}" font-size="10.5" text-anchor="end">'
                       f'{esc(_tick_label(t))}</text>')
    if not log_y and y0 < 0 < y1:
        out.append(f'<line x1="{ml}" x2="{ml + pw}" y1="{py(0):.1f}" y2="{py(0):.1f}" stroke="#999"/>')
    xt = (list(range(math.ceil(x0), math.floor(x1) + 1)) if x_integer and x1 - x0 <= 24 else _nice_ticks(x0, x1, 6))
    for t in xt:
        x = px(t)
        if ml - 0.5 <= x <= ml + pw + 0.5:
            out.append(f'<text x="{x:.1f}" y="{mt + ph + 14}" font-size="10.5" text-anchor="middle">'
                       f'{esc(_tick_label(t) if not x_integer else int(t))}</text>')
    if xlabel:
        out.append(f'<text x="{ml + pw / 2}" y="{height - 4}" font-size="11" text-anchor="middle" '
                   f'fill="#444">{esc(xlabel)}</text>')
    if ylabel:
        out.append(f'<text x="12" y="{mt + ph / 2}" font-size="11" text-anchor="middle" fill="#444" '
                   f'transform="rotate(-90 12 {mt + ph / 2})">{esc(ylabel)}</text>')
    for s in shown:
        dash = ' stroke-dasharray="5 3"' if s.get("dash") else ""
        pts = []
        if step:
            edges, counts = list(s["x"]), list(s["y"])
            base = py(y0) if not log_y else mt + ph
            pts.append(f"{px(edges[0]):.1f},{base:.1f}")
            for i, c in enumerate(counts):
                yy = py(c) if (not log_y or c > 0) else mt + ph
                pts.append(f"{px(edges[i]):.1f},{yy:.1f} {px(edges[i + 1]):.1f},{yy:.1f}")
            pts.append(f"{px(edges[-1]):.1f},{base:.1f}")
            out.append(f'<polyline fill="none" stroke="{s["color"]}" stroke-width="1.4"{dash} '
                       f'points="{" ".join(pts)}"/>')
            continue
        seg: list[str] = []
        segs = [seg]
        for x, y in zip(s["x"], s["y"]):
            if y is None or not math.isfinite(y) or (log_y and y <= 0):
                seg = []
                segs.append(seg)
                continue
            seg.append(f"{px(x):.1f},{py(y):.1f}")
        for sg in segs:
            if len(sg) > 1:
                out.append(f'<polyline fill="none" stroke="{s["color"]}" stroke-width="1.5"{dash} '
                           f'points="{" ".join(sg)}"/>')
        if markers if markers is not None else len(s["x"]) <= 30:
            for x, y in zip(s["x"], s["y"]):
                if y is not None and math.isfinite(y) and not (log_y and y <= 0):
                    out.append(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="2.4" fill="{s["color"]}"/>')
    if legend:
        for i, s in enumerate(shown):
            y = height + 4 + i * lh
            dash = ' stroke-dasharray="5 3"' if s.get("dash") else ""
            out.append(f'<line x1="{ml}" x2="{ml + 22}" y1="{y + 5}" y2="{y + 5}" stroke="{s["color"]}" '
                       f'stroke-width="2"{dash}/><text x="{ml + 28}" y="{y + 9}" font-size="11">'
                       f'{esc(s["label"])}</text>')
    out.append("</svg>")
    return "".join(out)


def legend(series: Sequence[dict], width: int = 760) -> str:
    """A one-row legend for a group of charts drawn without their own."""
    x, items = 4, []
    for s in series:
        dash = ' stroke-dasharray="5 3"' if s.get("dash") else ""
        items.append(f'<line x1="{x}" x2="{x + 22}" y1="10" y2="10" stroke="{s["color"]}" stroke-width="2"{dash}/>'
                     f'<text x="{x + 27}" y="14" font-size="11.5">{esc(s["label"])}</text>')
        x += 40 + 6.5 * len(str(s["label"]))
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{int(max(x, 10))}" height="20" role="img">'
            f'<title>legend</title>{"".join(items)}</svg>')


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


def _roles_sorted(roles) -> list[str]:
    return sorted(roles, key=lambda r: (ROLE_ORDER.index(r) if r in ROLE_ORDER else 99, r))


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
    charts = []
    for role in _roles_sorted(r["by_block"]):
        data = r["by_block"][role]
        series = []
        for key, name, color, dash in _series_styles(has_cls):
            if key not in data:
                continue
            blocks = sorted(data[key], key=int)
            series.append({"label": name, "color": color, "dash": dash, "x": [int(b) for b in blocks],
                           "y": [float(np.mean([e[metric] for e in data[key][b]])) for b in blocks]})
        charts.append(line_chart(series, title=f"{role}: {label}", xlabel="block", log_y=metric != "sqnr_db",
                                 x_integer=True, legend=False))
    styles = [{"label": name, "color": color, "dash": dash} for _, name, color, dash in _series_styles(has_cls)]
    return legend(styles) + '<div class="grid">' + "".join(charts) + "</div>"


def _range_summary(r: dict) -> str:
    ops = {o["node"]: o for o in r["operators"]}
    per_group: dict[str, dict[str, dict[int, float]]] = {}
    for t, v in r["input_ranges"].items():
        cons = [ops[c] for c in v.get("consumers", []) if c in ops]
        if not cons or cons[0]["block"] is None:
            continue
        role = "/".join(sorted({c["role"] for c in cons}, key=lambda x: ROLE_ORDER.index(x) if x in ROLE_ORDER else 99))
        for g in ("all", "no_cls", "cls"):
            if g in v:
                per_group.setdefault(g, {}).setdefault(role, {})[cons[0]["block"]] = v[g]["max_channel_range"]
    names = {"all": "all tokens", "no_cls": "without the class token", "cls": "class token only"}
    charts = []
    for g in ("all", "no_cls", "cls"):
        if g not in per_group:
            continue
        series = []
        for i, (role, d) in enumerate(sorted(per_group[g].items(), key=lambda kv: ROLE_ORDER.index(kv[0].split("/")[0])
                                                 if kv[0].split("/")[0] in ROLE_ORDER else 99)):
            blocks = sorted(d)
            color = ROLE_COLORS.get(role.split("/")[0], [RED, BLUE, GREEN, ORANGE, PURPLE][i % 5])
            series.append({"label": f"input of {role}", "color": color, "x": blocks, "y": [d[b] for b in blocks]})
        charts.append(line_chart(series, title=f"max channel range, {names[g]}", xlabel="block",
                                 ylabel="max over channels of (max - min)", x_integer=True, width=400, height=250))
    return '<div class="grid">' + "".join(charts) + "</div>"


def _range_panels(r: dict) -> str:
    ops = {o["node"]: o for o in r["operators"]}
    by_block: dict = {}
    for t, v in r["input_ranges"].items():
        cons = [ops[c] for c in v.get("consumers", []) if c in ops]
        if not cons:
            continue
        by_block.setdefault(cons[0]["block"], []).append((t, v, cons))
    names = {"all": "all tokens", "no_cls": "without class token", "cls": "class token only",
             "calibration": "calibration (all tokens)"}
    out = []
    for block in sorted(by_block, key=lambda b: (b is None, b if b is not None else 0)):
        parts = []
        for t, v, cons in by_block[block]:
            panels = []
            for g in ("all", "no_cls", "cls"):
                if g not in v:
                    continue
                xa, mx = envelope(v[g]["max"], 260, "max")
                xb, mn = envelope(v[g]["min"], 260, "min")
                panels.append(line_chart([{"label": "max", "x": xa, "y": mx, "color": RED},
                                          {"label": "min", "x": xb, "y": mn, "color": BLUE}],
                                         title=names[g], xlabel="channel", width=330, height=190,
                                         markers=False, legend=False))
            who = ", ".join(_label(c) for c in cons)
            parts.append(f'<h3>input of {esc(who)} <span class="note">({esc(t)}; max channel range '
                         f'{fmt(v["all"]["max_channel_range"])}; red: max, blue: min per channel)</span></h3>'
                         f'<div class="grid">{"".join(panels)}</div>')
        title = "before the blocks / after them" if block is None else f"block {block}"
        out.append(f"<details><summary>{esc(title)}</summary>{''.join(parts)}</details>")
    return "".join(out)


def _histograms(r: dict) -> str:
    has_cls = r["tokens"]["class_token"]
    out = []
    for h in r["histograms"]:
        edges = h["log10_bin_edges"]
        charts = []
        for g in (["cls", "patch"] if has_cls else ["all"]):
            series = []
            for mode, name, color in (("per_tensor", "per-tensor", RED), ("per_channel", "per-channel", BLUE)):
                s = h["series"].get(f"{mode}/{g}")
                if s is not None:
                    series.append({"label": name, "x": edges, "y": s["counts"], "color": color})
            gname = {"cls": "class token", "patch": "patch tokens", "all": "all tokens"}[g]
            charts.append(line_chart(series, title=f"{_label(h)}: {gname}", xlabel="log10 relative error per "
                                     "output channel", ylabel="channels", step=True, width=380, height=220,
                                     legend=False))
        out.append(f'<div class="grid">{"".join(charts)}</div>')
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
        _range_summary(r), _range_panels(r),
        "<h2>Per-channel error of the worst operators</h2>",
        '<p class="note">Histogram over output channels of the relative error (mean over the tokens of the group), '
        'log10 bins.</p>', legend([{"label": "per-tensor activations", "color": RED},
                                   {"label": "per-channel activations", "color": BLUE}]), _histograms(r),
        "<h2>Attention maps</h2>", _maps(r, images),
        "<h2>How this was measured</h2>", f"<ul>{method}</ul>",
        f'<p class="note">Every number behind these figures is in analysis.json. Seconds: '
        f'{esc(", ".join(f"{k} {v}" for k, v in r.get("seconds", {}).items()))}.</p>',
        "</body></html>",
    ]
    return "\n".join(parts)
