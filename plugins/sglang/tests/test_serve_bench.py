"""The serving benchmark's own logic (plugins/sglang/serve_bench.py): what each variant sends, and
how passes are summarised. The benchmark itself starts two real servers and runs for many minutes:
`make serve-bench`, outside CI."""

from __future__ import annotations

import pytest

from blockpilot.plugins.sglang.serve_bench import MIXED_SIZES, LevelRun, format_table, summarise, variant_params


def test_each_variant_sends_what_it_says():
    assert variant_params("policy", 8)(0) is None
    assert variant_params("dflash", 8)(3) == {"blockpilot_block_size": 8, "blockpilot_verify": "full"}
    assert variant_params("fixed-3", 8)(5) == {"blockpilot_block_size": 3}
    assert variant_params("fixed-4-full", 8)(0) == {"blockpilot_block_size": 4, "blockpilot_verify": "full"}
    mixed = [variant_params("mixed", 8)(i) for i in range(len(MIXED_SIZES))]
    assert mixed == [None if s is None else {"blockpilot_block_size": s} for s in MIXED_SIZES]
    assert any(isinstance(s, int) and s >= 6 for s in MIXED_SIZES)  # the mix has a wide size
    for bad in ("fixed", "fixed-x", "fixed-3-sometimes", "eagle"):
        with pytest.raises(ValueError, match="unknown variant"):
            variant_params(bad, 8)


def run(variant, level, repeat, tokens, wall, identical=None):
    return LevelRun(variant, level, repeat, wall, tokens, 0.5, 0.05, 1.5 if variant != "plain" else None, None,
                    identical, outputs=[[1, 2]] * 4)


def test_summary_takes_medians_over_repeats_and_ratios_to_plain():
    runs = [run("plain", 8, 0, 1000, 10.0), run("plain", 8, 1, 1000, 20.0), run("plain", 8, 2, 1000, 12.5),
            run("policy", 8, 0, 1000, 5.0, 4), run("policy", 8, 1, 1000, 10.0, 3), run("policy", 8, 2, 1000, 8.0, 4)]
    rows = summarise(runs, ["policy"], [8])
    plain, policy = rows
    assert plain["output_tokens_per_s"] == pytest.approx(80.0)  # median of 100, 50, 80
    assert policy["output_tokens_per_s"] == pytest.approx(125.0)  # median of 200, 100, 125
    assert policy["x_plain"] == pytest.approx(125.0 / 80.0)
    assert policy["identical_to_plain"] == "3/4"  # the worst pass
    assert plain["identical_to_plain"] is None
    table = format_table(rows)
    assert "policy" in table and "1.562" in table
