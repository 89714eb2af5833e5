"""Speed and memory of training, sampling and data loading, each beside the plain way of doing the same thing.

    python bench.py                  # the default model (n_feat 128, 64x64, batch 128) on whatever device is here
    python bench.py --quick          # a small configuration that finishes in about a minute on a 2-core CPU

"fast" is what train.py and sample.py do: the data set held as one uint8 tensor on the device, bf16 autocast and
channels_last on CUDA, guidance as one batched forward pass of 2N; for sampling, BatchNorm folded into the
convolutions and channels_last on any device. "plain" is float32, no channels_last,
conditional and unconditional passes run separately, and PNGs decoded every epoch by a DataLoader.
FLOPs are counted with torch.utils.flop_counter (one multiply-add = 2 FLOPs); the peak is a large matrix product
timed in the same run. Prints a table and writes it as JSON (--json).
"""
import argparse
import json
import os
import platform
import resource
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from dataset import HelpFormatter, load_train, make_batch, read_image
from evaluator import resolve_device
from model import ContextUnet, fold_batchnorm
from sample import sample_images
from schedule import ddpm_schedules
from train import diffusion_loss


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeat=1):
    sync(device)
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / repeat


def matmul_peak(device) -> float:
    """FLOP/s of a large square matrix product in the precision training uses (bf16 on CUDA, float32 on CPU)."""
    n, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (2048, torch.float32)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    timed(lambda: a @ b, device)
    # the best of several timings: a peak, so a moment of contention from elsewhere does not lower the bar
    return max(2 * n ** 3 / timed(lambda: a @ b, device, repeat=10 if device.type == "cuda" else 1) for _ in range(5))


def counted_flops(model, size, backward=False) -> float:
    """FLOPs per image of one forward pass (and its backward pass, if asked), counted on a batch of 2."""
    x, c, t = torch.randn(2, 3, size, size), torch.zeros(2, 24), torch.rand(2)
    model = model.cpu().train()
    with FlopCounterMode(display=False) as counter:
        out = model(x, c, t)
        if backward:
            out.square().mean().backward()
    return counter.get_total_flops() / 2


def peak_memory(device) -> float:
    """GiB: GPU memory on CUDA (reset between measurements), the process's peak resident memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


class PngDataset(torch.utils.data.Dataset):
    """The plain input pipeline: every item decoded from its PNG and resized, every epoch."""

    def __init__(self, files, size):
        self.files, self.size = files, size

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        return torch.from_numpy(read_image(self.files[i], self.size)).permute(2, 0, 1).float() / 127.5 - 1


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--data-dir", default="data/synthetic", help="i-CLEVR folder for the data-loading rows")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--n-feat", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--T", type=int, default=400, help="DDPM steps for the sampling rows")
    p.add_argument("--train-steps", type=int, default=20, help="timed training steps per mode")
    p.add_argument("--quick", action="store_true", help="32px, n_feat 32, batch 32, T 100, few steps: about a minute on a CPU")
    p.add_argument("--no-sample", action="store_true", help="skip the sampling rows (the default model on a CPU "
                                                               "takes most of an hour to sample a split)")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", default=None, help="also write the figures here")
    args = p.parse_args()
    if args.quick:
        args.image_size, args.n_feat, args.batch_size, args.T, args.train_steps = 32, 32, 32, 100, 5
    device = resolve_device(args.device)
    torch.manual_seed(0)
    model = ContextUnet(n_feat=args.n_feat, image_size=args.image_size)
    flops = counted_flops(model, args.image_size)
    train_flops = counted_flops(model, args.image_size, backward=True)
    peak = matmul_peak(device)
    print(f"device {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else platform.processor() or 'cpu'}, "
          f"{torch.get_num_threads()} threads); ContextUnet n_feat {args.n_feat}, {args.image_size}px; "
          f"{flops / 1e9:.3f} GFLOP per image forward, {train_flops / 1e9:.3f} forward + backward; "
          f"matmul peak {peak / 1e12:.3f} TFLOP/s")

    sched = {k: v.to(device) for k, v in ddpm_schedules(T=args.T).items()}
    cond = (torch.rand(args.batch_size, 24, device=device) < 0.08).float()
    x0 = torch.rand(args.batch_size, 3, args.image_size, args.image_size, device=device) * 2 - 1
    result = {}
    for mode in ("fast", "plain"):
        fast = mode == "fast"
        net = ContextUnet(n_feat=args.n_feat, image_size=args.image_size).to(device)
        if fast and device.type == "cuda":
            net = net.to(memory_format=torch.channels_last)
        opt = torch.optim.Adam(net.parameters(), lr=1e-4, fused=fast and device.type == "cuda")
        bf16 = fast and device.type == "cuda"

        def step():
            loss = diffusion_loss(net, x0, cond, sched, 0.1, bf16)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        step()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        per_step = timed(step, device, args.train_steps)
        r = {"train_img_s": args.batch_size / per_step, "train_mem_gib": peak_memory(device)}
        r["train_mfu"] = train_flops * r["train_img_s"] / peak
        if fast:  # sampling folds BatchNorm into the convolutions and uses channels_last, as sample.py does
            net = fold_batchnorm(net.eval()).to(memory_format=torch.channels_last)
        net.eval()
        split = cond[:32] if len(cond) >= 32 else cond.repeat(32 // len(cond) + 1, 1)[:32]
        for sampler, steps in ((("ddpm", args.T), ("ddim", 50)) if not args.no_sample else ()):
            run = lambda: sample_images(net, split, sched, w=0.5, sampler=sampler, steps=steps,
                                        batched_guidance=fast, bf16=bf16)
            run()  # warm-up
            seconds = timed(run, device)
            r[f"{sampler}_s"] = seconds
            n_fwd = min(steps, args.T) * 64  # 32 conditional + 32 unconditional forwards per step
            r[f"{sampler}_mfu"] = flops * n_fwd / seconds / peak
        result[mode] = r

    # one epoch of input pipeline alone: device-resident uint8 gather vs DataLoader decoding PNGs
    if os.path.isfile(os.path.join(args.data_dir, "train.json")):
        images, _ = load_train(args.data_dir, image_size=args.image_size)
        images = images.to(device)
        n = len(images) if not args.quick else min(len(images), 2048)
        def fast_epoch():
            perm = torch.randperm(n, device=device)
            for i in range(0, n - args.batch_size + 1, args.batch_size):
                make_batch(images, perm[i:i + args.batch_size], True)
        with open(os.path.join(args.data_dir, "train.json")) as f:
            files = [os.path.join(args.data_dir, "iclevr", name) for name in list(json.load(f))[:n]]
        loader = torch.utils.data.DataLoader(PngDataset(files, args.image_size), batch_size=args.batch_size,
                                             shuffle=True, num_workers=min(4, os.cpu_count()), drop_last=True)
        def plain_epoch():
            for xb in loader:
                xb.to(device)
        result["fast"]["load_epoch_s"] = timed(fast_epoch, device) * len(images) / n
        result["plain"]["load_epoch_s"] = timed(plain_epoch, device) * len(images) / n
        train_epoch_s = len(images) / result["fast"]["train_img_s"]
        result["fast"]["load_share"] = result["fast"]["load_epoch_s"] / train_epoch_s
        result["plain"]["load_share"] = result["plain"]["load_epoch_s"] / (len(images) / result["plain"]["train_img_s"])
    else:
        print(f"(no data at {args.data_dir}: data-loading rows skipped; render it with python synthetic.py)")

    names = {"train_img_s": ("training throughput", "img/s", True), "train_mfu": ("training FLOP/s / matmul peak", "", True),
             "train_mem_gib": ("peak memory, training", "GiB", False),
             "ddpm_s": (f"sample 32 images, DDPM {args.T} steps, w=0.5", "s", False),
             "ddpm_mfu": ("  its FLOP/s / matmul peak", "", True),
             "ddim_s": ("sample 32 images, DDIM 50 steps, w=0.5", "s", False), "ddim_mfu": ("  its FLOP/s / matmul peak", "", True),
             "load_epoch_s": ("data loading alone, one epoch", "s", False),
             "load_share": ("  as a share of a training epoch", "", False)}
    print(f"\n{'':48s} {'fast':>10s} {'plain':>10s} {'fast gain':>10s}")
    for key, (label, unit, higher_better) in names.items():
        if key not in result["fast"]:
            continue
        f, pl = result["fast"][key], result["plain"][key]
        gain = (f / pl if higher_better else pl / f) if f and pl else float("nan")
        fmt = (lambda v: f"{100 * v:9.1f}%") if unit == "" else (lambda v: f"{v:10.3f}" if v < 100 else f"{v:10.0f}")
        print(f"{label + (' (' + unit + ')' if unit else ''):48s} {fmt(f)} {fmt(pl)} {gain:9.2f}x")
    if device.type == "cpu":
        print("(on CPU the resident-memory figure is the whole process's peak so far, not per mode)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": str(device), "args": vars(args), "gflop_per_image": flops / 1e9,
                       "train_gflop_per_image": train_flops / 1e9,
                       "matmul_peak_tflops": peak / 1e12, **result}, f, indent=1)


if __name__ == "__main__":
    main()
