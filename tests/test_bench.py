"""bench.py measures what train.py runs: its own step function, and a "plain" mode that is really float32 NCHW."""
import torch

import bench
import train


def test_bench_times_train_py_step_and_plain_is_float32_nchw_without_tf32(monkeypatch, capsys):
    assert bench.train_step is train.train_step
    seen = set()

    def spy(r, idx, step, stop):
        weight = r.model.init_conv.conv1[0].weight
        seen.add((r.precision, r.channels_last, weight.is_contiguous(), torch.backends.cudnn.allow_tf32))
        return train.train_step(r, idx, step, stop)

    monkeypatch.setattr(bench, "train_step", spy)
    try:
        bench.main(["--image-size", "16", "--n-feat", "8", "--batch-size", "8", "--train-steps", "2", "--no-sample",
                    "--data-dir", "/nonexistent", "--precision", "bf16", "--channels-last", "1", "--profile", "4"])
    finally:
        torch.backends.cudnn.allow_tf32 = True
    assert ("bf16", True, False, True) in seen  # fast: as asked
    assert ("fp32", False, True, False) in seen  # plain: float32, NCHW weights, TF32 off
    out = capsys.readouterr().out
    assert "EMA statistics + checkpoint, per save" in out and "plain: fp32 (TF32 off), NCHW" in out
    profile = out[out.index("fast: 5 training steps, top 4 operators by self_cpu_time"):]  # after the table
    rules = [i for i, line in enumerate(profile.splitlines()) if line.startswith("-----")]
    # 4 operator rows, each named; which operators they are is the platform's choice (oneDNN or a slow fallback)
    rows = profile.splitlines()[rules[1] + 1:rules[2]]
    assert len(rows) == 4 and all(row.split()[0] for row in rows)


def test_bench_starts_where_the_platform_has_no_resource_module(monkeypatch):
    """Windows has no `resource`: bench.py must still import and run, with the CPU's peak memory unknown."""
    import importlib
    import sys
    monkeypatch.setitem(sys.modules, "resource", None)  # import resource now raises ImportError
    fresh = importlib.reload(bench)
    try:
        value = fresh.peak_memory(torch.device("cpu"))
        assert value != value  # nan: not measured
    finally:
        monkeypatch.undo()
        importlib.reload(bench)
