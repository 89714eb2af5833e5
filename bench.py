"""Speed and memory of training, sampling and data loading, each beside the plain way of doing the same thing.

    python bench.py                  # the default model (n_feat 128, 64x64, batch 128) on whatever device is here
    python bench.py --quick          # a small configuration that finishes in about a minute on a 2-core CPU
    python bench.py --preset cpu     # exactly the CPU preset's network, image size and batch

"fast" is what train.py and sample.py do by default: train.py's own step function (batch gathered from one uint8
tensor on the device, the per-step loss sync, the EMA update), the precision --precision resolves to (bf16 or fp16
on a GPU), channels_last and fused Adam on CUDA, guidance as one batched forward pass of 2N; for sampling,
BatchNorm folded into the convolutions and channels_last on any device. "plain" is float32 with TF32 off, NCHW,
for-each Adam, conditional and unconditional passes run separately, and PNGs decoded every epoch by a DataLoader.
The cost of each save (EMA BatchNorm statistics and the checkpoint write) is its own row.
FLOPs are counted with torch.utils.flop_counter (one multiply-add = 2 FLOPs); the peak is a large matrix product
timed in the same run. Prints a table and writes it as JSON (--json).
"""
import copy
import json
import os
import platform
import tempfile
import time

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

from cli import COUNT, IMAGE_SIZE, POSITIVE_INT, SWITCH, Number, Parser
from dataset import ICLEVR_TRAIN_IMAGES, load_train, make_batch, read_image
from device import (DTYPES, PRECISIONS, cpu_bf16_fast, resolve_channels_last, resolve_device, resolve_precision,
                    resolve_switch, setup_backends)
from model import fold_batchnorm
from rundir import save_checkpoint
from settings import PRESETS, Settings
from train import bn_batches, build_model, make_trainer, refresh_bn_stats, train_step



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


def matmul_peak(device, precision: str = "fp32") -> float:
    """FLOP/s of a large square matrix product in the given precision (bf16, fp16 or fp32 as each row runs; fp32
    with TF32 off, as setup_backends leaves it for fp32): each row's share is of the peak it could reach."""
    n = 8192 if device.type == "cuda" else 2048
    # a CPU's half-precision matmuls are emulated (not its peak), except bf16 where the CPU runs it fast
    dtype = DTYPES[precision] if device.type == "cuda" or (precision == "bf16" and cpu_bf16_fast()) else torch.float32
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    timed(lambda: a @ b, device)
    # the best of several timings: a peak, so a moment of contention from elsewhere does not lower the bar
    return max(2 * n ** 3 / timed(lambda: a @ b, device, repeat=10 if device.type == "cuda" else 1) for _ in range(5))


def profiled(fn, device, title: str, rows: int, repeat: int = 1) -> str:
    """Where fn's time goes: torch.profiler's top rows by self time on the GPU (on a CPU, by the CPU's own)."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(repeat):
            fn()
        sync(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=50)
    return f"\n{title}, top {rows} operators by {key.replace('_total', '')}:\n{table}"


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
    try:
        import resource  # POSIX only: on Windows the CPU's peak is not read
    except ImportError:
        return float("nan")
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


class PngDataset(torch.utils.data.Dataset):
    """The plain input pipeline: every item decoded from its PNG and resized, every epoch."""

    def __init__(self, files, size):
        self.files, self.size = files, size

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        return torch.from_numpy(read_image(self.files[i], self.size)).permute(2, 0, 1).float() / 127.5 - 1


def make_parser():
    p = Parser(description=__doc__)
    p.add_argument("--data-dir", default="data/synthetic", help="i-CLEVR folder for the data-loading rows")
    p.add_argument("--preset", default=None, choices=list(PRESETS), help="time exactly this preset's network (its "
                   "options, width, image size and batch) instead of report C's")
    p.add_argument("--image-size", type=IMAGE_SIZE, default=None, help="default: 64, or the preset's")
    p.add_argument("--n-feat", type=POSITIVE_INT, default=None, help="default: 128, or the preset's")
    p.add_argument("--batch-size", type=POSITIVE_INT, default=None, help="default: 128, or the preset's")
    p.add_argument("--T", type=Number(int, lo=50, what="an integer >= 50 (DDIM takes 50 steps)"), default=400,
                   help="DDPM steps for the sampling rows")
    p.add_argument("--train-steps", type=POSITIVE_INT, default=20, help="timed training steps per mode")
    p.add_argument("--quick", action="store_true",
                   help="32px, n_feat 32, batch 32, T 100, few steps: about a minute on a CPU")
    p.add_argument("--no-sample", action="store_true", help="skip the sampling rows (the default model on a CPU "
                                                               "takes most of an hour to sample a split)")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto", choices=PRECISIONS, help="fast mode's precision (plain is fp32)")
    p.add_argument("--channels-last", default="auto", choices=["auto", "1", "0"],
                   help="fast mode's layout (auto: on CUDA and AMX CPUs)")
    p.add_argument("--fused-adam", default="auto", choices=["auto", "1", "0"], help="fast mode's Adam (auto: on CUDA)")
    p.add_argument("--compile", type=SWITCH, default=0, help="1: add a column with the training step torch.compiled")
    p.add_argument("--cuda-graph", type=SWITCH, default=0,
                   help="1: fast mode's sampling rows replay each step's forward "
                        "from a CUDA graph (sample.py --cuda-graph 1)")
    p.add_argument("--profile", type=COUNT, default=0,
                   help="N > 0: after the table, the top N operators of 5 fast training "
                        "steps and of one fast DDIM 50 draw (torch.profiler)")
    p.add_argument("--json", default=None, help="also write the figures here")
    return p


def get_args(argv=None):
    return make_parser().parse_args(argv)


def main(argv=None):
    run(get_args(argv))


def run(args):
    if args.quick:
        args.image_size, args.n_feat, args.batch_size, args.T, args.train_steps = 32, 32, 32, 100, 5
    preset = PRESETS.get(args.preset, {})
    for k, default in (("image_size", 64), ("n_feat", 128), ("batch_size", 128)):
        setattr(args, k, getattr(args, k) or preset.get(k, default))
    hp = Settings(**{**preset, "n_feat": args.n_feat, "image_size": args.image_size, "batch_size": args.batch_size,
                     "T": args.T, "seed": 0})
    device = resolve_device(args.device)
    precision = resolve_precision(args.precision, device)
    cl = resolve_channels_last(args.channels_last, device)
    fused = resolve_switch(args.fused_adam, device, "--fused-adam")
    torch.manual_seed(0)
    model = build_model(hp, torch.eye(24)[:3].sum(0, keepdim=True))  # i-CLEVR's 3 object tokens
    flops = counted_flops(model, args.image_size)
    train_flops = counted_flops(model, args.image_size, backward=True)
    setup_backends(device, "fp32")  # each row's peak in its own precision; fp32's with TF32 off, as that row runs
    peaks = {p: matmul_peak(device, p) for p in dict.fromkeys([precision, "fp32"])}
    peak = peaks[precision]
    print(f"device {device} "
          f"({torch.cuda.get_device_name() if device.type == 'cuda' else platform.processor() or 'cpu'}, "
          f"{torch.get_num_threads()} threads); ContextUnet n_feat {args.n_feat}, {args.image_size}px"
          f"{f' (--preset {args.preset})' if args.preset else ''}; "
          f"{flops / 1e9:.3f} GFLOP per image forward, {train_flops / 1e9:.3f} forward + backward; "
          f"matmul peak " + ", ".join(f"{p} {v / 1e12:.3f}" for p, v in peaks.items()) + " TFLOP/s")

    n_images = max(1024, 4 * args.batch_size)  # random uint8 images, gathered from the device as train.py does
    images = torch.randint(0, 256, (n_images, 3, args.image_size, args.image_size), dtype=torch.uint8, device=device)
    cond = torch.zeros(n_images, 24, device=device).scatter_(1, torch.randint(24, (n_images, 3), device=device), 1.0)
    modes = {"fast": (precision, cl, fused, False), "plain": ("fp32", False, False, False)}
    if args.compile:
        modes["compiled"] = (precision, cl, fused, True)
    result, profiles = {}, []
    for mode, (prec, channels_last, fused_adam, compiled) in modes.items():
        setup_backends(device, prec)  # plain: fp32 is float32, TF32 off
        peak = peaks[prec]  # the share of the peak in this row's own precision
        torch.manual_seed(0)
        r = make_trainer(hp, device, prec, channels_last, fused_adam, images, cond)
        if compiled:
            r.net = torch.compile(r.model)
        perm = torch.randperm(n_images, device=device)
        batches = iter(range(10 ** 9))

        def step():  # train.py's step: gather, loss, per-step loss sync, backward, Adam, EMA
            b = next(batches) % (n_images // args.batch_size)
            train_step(r, perm[b * args.batch_size:(b + 1) * args.batch_size], b, False)

        for _ in range(3 if compiled else 1):
            step()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        per_step = timed(step, device, args.train_steps)
        res = {"train_img_s": args.batch_size / per_step, "train_mem_gib": peak_memory(device)}
        if args.profile and mode == "fast":
            profiles.append(profiled(step, device, f"{mode}: 5 training steps", args.profile, repeat=5))
        res["train_mfu"] = train_flops * res["train_img_s"] / peak
        with tempfile.TemporaryDirectory() as tmp:  # what train.py adds at each save: EMA statistics and the write
            def save():
                refresh_bn_stats(r.ema, bn_batches(images, cond, r.diffusion, 0.1, 0, 1024, args.batch_size), prec,
                                 channels_last)
                save_checkpoint({"model": r.model.state_dict(), "ema": r.ema.state_dict(),
                                 "optimizer": r.opt.state_dict()}, os.path.join(tmp, "ckpt.pt"))
            res["ckpt_s"] = timed(save, device)
        res["ckpt_share"] = res["ckpt_s"] / (ICLEVR_TRAIN_IMAGES / res["train_img_s"] + res["ckpt_s"])
        net = r.ema.eval()
        if mode != "plain":  # sampling folds BatchNorm into the convolutions and uses channels_last, as sample.py does
            net = fold_batchnorm(copy.deepcopy(net)).to(memory_format=torch.channels_last)
        split = cond[:32]
        rows = (("ddpm", args.T), ("ddim", 50), ("dpm", 20))
        for sampler, steps in (rows if not args.no_sample and not compiled else ()):
            draw = lambda: r.diffusion.sample(net, split, w=0.5, sampler=sampler, steps=steps,
                                              batched_guidance=mode != "plain", precision=prec,
                                              cuda_graph=bool(args.cuda_graph) and mode == "fast")
            draw()  # warm-up
            seconds = timed(draw, device)
            res[f"{sampler}_s"] = seconds
            n_fwd = min(steps, args.T) * 64  # 32 conditional + 32 unconditional forwards per step
            res[f"{sampler}_mfu"] = flops * n_fwd / seconds / peak
            if args.profile and mode == "fast" and sampler == "ddim":
                profiles.append(profiled(draw, device, f"{mode}: one DDIM 50 draw of 32 images", args.profile))
        result[mode] = res

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

    names = {"train_img_s": ("training throughput", "img/s", True),
             "train_mfu": ("training FLOP/s / matmul peak", "", True),
             "train_mem_gib": ("peak memory, training", "GiB", False),
             "ckpt_s": ("EMA statistics + checkpoint, per save", "s", False),
             "ckpt_share": ("  its share of an epoch, if saved every epoch", "", False),
             "ddpm_s": (f"sample 32 images, DDPM {args.T} steps, w=0.5", "s", False),
             "ddpm_mfu": ("  its FLOP/s / matmul peak", "", True),
             "ddim_s": ("sample 32 images, DDIM 50 steps, w=0.5", "s", False),
             "ddim_mfu": ("  its FLOP/s / matmul peak", "", True),
             "dpm_s": ("sample 32 images, DPM-Solver++ 20 steps, w=0.5", "s", False),
             "dpm_mfu": ("  its FLOP/s / matmul peak", "", True),
             "load_epoch_s": ("data loading alone, one epoch", "s", False),
             "load_share": ("  as a share of a training epoch", "", False)}
    print(f"\nfast: {precision}{', channels_last' if cl else ''}{', fused Adam' if fused else ''}"
          f"{', sampling from CUDA graphs' if args.cuda_graph and device.type == 'cuda' else ''}; plain: fp32 "
          f"(TF32 off), NCHW, Adam for-each" + ("; compiled: fast + torch.compile" if args.compile else ""))
    print(f"{'':48s} {'fast':>10s} {'plain':>10s} {'fast gain':>10s}" + (f" {'compiled':>10s}" if args.compile else ""))
    for key, (label, unit, higher_better) in names.items():
        if key not in result["fast"]:
            continue
        f, pl = result["fast"][key], result["plain"][key]
        gain = (f / pl if higher_better else pl / f) if f and pl else float("nan")
        fmt = (lambda v: f"{100 * v:9.1f}%") if unit == "" else (lambda v: f"{v:10.3f}" if v < 100 else f"{v:10.0f}")
        extra = f" {fmt(result['compiled'][key])}" if key in result.get("compiled", {}) else ""
        print(f"{label + (' (' + unit + ')' if unit else ''):48s} {fmt(f)} {fmt(pl)} {gain:9.2f}x{extra}")
    print("".join(profiles), end="")
    if device.type == "cpu":
        print("(on CPU the resident-memory figure is the whole process's peak so far, not per mode)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": str(device), "args": vars(args), "gflop_per_image": flops / 1e9,
                       "train_gflop_per_image": train_flops / 1e9,
                       "matmul_peak_tflops": {p: v / 1e12 for p, v in peaks.items()}, **result}, f, indent=1)


if __name__ == "__main__":
    main()
