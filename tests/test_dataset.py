"""Reading the course's formats: the real JSON files, bad entries, image conversion and the decode cache."""
import json
import os
import shutil

import pytest
import torch
from PIL import Image

import dataset
from conftest import SHARED_ICLEVR
from cli import UserError
from dataset import encode, load_conditions, load_objects, load_train, object_names, read_image


@pytest.mark.skipif(not os.path.isdir(SHARED_ICLEVR), reason="the course's JSON files are not beside the checkout")
def test_the_course_json_files_parse():
    objects = load_objects(SHARED_ICLEVR)
    assert objects == {name: i for i, name in enumerate(object_names())}  # index = 8 * shape + colour
    with open(os.path.join(SHARED_ICLEVR, "train.json")) as f:
        train = json.load(f)
    cond = encode(list(train.values()), objects, "train.json")
    assert cond.shape == (18009, 24) and set(cond.sum(1).tolist()) == {1.0, 2.0, 3.0}
    for split in ("test", "new_test"):
        names, c = load_conditions(SHARED_ICLEVR, split, objects)
        assert len(names) == 32 and c.shape == (32, 24)
        assert c.sum().item() == sum(len(n) for n in names)


def test_bad_condition_lists_name_the_entry_and_the_fix():
    objects = {name: i for i, name in enumerate(object_names())}
    with pytest.raises(UserError, match=r"entry 1: unknown object name 'red cub'; did you mean 'red cube'"):
        encode([["red cube"], ["red cub"]], objects, "x.json")
    with pytest.raises(UserError, match="appears twice"):
        encode([["red cube", "red cube"]], objects, "x.json")
    with pytest.raises(UserError, match="non-empty list"):
        encode([[]], objects, "x.json")


def test_malformed_json_is_a_user_error(tmp_path):
    (tmp_path / "objects.json").write_text('{"gray cube": 0,')
    with pytest.raises(UserError, match="malformed JSON"):
        load_objects(str(tmp_path))


def test_grayscale_and_rgba_are_converted_and_a_truncated_png_is_named(tmp_path):
    Image.new("L", (80, 60), 128).save(tmp_path / "g.png")
    Image.new("RGBA", (80, 60), (10, 20, 30, 40)).save(tmp_path / "a.png")
    assert read_image(str(tmp_path / "g.png"), 64).shape == (64, 64, 3)
    assert tuple(read_image(str(tmp_path / "a.png"), 64)[0, 0]) == (10, 20, 30)
    data = (tmp_path / "a.png").read_bytes()
    (tmp_path / "t.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="t.png: unreadable or truncated PNG"):
        read_image(str(tmp_path / "t.png"), 64)


def test_train_images_are_decoded_once_then_read_from_the_cache(tiny_data, monkeypatch):
    images, cond = load_train(tiny_data, image_size=16, workers=1)
    assert images.dtype == torch.uint8 and images.shape == (36, 3, 16, 16) and cond.shape == (36, 24)
    monkeypatch.setattr(dataset, "read_image", lambda *a: pytest.fail("a PNG was decoded again"))
    again, _ = load_train(tiny_data, image_size=16, workers=1)
    assert torch.equal(images, again)


def rerender_one_image(data_dir: str) -> str:
    """Rewrite one training PNG of data_dir in place with other pixels, as a re-render with a changed renderer
    would: same name, same size; its modification time set 10 s later, so the change shows on any file system."""
    with open(os.path.join(data_dir, "train.json")) as f:
        name = list(json.load(f))[1]
    path = os.path.join(data_dir, "iclevr", name)
    before = os.stat(path)
    with Image.open(path) as im:
        Image.new("RGB", im.size, (250, 10, 10)).save(path)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns + 10 ** 10))
    return path


def test_a_rerender_into_the_same_folder_is_decoded_again_not_read_from_the_old_cache(tiny_data, tmp_path):
    data = str(tmp_path / "data")
    shutil.copytree(tiny_data, data, ignore=shutil.ignore_patterns("cache_*", "checkpoint.pth"))
    old, _ = load_train(data, image_size=16, workers=1)
    path = rerender_one_image(data)
    new, _ = load_train(data, image_size=16, workers=1)
    assert torch.equal(new[1], torch.from_numpy(read_image(path, 16)).permute(2, 0, 1))
    assert not torch.equal(new[1], old[1]) and torch.equal(new[2:], old[2:])


def test_pixels_map_to_minus_one_one_and_back():
    x = torch.tensor([0, 1, 127, 128, 255], dtype=torch.uint8)
    f = dataset.to_float(x)
    assert f.min() == -1 and f.max() == 1
    assert torch.equal(dataset.to_uint8(f), x)
