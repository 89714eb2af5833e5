"""A synthetic i-CLEVR: a small numpy ray caster that writes a folder in exactly the course's layout.

    python synthetic.py --out data/synthetic            # 6003 scenes x 3 renders = 18009 PNGs, as the real set
    python synthetic.py --out /tmp/tiny --scenes 12      # a small set for tests

Each scene is rendered three times as objects are added one at a time (_0: a, _1: a, b, _2: a, b, c). The look
follows CLEVR: a light gray floor with a vignette, a perspective camera looking down at about 36 degrees, cubes
(turned about the vertical), spheres and cylinders resting on the floor, a soft key light with cast shadows, a
fill light, two sizes, matte rubber or shiny metal, one ray a pixel. Objects never intersect, and every object
keeps enough visible pixels at 64x64 to be recognised (else the scene is placed again).
Writes objects.json, train.json, test.json, new_test.json (object sets never in train.json), val.json (64 sets drawn
like test's, none shared with test or new_test), iclevr/*.png, truth/{test,new_test,val}/<i>.png (ground-truth
renders of the lists), contact_sheet.png and synthetic.json.
"""
import json
import os
import time
from multiprocessing import Pool

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from cli import COUNT, POSITIVE_INT, Parser
from dataset import draw_val, object_names

RGB = {"gray": (87, 87, 87), "red": (173, 35, 35), "blue": (42, 75, 215), "green": (29, 105, 20),
       "brown": (129, 74, 25), "purple": (129, 38, 192), "cyan": (41, 208, 208), "yellow": (255, 238, 51)}
SIZES = {"large": 0.7, "small": 0.5}  # object "radius" in floor units; the floor area used is about 6 x 6
# 4:3 frames like the real set's, one ray per pixel: every reader resizes them to 64x64 with an antialiasing filter
# that averages about 2 x 1.5 of these pixels, and 2x2 supersampling cost 3.2x the time for no visible gain there
WIDTH, HEIGHT, SS = 128, 96, 1
RENDER_TIME = "about 2 minutes on 2 CPU cores"  # the full set, measured (docs/RESULTS.md)
MIN_VISIBLE = 40  # pixels an object must keep at 64x64, after occlusion ...
# ... and this share of its own silhouette: a cube half hidden behind another reads as anything
MIN_VISIBLE_FRACTION = 0.6
FLOOR = np.array([0.66, 0.66, 0.65])


# ---------------------------------------------------------------------------------------------------------------
# ray-object intersections: origins o (R, 3) or (3,), unit directions d (R, 3); return hit distance (inf = miss)
# and unit normals (R, 3)

def hit_sphere(o, d, obj):
    c = np.array([obj["x"], obj["y"], obj["r"]])
    oc = o - c
    b = oc @ d.T if oc.ndim == 1 else dot(d, oc)
    disc = b * b - ((oc @ oc if oc.ndim == 1 else dot(oc, oc)) - obj["r"] ** 2)
    t = -b - np.sqrt(np.maximum(disc, 0))
    t = np.where((disc > 0) & (t > 1e-4), t, np.inf)
    n = (o + t[:, None] * d - c) / obj["r"]
    return t, n


def hit_cylinder(o, d, obj):
    r, h = obj["r"], 2 * obj["r"]
    ox, oy, oz = (np.broadcast_to(o, d.shape)[:, i] for i in range(3))
    px, py = ox - obj["x"], oy - obj["y"]
    a = d[:, 0] ** 2 + d[:, 1] ** 2 + 1e-12
    b = 2 * (d[:, 0] * px + d[:, 1] * py)
    disc = b * b - 4 * a * (px * px + py * py - r * r)
    t_side = (-b - np.sqrt(np.maximum(disc, 0))) / (2 * a)
    z = oz + t_side * d[:, 2]
    t_side = np.where((disc > 0) & (t_side > 1e-4) & (z >= 0) & (z <= h), t_side, np.inf)
    dz = np.where(np.abs(d[:, 2]) < 1e-9, 1e-9, d[:, 2])
    t_top = (h - oz) / dz
    qx, qy = px + t_top * d[:, 0], py + t_top * d[:, 1]
    t_top = np.where((t_top > 1e-4) & (qx * qx + qy * qy <= r * r), t_top, np.inf)
    t = np.minimum(t_side, t_top)
    hx, hy = px + t_side * d[:, 0], py + t_side * d[:, 1]
    side_n = np.stack([hx / r, hy / r, np.zeros_like(hx)], -1)
    n = np.where((t_top <= t_side)[:, None], np.array([0.0, 0.0, 1.0]), side_n)
    return t, n


def hit_cube(o, d, obj):
    s = obj["r"] * 0.85  # half side: a cube of the sphere's radius looks too small next to it
    cos, sin = np.cos(obj["angle"]), np.sin(obj["angle"])
    rot = np.array([[cos, -sin, 0], [sin, cos, 0], [0, 0, 1]])  # local -> world
    c = np.array([obj["x"], obj["y"], s])
    lo, ld = (o - c) @ rot, d @ rot  # world -> local is the transpose, applied from the right
    ld = np.where(np.abs(ld) < 1e-9, 1e-9, ld)
    t1, t2 = (-s - lo) / ld, (s - lo) / ld
    tnear, tfar = np.minimum(t1, t2), np.maximum(t1, t2)
    t_in, t_out = tnear.max(-1), tfar.min(-1)
    t = np.where((t_in <= t_out) & (t_in > 1e-4), t_in, np.inf)
    axis = tnear.argmax(-1)
    n_local = np.zeros_like(ld)
    n_local[np.arange(len(ld)), axis] = -np.sign(ld[np.arange(len(ld)), axis])
    return t, n_local @ rot.T


HIT = {"sphere": hit_sphere, "cylinder": hit_cylinder, "cube": hit_cube}


def dot(a, b):
    return np.einsum("ij,ij->i", a, b)


def footprint(obj) -> float:
    """Radius of the circle that holds the object's footprint on the floor."""
    return obj["r"] * 0.85 * np.sqrt(2) if obj["shape"] == "cube" else obj["r"]


def near(o, d, obj, margin: float = 0.0):
    """Indices of the rays that pass within the object's bounding sphere (plus margin), the only ones that can hit
    it: most rays miss most objects, and testing only these keeps the renderer fast."""
    v = np.array([obj["x"], obj["y"], obj["r"]]) - o
    proj = v @ d.T if v.ndim == 1 else dot(v, d)
    dist2 = (v @ v if v.ndim == 1 else dot(v, v)) - proj ** 2
    return np.flatnonzero((dist2 < (2.0 * obj["r"] + margin) ** 2) & (proj > -2 * obj["r"]))


def hit(o, d, obj):
    t, n = np.full(len(d), np.inf), np.zeros_like(d)
    idx = near(o, d, obj)
    if len(idx):
        t[idx], n[idx] = HIT[obj["shape"]](o if o.ndim == 1 else o[idx], d[idx], obj)
    return t, n


# ---------------------------------------------------------------------------------------------------------------

def camera_rays(rng, width, height):
    """A jittered perspective camera above and in front of the scene; returns its origin and (H*W, 3) directions."""
    eye = np.array([rng.uniform(-0.4, 0.4), -9.0 + rng.uniform(-0.3, 0.3), 6.8 + rng.uniform(-0.3, 0.3)])
    target = np.array([0.0, 0.5, 0.0])
    fwd = (target - eye) / np.linalg.norm(target - eye)
    right = np.cross(fwd, [0, 0, 1.0])
    right /= np.linalg.norm(right)
    up = np.cross(right, fwd)
    tan_x = np.tan(np.radians(14))  # a narrow view: objects big enough to tell a cube from a cylinder at 32x32
    u = ((np.arange(width) + 0.5) / width * 2 - 1) * tan_x
    v = ((np.arange(height) + 0.5) / height * 2 - 1) * tan_x * height / width
    uu, vv = np.meshgrid(u, -v)
    d = fwd + uu[..., None] * right + vv[..., None] * up
    return eye, (d / np.linalg.norm(d, axis=-1, keepdims=True)).reshape(-1, 3)


def trace(o, d, objects):
    """Nearest hit among objects and the floor: distance (R,), object id (R,) (-1 floor, -2 sky), normals (R, 3)."""
    t_best = np.where(d[:, 2] < 0, -np.broadcast_to(o, d.shape)[:, 2] / np.minimum(d[:, 2], -1e-9), np.inf)
    ids = np.where(np.isfinite(t_best), -1, -2)
    normals = np.tile(np.array([0.0, 0.0, 1.0]), (len(d), 1))
    for i, obj in enumerate(objects):
        t, n = hit(o, d, obj)
        closer = t < t_best
        t_best, ids = np.where(closer, t, t_best), np.where(closer, i, ids)
        normals[closer] = n[closer]
    return t_best, ids, normals


def shadow(p, key, objects, jitter: float = 0.06):
    """Fraction of an area key light visible from points p (R, 3), sampled at five jittered directions: soft
    shadows. Only points whose ray to the light passes near an object are traced."""
    lit = np.ones(len(p))
    cand = np.unique(np.concatenate([near(p, np.broadcast_to(key, p.shape), o, margin=0.6) for o in objects]))
    if not len(cand):
        return lit
    q, blocked = p[cand], np.zeros(len(cand))
    for j in ((0, 0, 0), (1, 1, 0), (-1, 1, 0), (1, -1, 0), (-1, -1, 0)):
        s = key + jitter * np.array(j)
        d = np.broadcast_to(s / np.linalg.norm(s), q.shape)
        hit_any = np.zeros(len(q), bool)
        for obj in objects:
            idx = near(q, d, obj)
            if len(idx):
                hit_any[idx] |= np.isfinite(HIT[obj["shape"]](q[idx], d[idx], obj)[0])
        blocked += hit_any
    lit[cand] -= blocked / 5
    return lit


def scene_view(rng, width=WIDTH, height=HEIGHT):
    """The per-scene jitter of camera and key light (CLEVR jitters both), shared by the three renders of a scene."""
    eye, d = camera_rays(rng, width * SS, height * SS)
    key = np.array([-0.55, -0.45, 0.75]) + rng.uniform(-0.1, 0.1, 3)
    return {"eye": eye, "d": d, "key": key / np.linalg.norm(key), "width": width, "height": height}


def vignette(width, height):
    yy, xx = np.meshgrid(np.linspace(-1, 1, height), np.linspace(-1, 1, width), indexing="ij")
    return (1 - 0.28 * (xx ** 2 * 0.8 + yy ** 2)).reshape(-1)


VIGNETTE = vignette(WIDTH * SS, HEIGHT * SS)  # the studio backdrop darkens towards the frame's edges


def object_ids(objects, view, step: int = 1):
    """Which object each pixel sees (-1 floor): all that placement needs. step=2 traces one ray in 2x2 of the
    pixel grid, a quarter of the work."""
    d = view["d"].reshape(view["height"] * SS, view["width"] * SS, 3)[::step, ::step].reshape(-1, 3)
    return trace(view["eye"], d, objects)[1]


def visible_pixels(objects, ids):
    """Each object's pixel count at 64x64, after occlusion."""
    return [int(np.sum(ids == i) * 64 * 64 / len(ids)) for i in range(len(objects))]


def visibility(objects, view, step: int = 1):
    """Each object's visible pixels at 64x64 and the fraction of its own in-frame silhouette that they are. Objects
    stand on the floor below the camera, so only other objects can hide them: one hit test per object suffices."""
    d = view["d"].reshape(view["height"] * SS, view["width"] * SS, 3)[::step, ::step].reshape(-1, 3)
    dist = np.stack([hit(view["eye"], d, obj)[0] for obj in objects])  # (objects, rays), inf where missed
    front = np.where(np.isfinite(dist.min(0)), dist.argmin(0), -1)
    seen = np.array([np.sum(front == i) for i in range(len(objects))])
    whole = np.isfinite(dist).sum(1)
    return seen * 64 * 64 / len(d), seen / np.maximum(whole, 1)


def render(objects, view, rng):
    """The (height, width, 3) uint8 image of objects seen through view."""
    width, height = view["width"], view["height"]
    eye, d, key = view["eye"], view["d"], view["key"]
    t, ids, n = trace(eye, d, objects)
    p = eye + np.where(np.isfinite(t), t, 0)[:, None] * d + n * 1e-3
    fill = np.array([0.6, -0.3, 0.5]) / np.linalg.norm([0.6, -0.3, 0.5])
    lit = shadow(p, key, objects)

    base = np.tile(FLOOR, (len(d), 1))
    metal = np.zeros(len(d), bool)
    for i, obj in enumerate(objects):
        base[ids == i] = np.array(RGB[obj["color"]]) / 255.0
        metal[ids == i] = obj["material"] == "metal"
    ndl = np.clip(n @ key, 0, 1)
    ndf = np.clip(n @ fill, 0, 1)
    shade = 0.32 + 0.78 * ndl * lit + 0.18 * ndf
    color = base * shade[:, None]
    # metal: darker diffuse, a tinted reflection of the bright room above, and a sharp highlight
    view = -d
    refl = 2 * dot(n, view)[:, None] * n - view
    env = 0.35 + 0.55 * np.clip(refl[:, 2], 0, 1)
    half = (key + view) / np.linalg.norm(key + view, axis=-1, keepdims=True)
    spec = np.clip(dot(n, half), 0, 1)
    is_obj = ids >= 0
    highlight = np.where(metal, 1.4 * spec ** 60, 0.25 * spec ** 12) * lit * is_obj
    color = np.where(metal[:, None], base * (0.45 * shade + 0.6 * env)[:, None], color) + highlight[:, None]
    color = np.where(is_obj[:, None], color, color * VIGNETTE[:, None])
    img = color.reshape(height, SS, width, SS, 3).mean((1, 3))  # the SS x SS box filter (SS = 1: a ray a pixel)
    return (np.clip(img, 0, 1) * 255 + rng.uniform(0, 1, img.shape)).astype(np.uint8)  # dithered to 8 bits


def place(names, rng, view, max_tries: int = 500):
    """Objects for the given names, non-intersecting, each visible enough in the full scene."""
    for _ in range(max_tries):
        objects = []
        for name in names:
            color, shape = name.split(" ")
            size = str(rng.choice(list(SIZES)))
            obj = {"name": name, "color": color, "shape": shape, "size": size, "r": SIZES[size],
                   "material": str(rng.choice(["rubber", "metal"])), "angle": rng.uniform(0, np.pi / 2)}
            for _ in range(50):
                obj["x"], obj["y"] = rng.uniform(-2.2, 2.2), rng.uniform(-1.5, 2.5)
                if all(np.hypot(obj["x"] - o["x"], obj["y"] - o["y"]) > footprint(obj) + footprint(o) + 0.15
                       for o in objects):
                    objects.append(obj)
                    break
            else:
                break
        # visibility only falls as objects are added, so checking the full scene checks every partial one
        if len(objects) == len(names):
            pixels, fraction = visibility(objects, view)
            if pixels.min() >= MIN_VISIBLE and fraction.min() >= MIN_VISIBLE_FRACTION:
                return objects
    raise RuntimeError(f"could not place {names} visibly in {max_tries} tries")


def render_scene(job):
    """Render one scene three times, adding an object each time; returns [(file name, names), ...]."""
    index, names, out_dir, seed, prefix = job
    rng = np.random.default_rng([seed, index])
    view = scene_view(rng)
    objects = place(names, rng, view)
    rows = []
    for k in range(1, len(names) + 1):
        img = render(objects[:k], view, rng)
        fname = f"{prefix}_{index:06d}_{k - 1}.png"
        Image.fromarray(img).save(os.path.join(out_dir, fname))
        rows.append((fname, names[:k]))
    return rows


def render_one(job):
    """One image of exactly the given names (the ground-truth renders of test lists)."""
    index, names, path, seed = job
    rng = np.random.default_rng([seed, 10 ** 6 + index])
    view = scene_view(rng)
    Image.fromarray(render(place(names, rng, view), view, rng)).save(path)


TRUTH_PER_CONDITION = 4  # <i>.png and <i>_1.png ... : several renders per condition, for the Frechet distance


def truth_render_jobs(out_dir: str, splits: dict, seed: int, per_condition: int = TRUTH_PER_CONDITION) -> list:
    jobs = []
    for split, lists in splits.items():
        os.makedirs(os.path.join(out_dir, "truth", split), exist_ok=True)
        for i, c in enumerate(lists):
            for k in range(per_condition):
                name = f"{i}.png" if k == 0 else f"{i}_{k}.png"
                jobs.append((len(jobs), c, os.path.join(out_dir, "truth", split, name), seed))
    return jobs


def contact_sheet(data_dir: str, rows: list, n: int = 24, cols: int = 6) -> None:
    cell_w, cell_h = 128, 96 + 36
    sheet = Image.new("RGB", (cols * cell_w, (n // cols) * cell_h), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for i, (fname, names) in enumerate(rows[:n]):
        x, y = (i % cols) * cell_w, (i // cols) * cell_h
        with Image.open(os.path.join(data_dir, "iclevr", fname)) as im:
            sheet.paste(im.convert("RGB"), (x, y))
        for j, line in enumerate(names):
            draw.text((x + 2, y + 96 + j * 10), line, fill=(0, 0, 0))
    sheet.save(os.path.join(data_dir, "contact_sheet.png"))


def render_dataset(out_dir: str, scenes: int = 6003, seed: int = 0, workers: int = None,
                   truth_per_condition: int = TRUTH_PER_CONDITION) -> None:
    t0 = time.time()
    os.makedirs(os.path.join(out_dir, "iclevr"), exist_ok=True)
    names = object_names()
    rng = np.random.default_rng(seed)
    scene_names = [[names[i] for i in rng.choice(len(names), 3, replace=False)] for _ in range(scenes)]
    with open(os.path.join(out_dir, "objects.json"), "w") as f:
        json.dump({name: i for i, name in enumerate(names)}, f)

    # test: drawn like the training lists; new_test: three-object sets that never occur in train.json
    test = [scene_names[i][:k] for i, k in zip(rng.choice(scenes, 32, replace=scenes < 32), rng.integers(1, 4, 32))]
    seen = {frozenset(s[:k]) for s in scene_names for k in (1, 2, 3)}
    new_test = []
    while len(new_test) < 32:
        cand = [names[i] for i in rng.choice(len(names), 3, replace=False)]
        if frozenset(cand) not in seen and frozenset(cand) not in map(frozenset, new_test):
            new_test.append(cand)
    for split, lists in (("test", test), ("new_test", new_test)):
        with open(os.path.join(out_dir, f"{split}.json"), "w") as f:
            json.dump(lists, f)

    workers = workers or os.cpu_count() or 1
    jobs = [(i, scene_names[i], os.path.join(out_dir, "iclevr"), seed, "CLEVR_train") for i in range(scenes)]
    truth_jobs = truth_render_jobs(out_dir, {"test": test, "new_test": new_test}, seed, truth_per_condition)
    with Pool(workers) as pool:
        rows = [r for rs in tqdm(pool.imap(render_scene, jobs, chunksize=8), total=scenes,
                                 desc=f"rendering {scenes} scenes x 3") for r in rs]
        list(pool.imap(render_one, truth_jobs, chunksize=4))
    # train.json in the real set's order: the three renders of a scene together
    with open(os.path.join(out_dir, "train.json"), "w") as f:
        json.dump(dict(rows), f)
    contact_sheet(out_dir, rows)
    n_val = add_val(out_dir, seed, workers, truth_per_condition)
    minutes = (time.time() - t0) / 60
    with open(os.path.join(out_dir, "synthetic.json"), "w") as f:
        json.dump({"scenes": scenes, "seed": seed, "size": [WIDTH, HEIGHT], "minutes": round(minutes, 2),
                   "workers": workers}, f)
    print(f"synthetic i-CLEVR: {len(rows)} images of {scenes} scenes + "
          f"{len(truth_jobs) + n_val} ground-truth renders in {out_dir} "
          f"({minutes:.1f} min on {workers} processes); contact sheet {out_dir}/contact_sheet.png")


def add_val(out_dir: str, seed: int = 0, workers: int = None, truth_per_condition: int = TRUTH_PER_CONDITION) -> int:
    """val.json, drawn like test.json and sharing no object set with test or new_test (for choosing checkpoints and
    w), and its ground-truth renders. Also adds them to a folder rendered before val.json existed. Returns the
    number of renders."""
    lists = {}
    for split in ("train", "test", "new_test"):
        with open(os.path.join(out_dir, f"{split}.json")) as f:
            lists[split] = json.load(f)
    val = draw_val(list(lists["train"].values()), [lists["test"], lists["new_test"]], seed=seed)
    with open(os.path.join(out_dir, "val.json"), "w") as f:
        json.dump(val, f)
    jobs = [(10 ** 5 + i, *job[1:])
            for i, job in enumerate(truth_render_jobs(out_dir, {"val": val}, seed, truth_per_condition))]
    with Pool(workers or os.cpu_count() or 1) as pool:
        list(pool.imap(render_one, jobs, chunksize=4))
    return len(jobs)


def make_parser():
    p = Parser(description=__doc__)
    p.add_argument("--out", default="data/synthetic", help="output folder")
    p.add_argument("--scenes", type=POSITIVE_INT, default=6003, help="scenes; each gives 3 images as in the real set")
    p.add_argument("--seed", type=COUNT, default=0, help="same seed, same images")
    p.add_argument("--workers", type=POSITIVE_INT, default=None, help="processes (default: all cores)")
    p.add_argument("--val-only", action="store_true", help="add val.json and its renders to an existing folder")
    return p


def main():
    args = make_parser().parse_args()
    if args.val_only:
        print(f"val.json and {add_val(args.out, args.seed, args.workers)} ground-truth renders added to {args.out}")
    else:
        render_dataset(args.out, args.scenes, args.seed, args.workers)


if __name__ == "__main__":
    main()
