"""The FlashInfer draft-mask check (examples/gpu/flashinfer_draft_mask.py), its torch side here: the
plugin's paged-KV metadata for a batch of mixed widths, read as FlashInfer reads it, is torch's SDPA
under the runtime's draft mask; the comparison catches a row that sees its padded tail."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "gpu" / "flashinfer_draft_mask.py"
spec = importlib.util.spec_from_file_location("flashinfer_draft_mask", SCRIPT)
check = sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # dataclasses look their module up
spec.loader.exec_module(check)


def test_the_metadata_read_as_flashinfer_reads_it_is_sdpa_under_the_draft_mask():
    case = check.make_case([6, 2, 1, 4], [9, 0, 17, 3], num_heads=4, num_kv_heads=2, head_dim=8)
    qo_indptr, kv_indptr, kv_indices, kv_lens = check.draft_metadata(case)
    assert qo_indptr.tolist() == [0, 6, 12, 18, 24]  # W queries per row
    assert kv_lens.tolist() == [9 + 6, 0 + 2, 17 + 1, 3 + 4]  # context + its own block
    assert kv_indices[15:17].tolist() == case.slot_table[1, :2].tolist()
    want = check.sdpa_reference(case)
    torch.testing.assert_close(check.paged_reference(case, qo_indptr, kv_indptr, kv_indices), want)
    window = check.draft_metadata(case, whole_window=True)[:3]
    torch.testing.assert_close(check.paged_reference(case, *window, check.draft_custom_mask(case)), want)
    # the whole window without the mask lets narrow rows see their padded tail: the check must tell
    wrong = check.paged_reference(case, *window)
    assert check.compare("tail", wrong, want, torch.float32)["ok"] is False
    assert check.compare("same", want, want, torch.float32)["ok"] is True


def test_the_script_runs_its_torch_side_and_names_why_flashinfer_is_skipped(tmp_path, capsys):
    report = tmp_path / "report.json"
    assert check.main(["--report", str(report)]) == 0
    written = json.loads(report.read_text())
    assert written["rows"] and all(row["ok"] for row in written["rows"])
    if written["skipped"]:
        assert "flashinfer check skipped" in capsys.readouterr().out
