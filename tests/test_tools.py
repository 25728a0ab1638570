"""Benchmark scripts' table formatting (the scripts themselves are timed runs, not tests)."""

from vitc.tools.fusion_table import format_table


def test_fusion_table_ratio_fused_vs_unfused():
    res = {"threads": 2, "machine": {"cpu": "x"}, "models": {"deit_tiny_patch16_224": {
        "source fp32": {"ms_per_image": 20.0, "ci95_pct": 1.0, "speedup_vs_source": None},
        "vitc fp32 fused": {"ms_per_image": 18.0, "ci95_pct": 1.0, "speedup_vs_source": 1.11},
        "vitc int8 --no-fuse": {"ms_per_image": 25.0, "ci95_pct": 1.0, "speedup_vs_source": 0.8},
        "vitc int8 fused": {"ms_per_image": 12.5, "ci95_pct": 1.0, "speedup_vs_source": 1.6}}}}
    md = format_table(res)
    assert "| deit_tiny_patch16_224 | 20.0 | 18.0 (1.11x) | 25.0 (0.80x) | 12.5 (1.60x) | 2.00x |" in md
