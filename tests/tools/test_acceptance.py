"""The GPU acceptance run's dry run: every stage in its report, in order; one that fails is
recorded and the next still runs."""

import json

from nextstep.tools import acceptance

# Loaded by every Python process started with it on the path: in the int4 stage's own process,
# a CPU int4 kernel that fails.
BROKEN_INT4 = """
import sys
if sys.argv[-2:] == ["--stage", "int4"]:
    import torch
    def broken(*args, **kwargs):
        raise RuntimeError("a broken int4 kernel, for the test")
    torch.ops.aten._weight_int4pack_mm_for_cpu = broken
"""


def test_the_dry_run_reports_every_stage_and_survives_a_failing_one(tmp_path, monkeypatch, capsys):
    (tmp_path / "sitecustomize.py").write_text(BROKEN_INT4)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    out = tmp_path / "run"

    assert acceptance.main(["--dry-run", "--out", str(out)]) == 0

    report = json.loads((out / acceptance.REPORT).read_text())
    stages = {row["stage"]: row for row in report["stages"]}
    assert list(stages) == ["eager", "graph", "flash", "int8", "int4", "fp8", "compiled"]
    assert stages["graph"] == dict(stage="graph", seconds=stages["graph"]["seconds"], status="skipped",
                                   reason="needs CUDA")
    assert stages["flash"]["status"] == "skipped"
    assert stages["int4"]["status"] == "failed" and "a broken int4 kernel" in stages["int4"]["error"]
    for name, step, weights in (("eager", "eager", "float32"), ("int8", "eager", "int8"), ("fp8", "eager", "fp8"),
                                ("compiled", "compiled", "float32")):
        row = stages[name]
        assert row["status"] == "ok", row
        assert (row["step"], row["weights"], row["tokens"], row["rows"]) == (step, weights, 4, 2)
        assert row["seconds_per_image"] > 0 and row["peak_memory_mb"] > 0
        assert set(row["ms_split"]) == {"prefill", "token_step", "backbone_alone", "final_decode"}
    assert stages["eager"]["max_token_difference_vs_eager"] == 0.0
    assert stages["compiled"]["max_token_difference_vs_eager"] <= 1e-4  # the parity tolerance
    assert 0 < stages["int8"]["max_token_difference_vs_eager"] < 1  # other weights: near, not equal
    printed = capsys.readouterr().out
    assert "int4      failed: RuntimeError: a broken int4 kernel" in printed and "report:" in printed
