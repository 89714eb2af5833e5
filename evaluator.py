"""The judge: the course's multi-label ResNet18 classifier and its top-k accuracy, on CPU or CUDA.

`evaluation_model(checkpoint_path, device).eval(images, labels)` gives the course evaluator's number for the same
weights and images: images (N, 3, 64, 64) in [-1, 1], labels (N, 24) multi-hot. For each image with k true objects,
the hits are how many of the classifier's k highest outputs are true; accuracy = sum(hits) / sum(k).

`python evaluator.py --train --data-dir DIR` trains the same architecture on a data folder (our synthetic set, where
the course's weights cannot be used) and saves it in the course's format {'model': state_dict}, with 'data': the
fingerprint of the images it learnt (dataset.train_fingerprint), so that a re-rendered set gets a new judge.
"""
import os
import time

import torch
import torch.nn as nn
import torchvision

from cli import COUNT, POSITIVE, POSITIVE_INT, Number, Parser, UserError, run_cli
from dataset import N_CLASSES, load_conditions, load_objects, load_train, read_image, to_float, train_fingerprint
from device import autocast, resolve_device, resolve_precision

CLASSIFIER_TIME = {  # the default judge on the synthetic set, measured (docs/RESULTS.md)
    "cpu": "about 10 minutes on 2 CPU cores with AMX, in bf16; in fp32 on a CPU without AMX, twice that or more",
    "cuda": "under a minute on a GPU"}


def build_classifier() -> nn.Module:
    """torchvision's resnet18, no pretrained weights, fc replaced by Linear(512, 24) + Sigmoid (SPEC section 2)."""
    net = torchvision.models.resnet18(weights=None)
    net.fc = nn.Sequential(nn.Linear(512, N_CLASSES), nn.Sigmoid())
    return net


def features(net: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The 512-dimensional penultimate features (the input of fc)."""
    x = net.maxpool(net.relu(net.bn1(net.conv1(images))))
    x = net.layer4(net.layer3(net.layer2(net.layer1(x))))
    return torch.flatten(net.avgpool(x), 1)


def topk_hits(probs: torch.Tensor, labels: torch.Tensor):
    """Per image: (hits_i, k_i), with hits_i = how many of the k_i highest outputs are true labels. Ties are broken
    by torch.topk, exactly as the course's evaluator does."""
    hits, ks = [], []
    for p, y in zip(probs.cpu(), labels.cpu()):
        k = int(y.sum().item())
        top = set(p.topk(k).indices.tolist())
        hits.append(len(top & set(torch.nonzero(y).flatten().tolist())))
        ks.append(k)
    return hits, ks


class evaluation_model:
    """Drop-in for the course's class of the same name, with the weights path and the device as arguments."""

    def __init__(self, checkpoint_path: str = "checkpoint.pth", device="auto"):
        self.device = resolve_device(device) if isinstance(device, str) else device
        if not os.path.isfile(checkpoint_path):
            raise UserError(f"{checkpoint_path}: classifier weights not found; put the course's checkpoint.pth there "
                            f"or pass --classifier PATH (for the synthetic set: python evaluator.py --train)")
        try:
            state = torch.load(checkpoint_path, map_location="cpu", weights_only=True)["model"]
            self.resnet18 = build_classifier()
            self.resnet18.load_state_dict(state)
        except Exception as e:  # any unpickling or shape error means the file is not the course's classifier
            raise UserError(f"{checkpoint_path}: not a readable classifier checkpoint ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:120]}); expected torch.save({{'model': resnet18 state_dict}})")
        self.resnet18 = self.resnet18.to(self.device).eval()
        self.classnum = N_CLASSES

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.resnet18(b.to(self.device)).float().cpu() for b in images.split(256)])

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        return torch.cat([features(self.resnet18, b.to(self.device)).float().cpu() for b in images.split(256)])

    def eval(self, images: torch.Tensor, labels: torch.Tensor) -> float:
        hits, ks = topk_hits(self.predict(images), labels)
        return sum(hits) / sum(ks)


def frechet_distance(feats_a: torch.Tensor, feats_b: torch.Tensor) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (N, D):
    |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2), the FID formula, in float64."""
    a, b = feats_a.double(), feats_b.double()
    return frechet_from_stats(a.mean(0), torch.cov(a.T), b.mean(0), torch.cov(b.T))


def frechet_from_stats(mu_a, cov_a, mu_b, cov_b) -> float:
    def sqrtm_psd(m):  # symmetric PSD square root; tiny negative eigenvalues from rounding are clipped
        vals, vecs = torch.linalg.eigh((m + m.T) / 2)
        return (vecs * vals.clamp(min=0).sqrt()) @ vecs.T
    root_a = sqrtm_psd(cov_a)
    cross = sqrtm_psd(root_a @ cov_b @ root_a)
    return float(((mu_a - mu_b) ** 2).sum() + torch.trace(cov_a) + torch.trace(cov_b) - 2 * torch.trace(cross))


# ----------------------------------------------------------------------------------------------------------------
# training the classifier on a data folder (for the synthetic set)

def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """x (N, 3, 64, 64) in [-1, 1]. Like the course's classifier, a quarter of the batches are seen at 32x32, a
    quarter at 48x48, and upsampled back, so that a blurry sample is not misread; flips, brightness and noise keep it
    from keying on render details. (Half the batches at 32x32 cost shape accuracy on sharp images: cylinders were read
    as cubes.)"""
    n = x.shape[0]
    res = [32, 48, 64, 64][int(torch.randint(4, (1,), generator=gen))]
    if res != x.shape[-1]:
        size = x.shape[-1]
        x = nn.functional.interpolate(x, size=res, mode="bilinear", antialias=True, align_corners=False)
        x = nn.functional.interpolate(x, size=size, mode="bilinear", align_corners=False)
    flip = torch.rand(n, generator=gen) < 0.5
    x = torch.where(flip.view(-1, 1, 1, 1).to(x.device), x.flip(-1), x)
    scale = 1 + 0.2 * (torch.rand(n, 1, 1, 1, generator=gen) - 0.5)
    noise = 0.05 * torch.rand(n, 1, 1, 1, generator=gen) * torch.randn(x.shape, generator=gen)
    return ((x + 1) * scale.to(x.device) - 1 + noise.to(x.device)).clamp(-1, 1)


def scene_of(filename: str) -> str:
    """CLEVR_train_002066_2.png -> CLEVR_train_002066: the three renders of one scene share it."""
    return filename.rsplit("_", 1)[0]


def load_truth(data_dir: str, split: str, objects: dict, all_renders: bool = False):
    """Ground-truth renders of a split's conditions written by synthetic.py: (images, cond), one per condition
    (<i>.png), or with all_renders every render of every condition; None where there are none."""
    folder = os.path.join(data_dir, "truth", split)
    if not os.path.isdir(folder):
        return None
    _, cond = load_conditions(data_dir, split, objects)
    files, rows = [], []
    for i in range(len(cond)):
        for name in sorted(f for f in os.listdir(folder) if f == f"{i}.png" or (all_renders and f.startswith(f"{i}_"))):
            files.append(os.path.join(folder, name))
            rows.append(i)
    images = torch.stack([torch.from_numpy(read_image(f, 64)).permute(2, 0, 1) for f in files])
    return to_float(images), cond[rows]


def train_classifier(args) -> None:
    import json
    from tqdm import tqdm
    from rundir import save_checkpoint
    args.out = args.out or os.path.join(args.data_dir, "checkpoint.pth")
    device = resolve_device(args.device)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    data = train_fingerprint(args.data_dir, args.image_dir)  # before reading: images changed meanwhile make it stale
    images, cond = load_train(args.data_dir, args.image_dir, 64)
    with open(os.path.join(args.data_dir, "train.json")) as f:
        scenes = [scene_of(name) for name in json.load(f)]
    # hold out whole scenes: the three renders of a scene share objects and layout, so a split by image would leak
    held_scenes = set(sorted(set(scenes))[:: max(2, round(1 / args.val_fraction))])
    val = torch.tensor([s in held_scenes for s in scenes])
    x_train, y_train, x_val, y_val = images[~val], cond[~val], images[val], cond[val]
    print(f"classifier: {len(x_train)} training images, {len(x_val)} held-out images from {len(held_scenes)} scenes, "
          f"{args.epochs} epochs, device {device}")

    net = build_classifier().to(device, memory_format=torch.channels_last)  # faster convolutions, CPU and GPU
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=1e-4)
    bs = min(args.batch_size, len(x_train))
    steps_per_epoch = len(x_train) // bs
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, args.lr, total_steps=args.epochs * steps_per_epoch)
    # bf16 where auto says so (GPUs that have it, CPUs with AMX); else fp32 (fp16 would need a scaler here)
    precision = "bf16" if resolve_precision("auto", device) == "bf16" else "fp32"
    t0 = time.time()
    for epoch in range(args.epochs):
        net.train()
        perm = torch.randperm(len(x_train), generator=gen)
        bar = tqdm(range(steps_per_epoch), desc=f"classifier epoch {epoch + 1}/{args.epochs}")
        for i in bar:
            idx = perm[i * bs:(i + 1) * bs]
            x = augment(to_float(x_train[idx]), gen).to(device, memory_format=torch.channels_last)
            y = y_train[idx].to(device)
            with autocast(device, precision):
                logits = net.fc[0](features(net, x))  # train on logits: BCE-with-logits is the stable form
            loss = nn.functional.binary_cross_entropy_with_logits(logits.float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            done = epoch * steps_per_epoch + i + 1
            left = (time.time() - t0) / done * (args.epochs * steps_per_epoch - done)
            # every epoch's, not this one's
            bar.set_postfix(loss=f"{loss.item():.4f}", all_left=tqdm.format_interval(left))
        net.eval()
        with torch.no_grad():
            probs = torch.cat([net(b.to(device, memory_format=torch.channels_last)).float().cpu()
                               for b in to_float(x_val).split(256)])
        hits, ks = topk_hits(probs, y_val)
        tqdm.write(f"classifier epoch {epoch + 1}: held-out top-k accuracy {sum(hits) / sum(ks):.4f}")
    minutes = (time.time() - t0) / 60
    save_checkpoint({"model": net.state_dict(), "data": data}, args.out)
    judge = evaluation_model(args.out, device)
    print(f"held-out scenes: top-k accuracy {judge.eval(to_float(x_val), y_val):.4f} ({len(x_val)} images)")
    objects = load_objects(args.data_dir)
    for split in ("test", "new_test", "val"):
        truth = load_truth(args.data_dir, split, objects, all_renders=True)
        if truth is not None:
            print(f"ground-truth renders of {split}: top-k accuracy {judge.eval(*truth):.4f} ({len(truth[0])} images)")
    print(f"saved {args.out} after {args.epochs} epochs in {minutes:.1f} min on {device} ({precision})")


def trained_on(path: str) -> str:
    """The fingerprint of the images a judge of ours learnt ('data'); None for the course's weights, a judge saved
    before it was recorded, or an unreadable file (evaluation_model names its problem when it loads it)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # mmap: the weights are not read
    except Exception:  # any unpickling error: not a judge of ours
        return None
    return state.get("data") if isinstance(state, dict) else None


def will_train_judge(data_dir: str, classifier: str = None, rendering: bool = False) -> bool:
    """Whether ensure_classifier trains a judge: none given, the data synthetic (rendering: it is about to be rendered
    there, so it will be), and DATA_DIR/checkpoint.pth missing or trained by us on other images (the set was
    re-rendered since). One without 'data' (the course's weights, or an older judge) is used as it is."""
    synthetic = rendering or os.path.isfile(os.path.join(data_dir, "synthetic.json"))
    if classifier or not synthetic:
        return False
    path = os.path.join(data_dir, "checkpoint.pth")
    if not os.path.isfile(path):
        return True
    data = trained_on(path)
    return data is not None and (rendering or data != train_fingerprint(data_dir))


def ensure_classifier(data_dir: str, classifier: str = None, device: str = "auto") -> str:
    """The judge's weights: `classifier` if given, else DATA_DIR/checkpoint.pth. On the synthetic set a missing one,
    or one we trained on other images, is trained there first (once); for the course's data only the course's weights
    are the judge, so none is made up. Returns the path, which exists unless the course's weights are missing."""
    path = classifier or os.path.join(data_dir, "checkpoint.pth")
    if not will_train_judge(data_dir, classifier):
        return path
    wait = CLASSIFIER_TIME[resolve_device(device).type]
    if os.path.isfile(path):  # the old judge stays until the new one is saved whole (save_checkpoint renames)
        print(f"the classifier {path} was trained on other images (the set was re-rendered since): training it "
              f"again ({wait})")
    else:
        print(f"no classifier at {path}: the data is synthetic, so training one there first (once: {wait})")
    train_classifier(make_parser().parse_args(["--train", "--data-dir", data_dir, "--out", path, "--device", device]))
    return path


def make_parser():
    p = Parser(description=__doc__)
    p.add_argument("--train", action="store_true", help="train the classifier on --data-dir and save it")
    p.add_argument("--data-dir", default="data/synthetic", help="i-CLEVR layout folder to train on")
    p.add_argument("--image-dir", default=None, help="image folder (default: DATA_DIR/iclevr)")
    p.add_argument("--out", default=None, help="where to save the weights (default: DATA_DIR/checkpoint.pth)")
    p.add_argument("--epochs", type=POSITIVE_INT, default=10, help="training epochs")
    p.add_argument("--batch-size", type=POSITIVE_INT, default=128, help="batch size")
    p.add_argument("--lr", type=POSITIVE, default=2e-3, help="peak learning rate (one-cycle)")
    p.add_argument("--val-fraction", type=Number(float, 0, 1, lo_open=True, hi_open=True, what="a fraction in (0, 1)"),
                   default=0.05, help="fraction of scenes held out for validation")
    p.add_argument("--seed", type=COUNT, default=0, help="random seed")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    return p


def main():
    p = make_parser()
    args = p.parse_args()
    if not args.train:
        p.print_help()
        return
    run_cli(train_classifier, args)


if __name__ == "__main__":
    main()
