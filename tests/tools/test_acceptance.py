"""The GPU acceptance run's dry run: every stage in its report, in order; one that fails is
recorded and the next still runs."""

import json

from nextstep.tools import acceptance


def test_the_dry_run_reports_every_stage_and_survives_a_failing_one(tmp_path, monkeypatch, capsys):
    # A torchao that cannot be imported: the int8 stage's own process fails while quantizing.
    broken = tmp_path / "broken" / "torchao"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text("raise ImportError('a broken torchao, for the test')\n")
    monkeypatch.setenv("PYTHONPATH", str(broken.parent))
    out = tmp_path / "run"

    assert acceptance.main(["--dry-run", "--out", str(out)]) == 0

    report = json.loads((out / acceptance.REPORT).read_text())
    stages = {row["stage"]: row for row in report["stages"]}
    assert list(stages) == ["eager", "graph", "flash", "int8", "compiled"]
    assert stages["graph"] == dict(stage="graph", seconds=stages["graph"]["seconds"], status="skipped",
                                   reason="needs CUDA")
    assert stages["flash"]["status"] == "skipped"
    assert stages["int8"]["status"] == "failed" and "a broken torchao" in stages["int8"]["error"]
    for name, step in (("eager", "eager"), ("compiled", "compiled")):
        row = stages[name]
        assert row["status"] == "ok", row
        assert row["step"] == step and row["tokens"] == 4 and row["rows"] == 2 and row["weights"] == "float32"
        assert row["seconds_per_image"] > 0 and row["peak_memory_mb"] > 0
        assert set(row["ms_split"]) == {"prefill", "token_step", "backbone_alone", "final_decode"}
        assert row["max_token_difference_vs_eager"] <= 1e-4  # the parity tolerance
    assert stages["eager"]["max_token_difference_vs_eager"] == 0.0
    printed = capsys.readouterr().out
    assert "int8      failed: ImportError: a broken torchao" in printed and "report:" in printed
