"""Policy files and presets: parsing, matching (first match wins, default last), every rejection with its line,
resolution into a plan, `vitc explain --policy`, and each preset built end to end on tiny_vit."""

import json
from dataclasses import replace

import onnx
import onnx_graphsurgeon as gs
import pytest
from conftest import photo_sqnr_db, search_alphas_by_role, with_max_alpha

from vitc.compiler.driver.build import BuildConfig, CalibConfig, build
from vitc.compiler.calib.calibration import Observer, ObserverConfig
from vitc.compiler.cli.main import main
from vitc.compiler.errors import PolicyError
from vitc.compiler.driver.loader import load_model
from vitc.compiler.driver.pipeline import PipelineConfig, Target, float_pipeline, run_passes
from vitc.compiler.quant.planner import make_plan, resolve_plan
from vitc.compiler.quant.policy import (Granularity, PolicyDefaults, QuantSpec, Rule, default_policy, load_policy,
                                  parse_policy, preset_names)
from vitc.passes.annotate import annotate
from vitc.tools.tiny_models import TinyConfig, tiny_vit

PRESETS = ["default", "all-per-tensor", "ln-per-channel", "ln-fc2-per-channel", "ln-fc2-b5-6-per-channel",
           "all-per-channel", "trt-int8-mha", "openvino-float-attention", "migration-caps"]
ORT = PolicyDefaults.for_target("ort")


def parse(text: str, defaults: PolicyDefaults = ORT):
    return parse_policy(text, "p.toml", defaults)


def reject(text: str, line: int, *needles: str, defaults: PolicyDefaults = ORT) -> str:
    with pytest.raises(PolicyError) as e:
        parse(text, defaults)
    msg = str(e.value)
    assert msg.startswith(f"p.toml:{line}: "), msg
    for n in needles:
        assert n in msg, (n, msg)
    assert e.value.exit_code == 2
    return msg


@pytest.fixture(scope="module")
def vit(tmp_path_factory):
    p = tmp_path_factory.mktemp("pol") / "vit.onnx"
    onnx.save(tiny_vit(TinyConfig(depth=2, dim=64, heads=2)), p)
    return p


@pytest.fixture(scope="module")
def vit7(tmp_path_factory):
    p = tmp_path_factory.mktemp("pol7") / "vit7.onnx"
    onnx.save(tiny_vit(TinyConfig(depth=7, dim=32, heads=2)), p)
    return p


def _graph(path, target="ort"):
    g = gs.import_onnx(load_model(path).model)
    run_passes(g, float_pipeline(PipelineConfig(Target(target))))
    return g, annotate(g)


# -- parsing and matching -------------------------------------------------------------------------------------------
def test_presets_are_listed_and_load_for_both_targets():
    assert preset_names() == PRESETS
    for name in PRESETS:
        for target in ("ort", "trt"):
            p = load_policy(name, PolicyDefaults.for_target(target))
            assert p.rules[-1].is_default, name
            assert all(not r.is_default for r in p.rules[:-1]), name


def test_first_match_wins_and_keys_left_out_come_from_the_default():
    p = parse('''
name = "mine"
[[rule]]
name = "fc2-b1"
roles = ["fc2"]
blocks = [1, 1]
skip = true

[[rule]]
name = "fc2"
role = "fc2"
activation = "per-channel"

[[rule]]
name = "all"
weight = "per-tensor"
observer = "minmax"
''')
    assert p.name == "mine" and [r.line for r in p.rules] == [3, 9, 14]
    assert p.lookup("x", "fc2", 1).name == "fc2-b1"
    assert p.lookup("x", "fc2", 0).name == "fc2" and p.lookup("x", "fc2", None).name == "fc2"
    assert p.lookup("x", "fc1", 1).name == "all"
    fc2 = p.rules[1].spec
    # the rule sets the activation; weight and observer come from the default rule, symmetric from the target
    assert fc2.activation is Granularity.PER_CHANNEL and fc2.weight is Granularity.PER_TENSOR
    assert fc2.observer == ObserverConfig(Observer.MINMAX) and fc2.symmetric is False and fc2.bits == 8
    assert p.rules[0].spec.skip and not p.rules[2].spec.skip


def test_blocks_globs_groups_and_input_from():
    p = parse('''
[[rule]]
name = "b2-4"
blocks = [2, 4]
skip = true
[[rule]]
name = "b7"
blocks = 7
skip = true
[[rule]]
name = "glob"
node = "*/mlp/fc1/*"
skip = true
[[rule]]
name = "qkv-group"
roles = ["qkv"]
activation = "per-channel"
[[rule]]
name = "after-gelu"
input_from = "gelu"
observer = "entropy"
[[rule]]
name = "after-ln"
input_from = ["layernorm"]
percentile = 99.9
[[rule]]
name = "default"
''')
    look = p.lookup
    assert [look("n", "proj", b).name for b in (1, 2, 4, 5, 7, None)] == \
        ["default", "b2-4", "b2-4", "default", "b7", "default"]
    assert look("/blocks/blocks.3/mlp/fc1/MatMul", "fc1", None).name == "glob"
    assert look("/blocks/blocks.3/mlp/fc2/MatMul", "fc2", None).name == "default"
    # a group name matches its members: qkv covers separate q/k/v projections
    assert {look("n", r, None).name for r in ("q", "k", "v", "qkv")} == {"qkv-group"}
    assert look("n", "fc2", 0, ("gelu",)).name == "after-gelu"
    assert look("n", "fc1", 0, ("norm2",)).name == "after-ln" and look("n", "head", None, ("final_norm",)).name == \
        "after-ln"
    assert look("n", "fc1", 0, ("norm2",)).spec.observer == ObserverConfig(Observer.PERCENTILE, 99.9)
    assert look("n", "fc2", 0, ("gelu",)).spec.observer.kind is Observer.ENTROPY


def test_python_rules_keep_their_api():
    r = Rule("x", QuantSpec(skip=True), roles=frozenset({"qkv"}))
    assert r.matches("n", "k", 3) and r.matches("n", "qkv", None) and not r.matches("n", "fc1", 0)
    assert default_policy().lookup("n", "attn_av", 0).spec.skip


# -- rejections ---------------------------------------------------------------------------------------------------
def test_unknown_role_is_rejected_with_line_and_choices():
    msg = reject('[[rule]]\nname = "a"\nroles = ["fc3"]\n[[rule]]\n', 3, "unknown role 'fc3'", "did you mean 'fc2'",
                 "valid roles: ", "patch_embed", "attn_av", "residual_add")
    assert "qkv" in msg


def test_float_role_in_roles_points_to_input_from():
    reject('[[rule]]\nroles = ["norm1"]\nactivation = "per-channel"\n[[rule]]\n', 2, "float op",
           "input_from = ['norm1']")


def test_unknown_input_role_is_rejected():
    reject('[[rule]]\ninput_from = ["layernrm"]\n[[rule]]\n', 2, "unknown role 'layernrm'", "did you mean 'layernorm'")


def test_unknown_key_is_rejected_with_line_and_choices():
    reject('[[rule]]\nroles = ["fc2"]\n\ngranularity = "per-channel"\n[[rule]]\n', 4, "unknown key 'granularity'",
           "valid keys: name, roles", "activation", "weight")
    reject('[[rule]]\nrole = "fc2"\nweights = "per-tensor"\n[[rule]]\n', 3, "did you mean 'weight'")


def test_unknown_top_level_key_or_table():
    reject('title = "x"\n[[rule]]\n', 1, "unknown top-level key 'title'", "valid keys: name, description, rule")
    reject('[[rule]]\nname = "a"\n\n[default]\nactivation = "per-tensor"\n', 4, "unknown top-level key 'default'")


def test_bad_observer_granularity_and_percentile():
    reject('[[rule]]\n\nobserver = "kl"\n', 3, "unknown observer 'kl'", "percentile, minmax, entropy, mse")
    reject('[[rule]]\nactivation = "channel"\n', 2, "not a granularity", "per-tensor, per-channel")
    reject('[[rule]]\nobserver = "minmax"\npercentile = 99.9\n', 3, "percentile applies to observer = 'percentile'")
    reject('[[rule]]\npercentile = 120\n', 2, "out of range")


def test_bits():
    reject('[[rule]]\nroles = ["fc2"]\nbits = 4\n[[rule]]\n', 3, "bits = 4 is simulation-only", "ort target",
           "--simulate")
    reject('[[rule]]\nbits = 6\n', 2, "trt target", defaults=PolicyDefaults.for_target("trt"))
    reject('[[rule]]\nbits = 7\n', 2, "not supported", "4, 6 (simulation only)",
           defaults=PolicyDefaults.for_target("ort", simulate=True))
    p = parse('[[rule]]\nroles = ["fc2"]\nbits = 4\n[[rule]]\n', PolicyDefaults.for_target("ort", simulate=True))
    assert p.rules[0].spec.bits == 4 and p.rules[1].spec.bits == 8


def test_default_must_be_last_and_present():
    reject('[[rule]]\nroles = ["fc2"]\nskip = true\n\n[[rule]]\nname = "x"\nroles = ["fc1"]\n', 5,
           "the last rule 'x' is not a default", "no roles/blocks/node/input_from")
    reject('[[rule]]\nname = "all"\n[[rule]]\nroles = ["fc1"]\n[[rule]]\n', 1, "matches every node", "move it last")
    reject('name = "empty"\n', 1, "no rules")


def test_other_rejections():
    reject('[[rule]]\nblocks = [6, 5]\n[[rule]]\n', 2, "not a block index or an inclusive range")
    reject('[[rule]]\nblocks = [-1, 2]\n[[rule]]\n', 2, "0-based")
    reject('[[rule]]\nroles = ["fc2"]\nskip = true\nactivation = "per-channel"\n[[rule]]\n', 4,
           "skip = true (keep float) and also sets activation")
    reject('[[rule]]\nrole = "fc2"\nroles = ["fc1"]\n[[rule]]\n', 2, "both 'role' and 'roles'")
    reject('[[rule]]\nsymmetric = "yes"\n', 2, "true or false")


def test_toml_syntax_error_names_line_and_column():
    with pytest.raises(PolicyError, match=r"p\.toml: not valid TOML: .*line 3, column"):
        parse('[[rule]]\nroles = ["fc2"]\nactivation per-channel\n')


def test_load_policy_file_preset_or_neither(tmp_path):
    f = tmp_path / "mine.toml"
    f.write_text('[[rule]]\nroles = ["fc2"]\nskip = true\n[[rule]]\n')
    p = load_policy(f, ORT)
    assert p.name == "mine" and p.source == str(f)
    assert load_policy("ln-per-channel", ORT).source == "preset ln-per-channel"
    with pytest.raises(PolicyError, match="did you mean 'ln-per-channel'"):
        load_policy("ln-per-chanel", ORT)
    with pytest.raises(PolicyError, match="no such policy file"):
        load_policy(tmp_path / "missing.toml", ORT)
    with pytest.raises(PolicyError, match=r"mine\.toml:3: "):
        f.write_text('[[rule]]\nroles = ["fc2"]\nbits = 4\n[[rule]]\n')
        load_policy(f, ORT)


# -- plans on tiny_vit ----------------------------------------------------------------------------------------------
def test_presets_resolve_on_tiny_vit(vit, vit7):
    g, roles = _graph(vit)
    plans = {n: resolve_plan(g, load_policy(n, ORT), roles) for n in PRESETS if "b5-6" not in n}
    pc = {n: {(x.role, x.spec.activation.value, x.spec.weight.value) for x in p.nodes if x.simulated}
          for n, p in plans.items()}
    assert pc["default"] == set() and pc["all-per-tensor"] == set()
    ln = {(r, "per-channel", "per-tensor") for r in ("q", "k", "v", "fc1")}
    assert pc["ln-per-channel"] == ln
    assert pc["ln-fc2-per-channel"] == ln | {("fc2", "per-channel", "per-channel")}
    assert {r for r, _, _ in pc["all-per-channel"]} == {"q", "k", "v", "proj", "fc1", "fc2", "head"}
    assert all(not x.simulated for x in plans["all-per-tensor"].nodes)
    assert all(x.spec.weight is Granularity.PER_TENSOR for x in plans["all-per-tensor"].quantized())
    for n, p in plans.items():
        for x in p.nodes:
            assert x.simulated == (x.spec.activation is Granularity.PER_CHANNEL and not x.spec.skip)
            if x.simulated:
                assert x.simulation == ("per-channel activations",) and x.spec.symmetric
    # blocks 5 and 6 are outside a 2-block model; on a 7-block one, only those fc2 are per-channel
    with pytest.raises(PolicyError, match=r"preset ln-fc2-b5-6-per-channel:\d+: .*blocks 5-6, outside the model: "
                                          r"it has 2 blocks \(0-1\)"):
        resolve_plan(g, load_policy("ln-fc2-b5-6-per-channel", ORT), roles)
    g7, roles7 = _graph(vit7)
    p = resolve_plan(g7, load_policy("ln-fc2-b5-6-per-channel", ORT), roles7)
    fc2 = {x.block: x.spec.activation.value for x in p.nodes if x.role == "fc2"}
    assert fc2 == {b: "per-channel" if b in (5, 6) else "per-tensor" for b in range(7)}


def test_plan_warns_about_rules_that_match_nothing(vit):
    g, roles = _graph(vit)
    p = resolve_plan(g, parse('[[rule]]\nname = "fused"\nroles = ["qkv"]\nblocks = 1\nskip = true\n'
                              '[[rule]]\nname = "dec"\nroles = ["conv"]\nskip = true\n[[rule]]\n'), roles)
    assert [x.node for x in p.nodes if x.rule == "fused"] and \
        p.warnings == ["p.toml:6: rule 'dec' matches no node of this model"]


def test_trt_residual_entries_follow_the_residual_add_role(vit):
    pytest.importorskip("vitc.compiler.quant.trt_residual")
    g, roles = _graph(vit, "trt")
    pol = parse('[[rule]]\nname = "res-float"\nroles = ["residual_add"]\nskip = true\n[[rule]]\n',
                PolicyDefaults.for_target("trt"))
    p = make_plan(g, pol, roles, "trt")
    res = [x for x in p.nodes if x.role == "residual"]
    assert len(res) == 4 and all(x.spec.skip and x.rule == "res-float" for x in res)
    assert p.warnings == []


# -- builds ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("preset", PRESETS)
def test_each_preset_builds_and_runs(preset, vit, vit7, tmp_path):
    src = vit7 if "b5-6" in preset else vit
    pol = load_policy(preset, ORT)
    res = build(BuildConfig(model=src, outdir=tmp_path / "o", calib=CalibConfig(samples=8), policy=pol,
                            show_progress=False))
    r = res.report["policy"]
    assert r["policy"] == preset
    sim = {n["node"] for n in r["nodes"] if n["simulated"]}
    assert set(r["simulated"]) == sim
    assert all(n["simulation"] == ["per-channel activations"] for n in r["nodes"] if n["simulated"])
    assert (len(sim) == 0) == (preset in ("default", "all-per-tensor", "trt-int8-mha", "openvino-float-attention",
                                     "migration-caps"))
    m = onnx.load(res.model_path)
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in m.graph.initializer}
    # each simulated node reads its activation through a per-axis (last axis) QuantizeLinear / DequantizeLinear
    prod = {o: n for n in m.graph.node for o in n.output}
    for n in m.graph.node:
        if n.name in sim:
            dq = prod[n.input[0]]
            assert dq.op_type == "DequantizeLinear" and inits[dq.input[1]].ndim == 1, n.name
            assert [a.i for a in dq.attribute if a.name == "axis"] in ([1], [-1]), n.name
    # measured on this fixture: 17-23 dB (random weights with outlier LayerNorm channels, 4 held-out photos)
    assert photo_sqnr_db(src, res.model_path, n=4) > 10.0


def test_observer_and_simulated_bits_reach_the_model(vit, tmp_path):
    pol = parse('[[rule]]\nname = "fc2-int4"\nroles = ["fc2"]\nbits = 4\n'
                '[[rule]]\nname = "qkv-minmax"\nroles = ["qkv"]\nobserver = "minmax"\n[[rule]]\n',
                PolicyDefaults.for_target("ort", simulate=True))
    res = build(BuildConfig(model=vit, outdir=tmp_path / "o", calib=CalibConfig(samples=8), policy=pol,
                            search=False, migrate=False, show_progress=False))
    nodes = {n["node"]: n for n in res.report["policy"]["nodes"]}
    fc2 = [n for n in nodes.values() if n["role"] == "fc2"]
    assert len(fc2) == 2 and all(n["simulated"] and n["simulation"] == ["int4"] for n in fc2)
    q = next(n for n in nodes.values() if n["role"] == "q")
    assert res.report["calibration_table"][q["activations"][0]]["observer"] == "minmax"
    fc1 = next(n for n in nodes.values() if n["role"] == "fc1")
    assert res.report["calibration_table"][fc1["activations"][0]]["observer"].startswith("percentile")
    m = onnx.load(res.model_path)
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in m.graph.initializer}
    for n in fc2:
        w = inits[f"{n['node']}.weight.int8"]
        assert w.min() >= -8 and w.max() <= 7  # 4-bit values in an int8 container
    assert photo_sqnr_db(vit, res.model_path, n=4) > 5.0


# -- CLI ------------------------------------------------------------------------------------------------------------
def _cli(capsys, *args):
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def test_explain_with_a_preset_marks_simulated_rows(capsys, vit):
    rc, out, err = _cli(capsys, "--log-level", "warning", "explain", vit, "--policy", "ln-fc2-per-channel")
    assert rc == 0, err
    lines = out.strip().splitlines()
    head = lines[0].split()
    assert head == ["node", "op", "role", "block", "act", "weight", "observer", "bits", "sym", "rule", "note"]
    rows = {}
    for ln in lines[1:-1]:
        c = ln.split()
        rows.setdefault((c[2], c[3]), []).append(c)
    fc2 = rows[("fc2", "1")][0]
    assert fc2[4:10] == ["per-channel", "per-channel", "minmax", "8", "sym", "fc2-per-channel"]
    assert " ".join(fc2[10:]) == "simulated: per-channel activations"
    q = rows[("q", "0")][0]
    assert q[4:6] == ["per-channel", "per-tensor"] and q[9] == "layernorm-outputs-per-channel"
    proj = rows[("proj", "0")][0]
    assert proj[4:10] == ["per-tensor", "per-tensor", "percentile(99.99)", "8", "asym", "default"] and len(proj) == 10
    assert rows[("norm1", "0")][0][4] == "float" and rows[("head", "-")][0][4] == "per-tensor"
    assert lines[-1] == "# policy ln-fc2-per-channel: 18 quantized, 0 kept float, 10 simulated"
    assert "10 node(s) use simulated quantization" in err


def test_explain_trt_target_default(capsys, vit):
    rc, out, err = _cli(capsys, "--log-level", "error", "explain", vit, "--target", "trt")
    assert rc == 0, err
    rows = [ln.split() for ln in out.strip().splitlines()[1:-1]]
    conv = next(r for r in rows if r[2] == "patch_embed")
    assert conv[4] == "float" and conv[9] == "patch-embed-float"  # the first layer stays fp16 (1% of the MACs)
    fc1 = next(r for r in rows if r[2] == "fc1")
    assert fc1[4:10] == ["per-tensor", "per-channel", "percentile(99.99)", "8", "sym", "default"]


def test_bad_policy_is_one_error_line_exit_2_and_no_output(capsys, vit, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[[rule]]\nroles = ["mlp"]\nskip = true\n[[rule]]\n')
    out_dir = tmp_path / "out"
    for args in (("explain", vit, "--policy", bad), ("build", vit, "-o", out_dir, "--policy", bad)):
        rc, out, err = _cli(capsys, *args)
        assert rc == 2 and out == "" and err.count("vitc: error:") == 1, err
        assert f"{bad}:2: unknown role 'mlp'" in err and "valid roles:" in err
    assert not out_dir.exists()
    rc, out, err = _cli(capsys, "build", vit, "-o", out_dir, "--policy", "no-such-preset")
    assert rc == 2 and "presets: default, all-per-tensor" in err and not out_dir.exists()


def test_build_cli_with_policy_file(capsys, vit, tmp_path):
    pol = tmp_path / "p.toml"
    pol.write_text('[[rule]]\nname = "fc2-pc"\nroles = ["fc2"]\nactivation = "per-channel"\n[[rule]]\n')
    out_dir = tmp_path / "out"
    rc, _, err = _cli(capsys, "build", vit, "-o", out_dir, "--policy", pol, "--calib-samples", "4", "--no-search")
    assert rc == 0, err
    r = json.loads((out_dir / "build.json").read_text())["policy"]
    assert r["policy"] == "p" and len(r["simulated"]) == 2
    assert {n["rule"] for n in r["nodes"] if n["role"] == "fc2"} == {"fc2-pc"}
    assert "2 node(s) use simulated quantization" in err


def test_readme_policy_example_parses():
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text[text.index("## Policies"):]
    example = section[section.index("```toml") + len("```toml"):section.index("```", section.index("```toml") + 7)]
    p = parse_policy(example, "README", ORT)
    assert [r.name for r in p.rules] == ["fc2-b5-6", "default"] and p.rules[0].blocks == (5, 6)
    assert p.rules[0].spec.weight is Granularity.PER_CHANNEL and p.rules[1].spec.weight is Granularity.PER_TENSOR


def test_block_range_outside_the_model_fails_the_build_cleanly(capsys, vit, tmp_path):
    out_dir = tmp_path / "out"
    rc, out, err = _cli(capsys, "build", vit, "-o", out_dir, "--policy", "ln-fc2-b5-6-per-channel")
    assert rc == 2 and err.count("vitc: error:") == 1, err
    assert "blocks 5-6, outside the model: it has 2 blocks (0-1)" in err
    assert not out_dir.exists() and not list(tmp_path.glob(".out*"))


# -- migrate: a per-rule switch for channel-scale migration -------------------------------------------------------
def test_migrate_key_parses_round_trips_and_rejects_non_bool():
    from vitc.compiler.quant.policy import policy_to_toml

    p = parse('[[rule]]\nname = "fc2"\nroles = ["fc2"]\nmigrate = false\n\n[[rule]]\nname = "all"\n')
    assert p.rules[0].spec.migrate is False and p.rules[1].spec.migrate is True
    assert "migrate=off" in p.rules[0].spec.describe() and "migrate" not in p.rules[1].spec.describe()
    back = parse(policy_to_toml(p))
    assert [r.spec for r in back.rules] == [r.spec for r in p.rules]
    reject('[[rule]]\nname = "x"\nmigrate = "no"\n', 3, "migrate must be true or false")
    reject('[[rule]]\nname = "x"\nroles = ["fc2"]\nskip = true\nmigrate = false\n\n[[rule]]\nname = "d"\n', 5,
           "skip = true", "migrate")


def test_fc2_migration_lands_as_one_mul_before_its_quantizer(vit, tmp_path):
    """fc2's input (GELU's output) takes its migration factors as one Mul before the quantizer, on both targets,
    wherever the range search picked a strength (no Mul where it picked none); LayerNorm-fed linears migrate by
    folding into norm1/norm2. Neither default caps fc2's strength."""
    from vitc.compiler.quant.policy import target_default_policy

    for pol in (target_default_policy("ort"), target_default_policy("trt")):
        assert pol.lookup("n", "fc2", 0).spec.migrate and pol.lookup("n", "fc2", 0).spec.max_alpha is None
    counts = {}
    for target in ("ort", "trt"):  # scored in-sample, the search migrates every LayerNorm-fed site here
        res = build(BuildConfig(model=vit, outdir=tmp_path / target, target=Target(target), holdout_search=False,
                                calib=CalibConfig(samples=4), show_progress=False))
        counts[target] = {k: v for r in res.report["passes"] for k, v in r["counts"].items()}
        m = onnx.load(res.model_path)
        prod = {o: n for n in m.graph.node for o in n.output}
        fc2 = [n["node"] for n in res.report["policy"]["nodes"] if n["role"] == "fc2"]
        alpha = {tuple(v["nodes"]): v["alpha"] for v in res.report["search"]["linear"].values()}
        assert len(fc2) == 2
        for n in m.graph.node:
            if n.name in fc2:
                q = prod[prod[n.input[0]].input[0]]
                assert q.op_type == "QuantizeLinear"
                a = alpha[(n.name,)]
                assert prod[q.input[0]].op_type == ("Gelu" if a is None else "Mul"), (target, n.name, a)
    assert counts["ort"]["LayerNorm folds"] == counts["trt"]["LayerNorm folds"] == 4


# -- max_alpha: a per-rule cap on the channel-scale migration strength ---------------------------------------------
def test_max_alpha_key_parses_round_trips_and_rejects_bad_values():
    from vitc.compiler.quant.policy import policy_to_toml
    from vitc.compiler.calib.range_search import ALPHAS, capped_alphas

    p = parse('[[rule]]\nname = "proj"\nroles = ["proj"]\nmax_alpha = 0.3\n\n[[rule]]\nname = "all"\n')
    assert p.rules[0].spec.max_alpha == 0.3 and p.rules[1].spec.max_alpha is None
    assert "max_alpha=0.3" in p.rules[0].spec.describe() and "max_alpha" not in p.rules[1].spec.describe()
    assert [r.spec for r in parse(policy_to_toml(p)).rules] == [r.spec for r in p.rules]
    for bad in ("0", "1.5", "-0.1", '"0.3"', "true"):
        reject(f'[[rule]]\nname = "x"\nmax_alpha = {bad}\n', 3, "max_alpha must be a number in (0, 1]")
    reject('[[rule]]\nname = "x"\nmigrate = false\nmax_alpha = 0.3\n', 4, "migrate = false", "max_alpha")
    assert capped_alphas(None) == ALPHAS and capped_alphas(0.3) == (None, 0.3) and capped_alphas(0.1) == (None,)
    assert capped_alphas(1.0) == ALPHAS


def test_migration_caps_preset_caps_the_search_at_proj_and_fc2(vit, tmp_path):
    """The preset migration-caps' rules "proj-mild-migration" and "fc2-mild-migration" reach the range search: every
    proj site migrates with at most alpha 0.3, every fc2 site with at most 0.65, while the LayerNorm-fed sites still
    pick stronger ones. The ORT and TensorRT defaults have no cap."""
    from vitc.compiler.quant.policy import target_default_policy

    pol = load_policy("migration-caps", ORT)
    assert pol.lookup("n", "proj", 0).name == "proj-mild-migration"
    assert pol.lookup("n", "proj", 0).spec.max_alpha == 0.3 and pol.lookup("n", "fc1", 0).spec.max_alpha is None
    assert pol.lookup("n", "fc2", 0).spec.max_alpha == 0.65
    assert all(r.spec.max_alpha is None for t in ("ort", "trt", "openvino") for r in target_default_policy(t).rules)
    res = build(BuildConfig(model=vit, outdir=tmp_path / "ort", calib=CalibConfig(samples=4), policy=pol,
                            holdout_search=False, show_progress=False))
    by_role = search_alphas_by_role(res.report)
    assert len(by_role["proj"]) == 2 and all(a is None or a <= 0.3 for a in by_role["proj"]), by_role
    assert len(by_role["fc2"]) == 2 and all(a is None or a <= 0.65 for a in by_role["fc2"]), by_role
    assert any(a is not None and a > 0.3 for r, al in by_role.items() if r not in ("proj", "fc2") for a in al), \
        by_role  # the LayerNorm-fed sites are not capped


def test_openvino_default_quantizes_qk_keeps_softmax_x_v_float_and_fc2_uint8():
    """The OpenVINO default as a plan: QK^T quantized (symmetric), softmax x V float, fc2's input asymmetric uint8,
    every other input symmetric, no migration cap (the held-out range search scores it); every linear GPTQ-rounded."""
    from vitc.compiler.quant.policy import WeightRounding, policy_to_toml, target_default_policy

    pol = target_default_policy("openvino")
    assert pol.name == "openvino"
    assert pol.lookup("n", "attn_av", 0).spec.skip and not pol.lookup("n", "attn_qk", 0).spec.skip
    assert pol.lookup("n", "attn_qk", 0).spec.symmetric
    fc2, proj = pol.lookup("n", "fc2", 0).spec, pol.lookup("n", "proj", 0).spec
    assert not fc2.symmetric and proj.symmetric and all(r.spec.max_alpha is None for r in pol.rules)
    assert pol.lookup("n", "qkv", 0).spec.symmetric and pol.lookup("n", "patch_embed", 0).spec.skip
    assert {r.spec.rounding for r in pol.rules if not r.spec.skip} == {WeightRounding.GPTQ}
    back = parse(policy_to_toml(pol))
    assert [(r.name, r.roles, r.spec.skip or r.spec) for r in back.rules] == \
        [(r.name, r.roles, r.spec.skip or r.spec) for r in pol.rules]


def test_openvino_float_attention_preset_is_the_openvino_default_with_qk_float():
    """The preset file restates the OpenVINO default; only its attention rule differs (QK^T float too)."""
    from vitc.compiler.quant.policy import target_default_policy

    base = target_default_policy("openvino")
    preset = load_policy("openvino-float-attention", PolicyDefaults.for_target("openvino"))
    assert [(r.roles, r.spec.skip or r.spec) for r in preset.rules if r.roles != frozenset({"attn_qk", "attn_av"})] \
        == [(r.roles, r.spec.skip or r.spec) for r in base.rules if r.roles != frozenset({"attn_av"})]
    att = [r for r in preset.rules if r.roles == frozenset({"attn_qk", "attn_av"})]
    assert len(att) == 1 and att[0].spec.skip


def test_max_alpha_caps_the_fixed_strength_too(vit, tmp_path):
    """Without the search (--alpha A), a capped site migrates with min(A, max_alpha): a build at alpha 0.8 capped
    at 0.3 everywhere writes the same model, byte for byte, as an uncapped build at alpha 0.3, and not the same
    as an uncapped one at 0.8."""
    from vitc.compiler.quant.policy import target_default_policy

    pol = target_default_policy("ort")
    models = {}
    for label, policy, alpha in (("capped", with_max_alpha(pol, 0.3), 0.8), ("0.3", pol, 0.3), ("0.8", pol, 0.8)):
        res = build(BuildConfig(model=vit, outdir=tmp_path / label, policy=policy, search=False, migrate_alpha=alpha,
                                calib=CalibConfig(samples=4), show_progress=False))
        models[label] = res.model_path.read_bytes()
    assert models["capped"] == models["0.3"] and models["capped"] != models["0.8"]


def test_tensorrt_doc_restates_the_tensorrt_default():
    """docs/tensorrt.md shows the TensorRT default as a policy file; that file must build the same plan rules."""
    from pathlib import Path

    from vitc.compiler.quant.policy import PolicyDefaults, parse_policy, target_default_policy

    text = (Path(__file__).resolve().parents[1] / "docs" / "tensorrt.md").read_text()
    start = text.index("```toml", text.index("**The default policy** corresponds to this file")) + len("```toml")
    doc = parse_policy(text[start:text.index("```", start)], "docs/tensorrt.md", PolicyDefaults.for_target("trt"))
    default = target_default_policy("trt")
    assert [r.name for r in doc.rules] == [r.name for r in default.rules]
    for a, b in zip(doc.rules, default.rules):
        assert a.roles == b.roles and a.spec.skip == b.spec.skip, a.name
        if not a.spec.skip:  # what a skipped rule would round with never reaches a node
            assert a.spec == b.spec, a.name


def test_migration_caps_preset_is_the_ort_default_with_fc2_and_proj_capped():
    from vitc.compiler.quant.policy import target_default_policy

    pre = load_policy("migration-caps", ORT)
    default = target_default_policy("ort")
    assert not any(r.spec.max_alpha is not None for r in default.rules)  # the held-out search scores every strength
    caps = {r.name: (r.roles, r.spec.max_alpha) for r in pre.rules if r.spec.max_alpha is not None}
    assert caps == {"fc2-mild-migration": (frozenset({"fc2"}), 0.65), "proj-mild-migration": (frozenset({"proj"}), 0.3)}
    rest = [r for r in pre.rules if r.spec.max_alpha is None]
    assert [(r.name, r.roles, r.spec.skip) for r in rest] == [(r.name, r.roles, r.spec.skip) for r in default.rules]
    assert [r.spec for r in rest if not r.spec.skip] == [r.spec for r in default.rules if not r.spec.skip]
    assert all(replace(r.spec, max_alpha=None) == default.rules[-1].spec for r in pre.rules if r.spec.max_alpha)
