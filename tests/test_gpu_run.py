"""The first GPU run's script, walked on the CPU with --tiny: every step runs or is recorded, a failing step does not
stop the later ones, and the scores land in the summary."""
import json

import gpu_run


def test_the_tiny_campaign_goes_on_past_a_failing_step_and_records_every_step_and_the_scores(tmp_path, monkeypatch):
    real = gpu_run.recipes
    monkeypatch.setattr(gpu_run, "recipes", lambda tiny: {**real(tiny), "report_c": ["--n-feat", "12"]})  # refused
    result = gpu_run.main(["--out", str(tmp_path / "out"), "--data-dir", str(tmp_path / "data"), "--tiny",
                           "--minutes", "10"])
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    statuses = {s["step"]: s["status"] for s in summary["steps"]}
    assert statuses["render"] == statuses["judge"] == statuses["gpu_preset: train"] == "ok", statuses
    assert statuses["report_c: train"] == "failed (exit 2)" and statuses["report_c: w on val"] == "skipped"
    figures = summary["figures"]["gpu_preset"]
    assert 0 <= figures["test"] <= 1 and 0 <= figures["new_test"] <= 1 and figures["w"] in (0.5, 2)
    assert figures["steps"] == 6 and len(figures["draws_mean_sd"]) == 2  # 2 epochs of 3 steps; test and new_test
    assert json.loads(json.dumps(result["figures"])) == summary["figures"]
    assert (tmp_path / "out" / "summary.md").is_file() and (tmp_path / "out" / "log.txt").stat().st_size > 0
