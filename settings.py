"""A training run's settings: one dataclass, the presets, train.py's command line, and the one function that
decides a run's settings in one order: the defaults, then the preset, then the checkpoint (on --resume), then the
flags typed. What it returns is what the run saves in its checkpoint.
"""
import argparse
import os
from dataclasses import asdict, dataclass

from cli import COUNT, IMAGE_SIZE, POSITIVE, POSITIVE_INT, PROBABILITY, SWITCH, Number, Numbers, Parser, UserError
from device import PRECISIONS
from rundir import CKPT, read_checkpoint
from schedule import SAMPLERS, Diffusion


@dataclass
class Settings:
    """Every setting of a training run; the defaults are report C's (n_feat 128, 64x64, linear betas 1e-4..0.02 over
    T = 400, the condition dropped with probability 0.1 per sample, batch 128, Adam lr 1e-4, 300 epochs, seed 42)."""
    data_dir: str = None            # default: data/synthetic, rendered there if absent
    image_dir: str = None           # default: DATA_DIR/iclevr
    out_dir: str = "out"
    preset: str = None
    epochs: int = 300
    batch_size: int = 128           # global: under torchrun each of N processes takes batch_size / N
    lr: float = 1e-4
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    image_size: int = 64
    n_feat: int = 128
    T: int = 400
    beta1: float = 1e-4
    beta2: float = 0.02
    schedule: str = "linear"
    zero_snr: int = 0
    prediction: str = "eps"
    cond_bottleneck: int = 0
    cross_attn: int = 0
    adagn: int = 0
    cond_embed: str = "mlp"
    self_attn: int = 0
    min_snr: float = 0.0
    logsnr_draw: list = None        # [mean, std]: t drawn by a normal log-SNR; None: t uniform on 1..T (report C)
    drop_prob: float = 0.1
    ema_decay: float = 0.999
    hflip: int = 1
    draw_by_objects: int = 0
    sample_every: int = 25
    seed: int = 42
    minutes: float = 0.0
    save_every: float = 2.0
    eval_every: int = None          # None: 10 on a GPU, 0 (never) on a CPU
    val_w: float = 0.5
    val_sampler: str = "ddpm"       # what ranks checkpoints for best.pt; sample.py draws with DDPM 400 at val_w
    val_steps: int = 50
    val_draws: int = 1              # validation: the mean over this many draws (seeds 0, 1, ...)
    classifier: str = None
    device: str = "auto"
    precision: str = "auto"
    channels_last: str = "auto"
    fused_adam: str = "auto"
    compile: str = "auto"
    deterministic: int = 0
    resume: bool = False


DEFAULTS = Settings()
# settings that change the network or the noise process: a checkpoint is only valid with the same ones
MODEL_KEYS = ("image_size", "n_feat", "T", "beta1", "beta2", "schedule", "zero_snr", "prediction", "cond_bottleneck",
              "cross_attn", "adagn", "cond_embed", "self_attn")
NOT_SAVED = ("resume", "device")  # how this invocation runs, not what the run is
PRESETS = {
    # A CPU has few optimizer steps to spend, so the preset buys steps (32x32 images, batches of 16, lr 1e-3) and
    # spends them where the condition is decided: Min-SNR with g = 1, the condition at the bottleneck, and one token
    # per object that the S/4 and S/2 feature maps attend to. Budgeted by time; best.pt chosen on the validation list
    # at the README's w, by 8 DPM-Solver++ draws: one DDPM 400 draw costs more and moves as much as checkpoints
    # differ. Samples are upsampled to 64x64. Measured in docs/RESULTS.md.
    "cpu": dict(image_size=32, n_feat=32, batch_size=16, lr=1e-3, min_snr=1.0, cond_bottleneck=1, cross_attn=2,
                minutes=25.0, epochs=1000, eval_every=10, sample_every=5, val_sampler="dpm", val_steps=20,
                val_draws=8, val_w=4.0),
    # Not measured on a GPU yet: report C's network at 64x64 with what the CPU rows supported (Min-SNR g = 1, the
    # condition at the bottleneck, object tokens at S/4 and S/2, a constant lr above report C's), validated every 10
    # epochs by DDPM 400 at w 2 (about 2 s on an H200), for a 10-minute budget on one H100/H200.
    "gpu": dict(image_size=64, n_feat=128, batch_size=128, lr=2e-4, min_snr=1.0, cond_bottleneck=1, cross_attn=2,
                minutes=10.0, epochs=1000, eval_every=10, val_sampler="ddpm", val_w=2.0),
}
BETA = Number(float, 0, 1, lo_open=True, hi_open=True, what="a noise variance in (0, 1)")
N_FEAT = Number(int, lo=8, multiple=8, what="a multiple of 8 (the network's GroupNorms have 8 groups), such as 128")
ON_OFF = ("auto", "1", "0")
TRAIN_DOC = """Train a conditional ContextUnet DDPM on i-CLEVR with classifier-free guidance; defaults are report C's.

    python train.py --epochs 300                    # on a GPU: the synthetic set, rendered first if it is missing
    python train.py --data-dir ~/lab --epochs 300   # the course's files (objects.json, train.json, iclevr/*.png)
    python train.py --preset cpu                    # a small model that learns the condition in 25 minutes on a CPU
    python train.py --resume                        # continue OUT_DIR/ckpt.pt exactly where it stopped
"""


def make_parser() -> Parser:
    """train.py's command line. Its defaults are argparse.SUPPRESS, so that parsing yields only the flags typed; the
    help shows each setting's default from Settings."""
    p = Parser(defaults=DEFAULTS, description=TRAIN_DOC, argument_default=argparse.SUPPRESS)

    def add(flag, help, **kw):
        default = getattr(DEFAULTS, flag.lstrip("-").replace("-", "_"), None)
        shown = "" if kw.get("action") or "default" in help else f" (default: {default})"
        p.add_argument(flag, help=help + shown, **kw)

    add("--data-dir", "i-CLEVR folder (default: data/synthetic, rendered there if absent)")
    add("--image-dir", "training PNGs (default: DATA_DIR/iclevr)")
    add("--out-dir", "checkpoint, metrics log and progress grids")
    add("--preset", "a bundle of defaults (flags typed win)", choices=list(PRESETS))
    add("--epochs", "total epochs to train", type=POSITIVE_INT)
    add("--batch-size", "images per optimizer step, global: under torchrun each of N processes takes batch-size / N",
        type=POSITIVE_INT)
    add("--lr", "Adam learning rate", type=POSITIVE)
    add("--lr-schedule", "constant (report C), or cosine: from --lr to 0 over --minutes where set, else over --epochs",
        choices=["constant", "cosine"])
    add("--warmup-steps", "steps of linear learning-rate warm-up", type=COUNT)
    add("--image-size", "training resolution, divisible by 4", type=IMAGE_SIZE)
    add("--n-feat", "ContextUnet base width", type=N_FEAT)
    add("--T", "diffusion steps", type=Number(int, lo=2, what="an integer >= 2"))
    add("--beta1", "first beta of the schedule (below --beta2)", type=BETA)
    add("--beta2", "last beta of the schedule", type=BETA)
    add("--schedule", "noise schedule", choices=["linear", "cosine"])
    add("--zero-snr", "1: the schedule rescaled so that x_T is pure noise, as sampling assumes (needs --prediction v)",
        type=SWITCH)
    add("--prediction", "what the network predicts: the noise eps (report C) or v = sqrt(alphabar) eps - "
        "sqrt(1 - alphabar) x0", choices=["eps", "v"])
    add("--cond-bottleneck", "1: the condition also multiplies the bottleneck vector (c_e * h + t_e there too)",
        type=SWITCH)
    add("--cross-attn", "1: one token per object and cross-attention from the feature map to them at S/4; 2: at S/4 "
        "and S/2; 0: none, as report C", type=Number(int, 0, 2, what="0, 1 or 2"))
    add("--adagn", "1: GroupNorm with scale and shift from the time and condition embedding in every residual block, "
        "instead of BatchNorm", type=SWITCH)
    add("--self-attn", "1: self-attention among the positions of the S/4 feature map, after its cross-attention",
        type=SWITCH)
    add("--cond-embed", "the condition's embedding: Linear-GELU-Linear (report C) or one Linear layer",
        choices=["mlp", "linear"])
    add("--min-snr", "Min-SNR loss weighting min(SNR, g) / SNR (/ (SNR + 1) with --prediction v) with this g (5 in "
        "the paper); 0: plain MSE, as report C", type=Number(float, lo=0))
    add("--logsnr-draw", "MEAN,STD: draw each sample's t by its log-SNR log(alphabar / (1 - alphabar)) ~ N(MEAN, "
        "STD^2) within the schedule's range (0,2: gathered around SNR 1; a negative MEAN: --logsnr-draw=-1,2); "
        "default: t uniform on 1..T, as report C",
        type=Numbers(float, what="a finite number"), metavar="MEAN,STD")
    add("--drop-prob", "probability of dropping a sample's condition", type=PROBABILITY)
    add("--ema-decay", "EMA decay of the weights used for sampling",
        type=Number(float, 0, 1, hi_open=True, what="a decay in [0, 1)"))
    add("--hflip", "1: random horizontal flips (labels are sets of objects)", type=SWITCH)
    add("--draw-by-objects", "1: an epoch draws its images with replacement, each in proportion to its number of "
        "objects (i-CLEVR's 3-object scenes: half the draws, not a third)", type=SWITCH)
    add("--sample-every", "epochs between progress grids of the validation list (0: never)", type=COUNT)
    add("--seed", "random seed", type=COUNT)
    add("--minutes", "stop after this many minutes of training (at a step boundary), save, print the next command; "
        "0: no limit", type=Number(float, lo=0))
    add("--save-every", "minutes between checkpoints, written at the end of an epoch; also at every validation, at "
        "the end and at every stop; 0: every epoch", type=Number(float, lo=0))
    add("--eval-every", "epochs between validation scores and best.pt (default: 10 on a GPU, 0 = never on a CPU)",
        type=COUNT)
    add("--val-w", "guidance weight of the validation samples, and of the sampling command printed at the end",
        type=Number(float, lo=0, what="a guidance weight >= 0"))
    add("--val-sampler", "sampler of the validation samples: ddpm (all T steps; what the sampling command printed at "
        "the end draws), or ddim or dpm (DPM-Solver++) with --val-steps, faster", choices=SAMPLERS)
    add("--val-steps", "DDIM or DPM-Solver++ steps of validation", type=POSITIVE_INT)
    add("--val-draws", "validation scores the mean over this many draws of the list (seeds 0, 1, ...)",
        type=POSITIVE_INT)
    add("--classifier", "judge for validation (default: DATA_DIR/checkpoint.pth; on the synthetic set trained there "
        "first if missing)")
    add("--device", "auto, cpu or cuda")
    add("--precision", "auto: bf16 on GPUs that have it, fp16 + gradient scaling on older GPUs; on a CPU bf16 where "
        "it has AMX, else fp32", choices=PRECISIONS)
    add("--channels-last", "NHWC memory layout (auto: on CUDA and AMX CPUs)", choices=ON_OFF)
    add("--fused-adam", "one fused Adam kernel (auto: on CUDA)", choices=ON_OFF)
    add("--compile", "torch.compile the network (slower start, faster steps; auto: on CUDA where a C compiler is "
        "found, on a CPU in fp32 where a C++ compiler builds inductor's kernels)", choices=ON_OFF)
    add("--deterministic", "1: deterministic kernels only, for bit-exact resumes on CUDA (slower)", type=SWITCH)
    add("--resume", "continue from OUT_DIR/ckpt.pt, with its settings (flags typed win, except the network's)",
        action="store_true")
    return p


def decide(argv=None) -> Settings:
    """The run's settings, each taken from the last of: the defaults, the preset (typed, or the checkpoint's), the
    checkpoint's saved settings (on --resume), the flags typed. A network or noise-process setting typed on a resume
    must equal the checkpoint's; one the checkpoint predates takes its default (the network it built had it), not
    the preset's. The run's files stay where the checkpoint is read from: out_dir is never taken from it."""
    typed = vars(make_parser().parse_args(argv))
    saved = {}
    if typed.get("resume"):
        path = os.path.join(typed.get("out_dir", DEFAULTS.out_dir), CKPT)
        ckpt = read_checkpoint(path, "nothing to resume; drop --resume to start, or pass the run's --out-dir")
        saved = {k: v for k, v in ckpt["config"]["train"].items() if k in DEFAULTS.__dataclass_fields__}
        saved.update({k: getattr(DEFAULTS, k) for k in MODEL_KEYS if k not in saved})
        saved.setdefault("val_draws", 1)  # a run saved before --val-draws validated with one draw of its sampler
        for k in MODEL_KEYS:
            if k in typed and typed[k] != saved[k]:
                raise UserError(f"{path}: --{k.replace('_', '-')} {typed[k]} differs from the checkpoint's "
                                f"{saved[k]}; drop the flag to resume, or use a new --out-dir to start over")
        for k in ("out_dir", *NOT_SAVED):
            saved.pop(k, None)
    preset = typed.get("preset", saved.get("preset"))
    s = Settings(**{**asdict(DEFAULTS), **PRESETS.get(preset, {}), **saved, **typed})
    if s.beta1 >= s.beta2:
        raise UserError(f"--beta1 {s.beta1:g}: must be below --beta2 {s.beta2:g} (the betas rise with t)")
    if s.logsnr_draw is not None:
        text = ",".join(f"{v:g}" for v in s.logsnr_draw)
        if len(s.logsnr_draw) != 2 or s.logsnr_draw[1] <= 0:
            raise UserError(f"--logsnr-draw {text}: must be MEAN,STD with STD > 0, such as 0,2")
        try:
            Diffusion(s.T, s.beta1, s.beta2, s.schedule, s.zero_snr, s.prediction).t_probs(s.logsnr_draw)
        except ValueError as e:
            raise UserError(f"--logsnr-draw {text}: {str(e).split(': ', 1)[1]}; choose a MEAN inside it")
    if s.zero_snr and s.prediction == "eps":
        raise UserError("--zero-snr 1 with --prediction eps: at zero SNR the noise is x_T itself and says nothing of "
                        "the image; add --prediction v")
    return s


def saved_settings(s: Settings) -> dict:
    """What a checkpoint records of the settings: every one but how this invocation ran; input paths absolute, so
    that sample.py and evaluate.py find the data from any folder (out_dir is recorded, never read back)."""
    train = {k: v for k, v in asdict(s).items() if k not in NOT_SAVED}
    train.update({k: os.path.abspath(train[k]) for k in ("data_dir", "image_dir", "classifier") if train.get(k)})
    return train

