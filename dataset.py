"""Reading the i-CLEVR files: objects.json, train.json + its image folder, and condition lists (test.json, ...).

Pixels are [-1, 1] floats from here on (the course's ToTensor + Normalize(0.5, 0.5)); uint8 only where an image is
stored. Training images are decoded from PNG once, resized to S x S, and cached as one uint8 array next to the data,
so later epochs and runs read no PNG.
"""
import difflib
import hashlib
import json
import os
from multiprocessing import Pool

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from cli import UserError

COLORS = ["gray", "red", "blue", "green", "brown", "purple", "cyan", "yellow"]
SHAPES = ["cube", "sphere", "cylinder"]
N_CLASSES = len(COLORS) * len(SHAPES)  # index = 8 * shape + colour, as in the course's objects.json
STRIP_CONDITION = ["red sphere", "cyan cylinder", "cyan cube"]  # the denoising strip the course asks for
ICLEVR_TRAIN_IMAGES = 18009  # train.json's images, in the course's set and the synthetic one


def object_names() -> list:
    return [f"{c} {s}" for s in SHAPES for c in COLORS]


def read_json(path: str, what: str):
    if not os.path.isfile(path):
        raise UserError(f"{path}: {what} not found; check --data-dir (it should hold objects.json, train.json, "
                        f"test.json and new_test.json)")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: malformed JSON ({e.msg} at line {e.lineno}, column {e.colno}); "
                        "fix or replace the file")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read {what} ({e}); check the file's permissions and encoding")


def load_objects(data_dir: str) -> dict:
    path = os.path.join(data_dir, "objects.json")
    objects = read_json(path, "objects.json")
    ok = (isinstance(objects, dict) and sorted(objects.values()) == list(range(N_CLASSES))
          and all(isinstance(k, str) for k in objects))
    if not ok:
        raise UserError(f"{path}: expected a dict of {N_CLASSES} object names to the indices 0..{N_CLASSES - 1}; "
                        f"use the course's objects.json")
    return objects


def encode(conditions: list, objects: dict, path: str) -> torch.Tensor:
    """Lists of object names -> (N, 24) multi-hot float tensor; every bad entry is named with the fix."""
    if not isinstance(conditions, list) or not conditions:
        raise UserError(f"{path}: expected a non-empty JSON list of condition lists like [[\"red cube\"], ...]")
    cond = torch.zeros(len(conditions), len(objects))
    for i, names in enumerate(conditions):
        where = f"{path}: entry {i}"
        if not isinstance(names, list) or not names:
            raise UserError(f"{where} is {json.dumps(names)}; each condition must be a non-empty list of object names")
        for name in names:
            if name not in objects:
                close = difflib.get_close_matches(str(name), list(objects), n=1)
                hint = f"did you mean {close[0]!r}?" if close else "see objects.json for the 24 valid names"
                raise UserError(f"{where}: unknown object name {name!r}; {hint}")
            if cond[i, objects[name]]:
                raise UserError(f"{where}: {name!r} appears twice in {json.dumps(names)}; list each object once")
            cond[i, objects[name]] = 1.0
    return cond


def load_conditions(data_dir: str, split: str, objects: dict, run_dir: str = None):
    """A split name ('test', 'new_test', 'val') read from data_dir, or the path of any file in the same format. The
    course's data has no val.json: train.py writes one into the run folder, run_dir. Returns (list of name lists,
    (N, 24) multi-hot)."""
    path = split if split.endswith(".json") else os.path.join(data_dir, f"{split}.json")
    if split == "val" and not os.path.isfile(path) and run_dir:
        path = os.path.join(run_dir, "val.json")
    if not split.endswith(".json") and not os.path.isfile(path):
        raise UserError(f"{path}: no split named {split!r} in {data_dir}; use test, new_test, val (written by "
                        f"synthetic.py or train.py) or a path to a .json file")
    conditions = read_json(path, "condition list")
    return conditions, encode(conditions, objects, path)


def draw_val(train_lists: list, exclude: list, n: int = 64, seed: int = 0) -> list:
    """A validation list drawn the way test.json's are (the object set of a random training image: a random scene,
    1 to 3 of its objects), no set twice, and none equal as a set to a condition of the excluded lists (test.json,
    new_test.json), so that choosing a checkpoint or w on it never looks at the test lists."""
    banned = {frozenset(c) for lists in exclude for c in lists}
    eligible = {frozenset(c) for c in train_lists} - banned
    rng = np.random.default_rng(seed)
    val, seen = [], set()
    while len(val) < min(n, len(eligible)):
        cand = train_lists[int(rng.integers(len(train_lists)))]
        if frozenset(cand) in eligible and frozenset(cand) not in seen:
            val.append(list(cand))
            seen.add(frozenset(cand))
    return val


def find_image_dir(data_dir: str, image_dir: str = None) -> str:
    candidates = [image_dir] if image_dir else [os.path.join(data_dir, d) for d in ("iclevr", "images")]
    for d in candidates:
        if os.path.isdir(d):
            return d
    raise UserError(f"{candidates[0]}: image folder not found; put the training PNGs there or pass --image-dir")


def read_image(path: str, size: int, exact: bool = False) -> np.ndarray:
    """One PNG -> (size, size, 3) uint8, resized unless exact (then another size is refused). Grayscale and RGBA
    are converted, not refused."""
    try:
        with Image.open(path) as im:
            if exact and im.size != (size, size):
                raise UserError(f"{path}: image is {im.size[0]}x{im.size[1]}, the classifier needs {size}x{size}; "
                                f"resample with python sample.py")
            im = im.convert("RGB")
            if im.size != (size, size):
                im = im.resize((size, size), Image.BILINEAR)  # PIL's bilinear is antialiased, like transforms.Resize
            return np.array(im, dtype=np.uint8)  # a writable copy, as torch.from_numpy wants
    except FileNotFoundError:
        raise UserError(f"{path}: image file not found; is the image folder complete?")
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise UserError(f"{path}: unreadable or truncated PNG ({e}); replace the file")


def _read_image_job(job):
    return read_image(*job)


def read_train(data_dir: str) -> dict:
    """train.json: image file names -> object lists."""
    train_path = os.path.join(data_dir, "train.json")
    train = read_json(train_path, "train.json")
    if not isinstance(train, dict) or not train:
        raise UserError(f"{train_path}: expected a dict of image file names to object lists")
    return train


def train_fingerprint(data_dir: str, image_dir: str = None) -> str:
    """A hex digest of train.json and of every training image's size and modification time (one os.stat per file,
    no pixel read). A re-render into the same folder keeps the names but changes it, so the decode cache and the
    synthetic set's judge, which both record it, are made again for the new images."""
    image_dir = find_image_dir(data_dir, image_dir)
    digest = hashlib.sha256()
    paths = [os.path.join(image_dir, name) for name in read_train(data_dir)]
    for path in [os.path.join(data_dir, "train.json")] + paths:
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise UserError(f"{path}: image file not found; is the image folder complete?")
        digest.update(f"{os.path.basename(path)} {st.st_size} {st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def load_train(data_dir: str, image_dir: str = None, image_size: int = 64, workers: int = None):
    """All training images as a (N, 3, S, S) uint8 tensor and their (N, 24) multi-hot conditions."""
    if image_size % 4:
        raise UserError(f"--image-size {image_size}: must be divisible by 4 (the network halves it twice); try 64")
    objects = load_objects(data_dir)
    train_path = os.path.join(data_dir, "train.json")
    train = read_train(data_dir)
    files = list(train)
    cond = encode(list(train.values()), objects, train_path)
    image_dir = find_image_dir(data_dir, image_dir)

    # the cache is valid for exactly these files, as they are now (a re-render keeps the names), at this size
    cache = os.path.join(data_dir, f"cache_train_{image_size}px.npy")
    key = {"files": len(files), "first": files[0], "last": files[-1], "size": image_size,
           "image_dir": os.path.abspath(image_dir), "train_json_bytes": os.path.getsize(train_path),
           "fingerprint": train_fingerprint(data_dir, image_dir)}
    try:
        with open(cache + ".json") as f:
            if json.load(f) == key:
                return torch.from_numpy(np.load(cache)), cond
    except (OSError, ValueError):
        pass
    jobs = [(os.path.join(image_dir, name), image_size) for name in files]
    workers = workers or os.cpu_count() or 1
    desc = f"decoding {len(files)} PNGs to {image_size}px (once)"
    if workers > 1:
        with Pool(workers) as pool:
            arrays = list(tqdm(pool.imap(_read_image_job, jobs, chunksize=64), total=len(jobs), desc=desc))
    else:
        arrays = [read_image(*job) for job in tqdm(jobs, desc=desc)]
    images = np.ascontiguousarray(np.stack(arrays).transpose(0, 3, 1, 2))  # (N, 3, S, S) uint8
    try:
        np.save(cache + ".tmp.npy", images)
        os.replace(cache + ".tmp.npy", cache)
        with open(cache + ".json", "w") as f:
            json.dump(key, f)
    except OSError as e:
        print(f"note: could not write the image cache {cache} ({e}); PNGs will be decoded again next run")
    return torch.from_numpy(images), cond


def make_batch(images_uint8: torch.Tensor, idx: torch.Tensor, hflip: bool) -> torch.Tensor:
    """Gather a batch from the device-resident uint8 set, flip half of it left-right (labels are sets of objects, so
    a mirror image has the same label), and normalize to [-1, 1]."""
    x0 = to_float(images_uint8[idx])
    if hflip:
        flip = torch.rand(len(idx), device=x0.device) < 0.5
        x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0)
    return x0


def to_float(images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [-1, 1]."""
    return images_uint8.float().div(127.5).sub(1.0)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """float [-1, 1] -> uint8 [0, 255]; values outside the range are clipped."""
    return x.float().add(1.0).mul(127.5).round().clamp(0, 255).to(torch.uint8)
