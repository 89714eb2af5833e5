"""The synthetic set: the course's layout, unseen new_test sets, determinism, and objects that stay visible."""
import json
import os

import numpy as np
from PIL import Image

import synthetic


def test_layout_matches_the_course_files(tiny_data):
    with open(os.path.join(tiny_data, "objects.json")) as f:
        assert json.load(f) == {n: i for i, n in enumerate(synthetic.object_names())}
    with open(os.path.join(tiny_data, "train.json")) as f:
        train = json.load(f)
    assert len(train) == 36
    first = list(train)[:3]
    assert [n.rsplit("_", 1)[1] for n in first] == ["0.png", "1.png", "2.png"]
    a, b, c = (train[n] for n in first)
    assert len(a) == 1 and b[:1] == a and c[:2] == b and len(set(c)) == 3  # objects added one at a time
    with Image.open(os.path.join(tiny_data, "iclevr", first[0])) as im:
        assert im.size == (128, 96) and im.mode == "RGB"  # 4:3, resized to 64x64 by the loader
    for split in ("test", "new_test"):
        with open(os.path.join(tiny_data, f"{split}.json")) as f:
            assert len(json.load(f)) == 32
        assert len(os.listdir(os.path.join(tiny_data, "truth", split))) == 32 * 2  # truth_per_condition=2 here


def test_new_test_object_sets_never_occur_in_train(tiny_data):
    with open(os.path.join(tiny_data, "train.json")) as f:
        seen = {frozenset(v) for v in json.load(f).values()}
    with open(os.path.join(tiny_data, "new_test.json")) as f:
        assert not any(frozenset(c) in seen for c in json.load(f))


def test_rendering_is_deterministic_for_a_seed(tmp_path):
    for run in ("a", "b"):
        os.makedirs(tmp_path / run)
        synthetic.render_scene((7, ["red sphere", "cyan cylinder", "blue cube"], str(tmp_path / run), 3, "s"))
    for k in range(3):
        a = np.asarray(Image.open(tmp_path / "a" / f"s_000007_{k}.png"))
        b = np.asarray(Image.open(tmp_path / "b" / f"s_000007_{k}.png"))
        assert np.array_equal(a, b)


def test_placed_objects_do_not_intersect_and_each_stays_visible():
    rng = np.random.default_rng(0)
    for i in range(5):
        view = synthetic.scene_view(rng)
        names = [synthetic.object_names()[j] for j in rng.choice(24, 3, replace=False)]
        objs = synthetic.place(names, rng, view)
        for p in range(3):
            for q in range(p + 1, 3):
                gap = np.hypot(objs[p]["x"] - objs[q]["x"], objs[p]["y"] - objs[q]["y"])
                assert gap > synthetic.footprint(objs[p]) + synthetic.footprint(objs[q])
        # placement counts on a 2x coarser grid; at full resolution the count may differ by a few pixels
        ids = synthetic.object_ids(objs, view)
        assert min(synthetic.visible_pixels(objs, ids)) >= 0.85 * synthetic.MIN_VISIBLE
        for k, obj in enumerate(objs):  # the share left by the others, against the object rendered alone
            alone = np.sum(synthetic.object_ids([obj], view) == 0)
            assert np.sum(ids == k) >= 0.9 * synthetic.MIN_VISIBLE_FRACTION * alone


def test_an_object_is_drawn_in_its_colour():
    rng = np.random.default_rng(0)
    view = synthetic.scene_view(rng)
    obj = {"name": "red cube", "color": "red", "shape": "cube", "size": "large", "r": 0.7, "material": "rubber",
           "angle": 0.3, "x": 0.0, "y": 0.5}
    img = synthetic.render([obj], view, rng).reshape(-1, 3).astype(int)
    ss = synthetic.SS  # one id per pixel: the first ray of each pixel's SS x SS samples
    ids = synthetic.object_ids([obj], view).reshape(96, ss, 128, ss)[:, 0, :, 0].reshape(-1)
    mean = img[ids == 0].mean(0)
    assert mean[0] > 2 * mean[1] and mean[0] > 2 * mean[2]  # red dominates on the cube's pixels
