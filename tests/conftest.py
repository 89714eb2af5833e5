import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHARED_ICLEVR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "iclevr")
# the one tiny configuration of the tests: a network of 8 channels at 16x16, 3 steps an epoch of tiny_data, T = 20
# eager: a compile takes longer than these runs (module-scoped fixtures train before the autouse switch below is set)
TINY = ["--image-size", "16", "--n-feat", "8", "--batch-size", "12", "--T", "20", "--sample-every", "0",
        "--compile", "0"]


def tiny_run(data, out, *extra) -> dict:
    """train.py with TINY on a data folder into out (extra flags win); returns the checkpoint it saved."""
    import torch
    import train
    from settings import decide
    train.train(decide(["--data-dir", str(data), "--out-dir", str(out), *TINY, *extra]))
    return torch.load(os.path.join(out, "ckpt.pt"), weights_only=False)


@pytest.fixture(autouse=True)
def cpu_unless_a_cuda_test(request, monkeypatch):
    """Every test outside tests/test_cuda.py runs on the CPU, whatever the machine has: --device auto means the CPU
    in this process and in every process a test starts (ICLEVR_DEVICE is inherited), so a GPU machine runs the same
    CPU suite as CI, and tests/test_cuda.py is the one place for CUDA. There --compile auto means eager
    (TORCH_COMPILE_DISABLE=1): a minute of compiling would dwarf runs of seconds; the compile tests ask for it."""
    if request.path.name == "test_cuda.py":
        monkeypatch.delenv("ICLEVR_DEVICE", raising=False)
    else:
        monkeypatch.setenv("ICLEVR_DEVICE", "cpu")
        monkeypatch.setenv("TORCH_COMPILE_DISABLE", "1")


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """A 12-scene synthetic set (36 images) in the course's layout, rendered once per test session."""
    import synthetic
    out = str(tmp_path_factory.mktemp("data") / "tiny")
    synthetic.render_dataset(out, scenes=12, seed=1, workers=1, truth_per_condition=2)
    yield out
    # shared by every test: one that trained a judge into it (validation on, synthetic data) would change the others
    assert not os.path.exists(os.path.join(out, "checkpoint.pth")), "a test trained a classifier into tiny_data"
