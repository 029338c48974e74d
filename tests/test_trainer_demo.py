"""The embedded demo, at its seconds-long ``tiny`` scale: every stage runs and writes its outputs.
(Whether KD beats CE is a property of the full-size run, reported by ``distill-ops demo``.)"""

from __future__ import annotations

import json

import pytest

from distill_ops.trainer import demo
from distill_ops.trainer.objective import cache_available


pytestmark = pytest.mark.usefixtures("one_intraop_thread")


@pytest.mark.parametrize("targets", [
    "dense",
    pytest.param("cache", marks=pytest.mark.skipif(not cache_available(),
                                                   reason="the target cache is not available")),
    pytest.param("sample", marks=pytest.mark.skipif(not cache_available(),
                                                    reason="sparse targets are not available")),
])
def test_demo_tiny(tmp_path, capsys, targets):
    out = tmp_path / "demo"
    results = demo.run(str(out), "tiny", seed=0, targets=targets, progress=False)
    assert results["targets"] == targets
    saved = json.loads((out / "results.json").read_text())
    assert [r["model"] for r in saved["rows"]] == ["teacher (CE)", "student CE", "student KD"]
    for r in saved["rows"]:
        assert r["heldout_ppl"] > 1 and r["tokens_per_s"] > 0 and r["peak_memory_bytes"] > 0
    assert (out / "demo.png").stat().st_size > 5000
    assert (out / "tokenizer" / "tokenizer.json").is_file()
    assert (out / "student_kd" / "checkpoint-4" / "model.safetensors").is_file()
    printed = capsys.readouterr().out
    assert "held-out ppl" in printed and "student KD" in printed
    if targets == "cache":
        assert (out / "cache" / "manifest.json").is_file()


def test_demo_cli_help(capsys):
    from distill_ops.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["demo", "--help"])
    assert exc.value.code == 0
    assert "--out-dir" in capsys.readouterr().out
