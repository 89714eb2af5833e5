"""Reading the i-CLEVR files: objects.json, train.json + its image folder, and condition lists (test.json, ...).

Pixels are [-1, 1] floats from here on (the course's ToTensor + Normalize(0.5, 0.5)); uint8 only where an image is
stored. Training images are decoded from PNG once, resized to S x S, and cached as one uint8 array next to the data,
so later epochs and runs read no PNG.
"""
import argparse
import difflib
import json
import math
import os
import sys
from multiprocessing import Pool

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

COLORS = ["gray", "red", "blue", "green", "brown", "purple", "cyan", "yellow"]
SHAPES = ["cube", "sphere", "cylinder"]
N_CLASSES = len(COLORS) * len(SHAPES)  # index = 8 * shape + colour, as in the course's objects.json
STRIP_CONDITION = ["red sphere", "cyan cylinder", "cyan cube"]  # the denoising strip the course asks for


class UserError(Exception):
    """A mistake in the user's input: the scripts print its one-line message and exit with status 2."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help shows the module docstring as written and every option's default (unless its help names it)."""

    def _get_help_string(self, action):
        return action.help if "default" in (action.help or "") else super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """Every script's parser: --help shows defaults, and a bad option is one line `error: ...`, exit status 2 (no
    usage block, no traceback). A Number's complaint is given as `error: --flag VALUE: must be ... (default D)`."""

    def __init__(self, **kw):
        super().__init__(formatter_class=HelpFormatter, **kw)

    def error(self, message):
        flag, sep, rest = message.removeprefix("argument ").partition(": ")
        action = self._option_string_actions.get(flag.split("/")[0])
        if sep and action and isinstance(action.type, Number):  # Numbers is a Number too
            default = f" (default {action.default})" if action.default not in (None, argparse.SUPPRESS) else ""
            message = f"{flag} {rest}{default}"
        print(f"error: {message}; see --help", file=sys.stderr)
        sys.exit(2)


class Number:
    """An argparse type for a number with its valid range, checked where the arguments are parsed, before any work:
    Number(int, lo=1) is a positive integer, Number(float, 0, 1) a probability, Number(float, 0, 1, hi_open=True) an
    EMA decay. NaN and infinities are refused. `what` names the range in the message."""

    def __init__(self, kind=float, lo=None, hi=None, lo_open=False, hi_open=False, multiple=1, what=None):
        self.kind, self.lo, self.hi, self.lo_open, self.hi_open, self.multiple = kind, lo, hi, lo_open, hi_open, multiple
        self.what = what or self.describe()
        self.__name__ = kind.__name__  # argparse names the type in some messages

    def describe(self) -> str:
        noun = "an integer" if self.kind is int else "a number"
        if self.lo is not None and self.hi is not None:
            return f"{noun} in {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}{')' if self.hi_open else ']'}"
        if self.lo is not None:
            return f"{noun} {'>' if self.lo_open else '>='} {self.lo:g}"
        return f"{noun} {'<' if self.hi_open else '<='} {self.hi:g}" if self.hi is not None else f"a finite {noun[2:]}"

    def ok(self, v) -> bool:
        if not math.isfinite(v) or (self.multiple > 1 and v % self.multiple):
            return False
        if self.lo is not None and (v <= self.lo if self.lo_open else v < self.lo):
            return False
        return self.hi is None or (v < self.hi if self.hi_open else v <= self.hi)

    def __call__(self, text: str):
        try:
            v = self.kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text}: not {'an integer' if self.kind is int else 'a number'}; "
                                             f"must be {self.what}")
        if not self.ok(v):
            raise argparse.ArgumentTypeError(f"{text}: must be {self.what}")
        return v


class Numbers(Number):
    """A comma-separated list of Numbers, e.g. guidance weights 0,0.5,1 or seeds 0,1,2."""

    def __call__(self, text: str):
        items = [t.strip() for t in text.split(",")]
        bad = next((t for t in items if not self.parses(t)), None)
        if bad is not None or not text.strip():
            raise argparse.ArgumentTypeError(f"{text}: each value must be {self.what} ({bad!r} is not); give a "
                                             f"comma-separated list such as 0,1,2")
        return [self.kind(t) for t in items]

    def parses(self, t: str) -> bool:
        try:
            return self.ok(self.kind(t))
        except ValueError:
            return False


# the ranges most options need
POSITIVE_INT = Number(int, lo=1, what="a positive integer")
COUNT = Number(int, lo=0, what="an integer >= 0")
SWITCH = Number(int, 0, 1, what="0 or 1")
POSITIVE = Number(float, lo=0, lo_open=True, what="a number > 0")
PROBABILITY = Number(float, 0, 1, what="a probability in [0, 1]")
IMAGE_SIZE = Number(int, lo=4, multiple=4, what="a multiple of 4 (the network halves it twice), such as 64")


def run_cli(fn, args) -> None:
    """Run a script's body; a UserError becomes one line on stderr and exit status 2, never a traceback."""
    try:
        fn(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def ensure_writable(folder: str, flag: str) -> None:
    """Create folder if needed and prove a file can be written there, before any work is done."""
    probe = os.path.join(folder, f".write_test.{os.getpid()}")  # per process: torchrun ranks probe at once
    try:
        os.makedirs(folder, exist_ok=True)
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        raise UserError(f"{folder}: output folder cannot be written ({e.strerror}); pass another {flag}")


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
        raise UserError(f"{path}: malformed JSON ({e.msg} at line {e.lineno}, column {e.colno}); fix or replace the file")
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


def load_train(data_dir: str, image_dir: str = None, image_size: int = 64, workers: int = None):
    """All training images as a (N, 3, S, S) uint8 tensor and their (N, 24) multi-hot conditions."""
    if image_size % 4:
        raise UserError(f"--image-size {image_size}: must be divisible by 4 (the network halves it twice); try 64")
    objects = load_objects(data_dir)
    train_path = os.path.join(data_dir, "train.json")
    train = read_json(train_path, "train.json")
    if not isinstance(train, dict) or not train:
        raise UserError(f"{train_path}: expected a dict of image file names to object lists")
    files = list(train)
    cond = encode(list(train.values()), objects, train_path)
    image_dir = find_image_dir(data_dir, image_dir)

    # the cache is valid for exactly this list of files at this size
    cache = os.path.join(data_dir, f"cache_train_{image_size}px.npy")
    key = {"files": len(files), "first": files[0], "last": files[-1], "size": image_size,
           "image_dir": os.path.abspath(image_dir), "train_json_bytes": os.path.getsize(train_path)}
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
