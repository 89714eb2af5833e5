import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHARED_ICLEVR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "iclevr")


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """A 12-scene synthetic set (36 images) in the course's layout, rendered once per test session."""
    import synthetic
    out = str(tmp_path_factory.mktemp("data") / "tiny")
    synthetic.render_dataset(out, scenes=12, seed=1, workers=1, truth_per_condition=2)
    return out
