"""The maths of the forward (noising) and reverse (denoising) processes, and nothing else.

DDPM (Ho et al., arXiv 2006.11239) with linear betas, the improved-DDPM cosine schedule (Nichol and Dhariwal,
arXiv 2102.09672) as an option, classifier-free guidance (Ho and Salimans, arXiv 2207.12598) and the deterministic
DDIM update (Song et al., arXiv 2010.02502) and the multistep DPM-Solver++(2M) (Lu et al., arXiv 2211.01095); as
options, a schedule rescaled to zero terminal SNR and the network predicting v = sqrt(alphabar_t) eps -
sqrt(1 - alphabar_t) x0 instead of eps (Lin et al., arXiv 2305.08891).

Convention: every table has T + 1 entries indexed by the integer timestep t. t = 0 is the clean image
(beta_0 = 0, alphabar_0 = 1) and t = 1 is one noising step; training draws t from 1..T.

`Diffusion` is the one object that owns the noise process: the table, T and what the network predicts. train.py
calls its `loss`, sample.py and validation its `sample`; the functions before it are the papers' equations.
"""
import math

import torch
import torch.nn.functional as F
from tqdm import tqdm

from device import autocast, graphed, resolve_precision

SAMPLERS = ("ddpm", "ddim", "dpm")  # ancestral DDPM, deterministic DDIM, DPM-Solver++(2M)
LAMBDA_FLOOR = -5.0  # DPM-Solver++'s steps start no noisier than this log(alpha / sigma), besides t = T


def ddpm_schedules(beta1: float = 1e-4, beta2: float = 0.02, T: int = 400, kind: str = "linear",
                   zero_snr: bool = False, dtype: torch.dtype = torch.float32) -> dict:
    """Precomputed coefficients, each a tensor of shape (T + 1,) in dtype (float32 for the steps), computed in
    float64 so that the running product alphabar_t does not drift over hundreds of steps. zero_snr: sqrt(alphabar_t)
    shifted and scaled so that it keeps its value at t = 1 and reaches 0 at t = T (Lin et al., algorithm 1).
    Unrescaled, the linear schedule leaves sqrt(alphabar_T) = 0.13 of the image in x_T, which training sees and
    sampling (from pure noise) does not. Then beta_T = 1, and the eps form of the DDPM mean is singular at t = T
    (1 / sqrt(alpha_T) is inf): such a schedule is sampled with v-prediction, through the posterior mean around the
    predicted x0."""
    t = torch.arange(T + 1, dtype=torch.float64)
    if kind == "linear":
        beta_t = beta1 + (beta2 - beta1) * (t - 1) / max(T - 1, 1)  # beta_1 = beta1 ... beta_T = beta2
    elif kind == "cosine":
        s = 0.008  # offset so that beta_1 is not vanishingly small (improved DDPM, eq. 17)
        f = torch.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2
        alphabar = f / f[0]
        beta_t = (1 - alphabar[1:] / alphabar[:-1]).clamp(max=0.999)  # clamp avoids a singular last step
        beta_t = torch.cat([beta_t.new_zeros(1), beta_t])
    else:
        raise ValueError(f"unknown schedule {kind!r}: use 'linear' or 'cosine'")
    beta_t[0] = 0.0  # t = 0 is the clean image
    alphabar_t = torch.cumprod(1 - beta_t, dim=0)
    if zero_snr:
        root = alphabar_t.sqrt()
        root[1:] = (root[1:] - root[T]) * root[1] / (root[1] - root[T])
        alphabar_t = root.square()
        beta_t = torch.cat([beta_t.new_zeros(1), 1 - alphabar_t[1:] / alphabar_t[:-1]])  # beta_T = 1
    alpha_t = 1 - beta_t
    sqrtmab = torch.sqrt(1 - alphabar_t)
    table = {
        "beta_t": beta_t,                                          # beta_t
        "alpha_t": alpha_t,                                        # alpha_t = 1 - beta_t
        "oneover_sqrta": 1 / torch.sqrt(alpha_t),                  # 1 / sqrt(alpha_t)
        "sqrt_beta_t": torch.sqrt(beta_t),                         # sigma_t, DDPM's choice sigma_t^2 = beta_t
        "alphabar_t": alphabar_t,                                  # prod_{s<=t} alpha_s
        "sqrtab": torch.sqrt(alphabar_t),                          # sqrt(alphabar_t)
        "sqrtmab": sqrtmab,                                        # sqrt(1 - alphabar_t)
        "mab_over_sqrtmab": torch.where(t > 0, beta_t / sqrtmab.clamp(min=1e-12), 0.0),  # beta_t / sqrt(1 - ab_t)
    }
    # the posterior q(x_{t-1} | x_t, x_0) has mean coef_x0 * x_0 + coef_xt * x_t (DDPM eq. 7)
    alphabar_prev = torch.cat([alphabar_t.new_ones(1), alphabar_t[:-1]])
    one_minus_ab = (1 - alphabar_t).clamp(min=1e-12)
    # coef_x0 = sqrt(ab_{t-1}) beta_t / (1 - ab_t), coef_xt = sqrt(alpha_t) (1 - ab_{t-1}) / (1 - ab_t)
    table["coef_x0"] = torch.where(t > 0, alphabar_prev.sqrt() * beta_t / one_minus_ab, 0.0)
    table["coef_xt"] = torch.where(t > 0, alpha_t.sqrt() * (1 - alphabar_prev) / one_minus_ab, 0.0)
    return {k: v.to(dtype) for k, v in table.items()}


def _at(coef: torch.Tensor, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """coef[t] shaped (N, 1, 1, 1) to broadcast over images; t is an int tensor (N,) or a python int."""
    c = coef.to(x.device)[t]
    return c.view(-1, *([1] * (x.dim() - 1))) if c.dim() else c


def q_sample(x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, sched: dict) -> torch.Tensor:
    """x_t ~ q(x_t | x_0) = N(sqrt(alphabar_t) x_0, (1 - alphabar_t) I), reparameterised with eps."""
    return _at(sched["sqrtab"], t, x0) * x0 + _at(sched["sqrtmab"], t, x0) * eps


def guided_eps(eps_cond: torch.Tensor, eps_uncond: torch.Tensor, w: float) -> torch.Tensor:
    """Classifier-free guidance in the form eps = (1 + w) eps(x, c) - w eps(x, null): w = 0 is plain conditional
    sampling (others write the same thing with scale = 1 + w). Linear, so a v network's outputs are guided the
    same way: the guided v implies the guided eps."""
    return (1 + w) * eps_cond - w * eps_uncond


def v_target(x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, sched: dict) -> torch.Tensor:
    """v = sqrt(alphabar_t) eps - sqrt(1 - alphabar_t) x0 (Salimans and Ho, arXiv 2202.00512): at zero SNR, v = -x0,
    so the network still has something to predict where eps = x_t tells nothing."""
    return _at(sched["sqrtab"], t, x0) * eps - _at(sched["sqrtmab"], t, x0) * x0


def from_v(x_t: torch.Tensor, v_pred: torch.Tensor, t: int, sched: dict):
    """(x0, eps) from a v prediction: x0 = sqrt(alphabar_t) x_t - sqrt(1 - alphabar_t) v (unclipped) and
    eps = sqrt(alphabar_t) v + sqrt(1 - alphabar_t) x_t, both finite at every t (t = T of a zero-SNR schedule too)."""
    sqrtab, sqrtmab = sched["sqrtab"][t], sched["sqrtmab"][t]
    return sqrtab * x_t - sqrtmab * v_pred, sqrtab * v_pred + sqrtmab * x_t


def predict_x0(x_t: torch.Tensor, eps_pred: torch.Tensor, t: int, sched: dict,
               x0_pred: torch.Tensor = None) -> torch.Tensor:
    """x0 = (x_t - sqrt(1 - alphabar_t) eps) / sqrt(alphabar_t), clipped to the data range [-1, 1]. Unclipped, an
    error in eps is multiplied by sqrt(1 - alphabar_t) / sqrt(alphabar_t): about 250 at the cosine schedule's last
    step. Given x0_pred (a v network's x0), that one, clipped."""
    x0 = (x_t - sched["sqrtmab"][t] * eps_pred) / sched["sqrtab"][t] if x0_pred is None else x0_pred  # v's x0
    return x0.clamp(-1, 1)


def ddpm_step(x_t: torch.Tensor, eps_pred: torch.Tensor, t: int, z: torch.Tensor, sched: dict,
              clip_x0: bool = False, x0_pred: torch.Tensor = None) -> torch.Tensor:
    """One ancestral step x_t -> x_{t-1} = 1/sqrt(alpha_t) (x_t - beta_t / sqrt(1 - alphabar_t) eps) + sigma_t z.
    With clip_x0 the mean is the posterior's, coef_x0 * x0 + coef_xt * x_t, around the clipped x0 prediction: the
    same value whenever that prediction lies in [-1, 1]. Given x0_pred (from v), the posterior mean is taken around
    it (clipped with clip_x0), which is finite where the eps form is not. The caller passes z = 0 at t = 1 (no
    noise on the last step)."""
    if x0_pred is not None or clip_x0:  # the posterior mean around an x0: v's, or the clipped one from eps
        x0 = predict_x0(x_t, eps_pred, t, sched) if x0_pred is None else x0_pred  # predict_x0 clips already
        x0 = x0.clamp(-1, 1) if clip_x0 else x0
        mean = sched["coef_x0"][t] * x0 + sched["coef_xt"][t] * x_t
    else:
        mean = sched["oneover_sqrta"][t] * (x_t - sched["mab_over_sqrtmab"][t] * eps_pred)
    return mean + sched["sqrt_beta_t"][t] * z


def ddim_step(x_t: torch.Tensor, eps_pred: torch.Tensor, t: int, t_prev: int, sched: dict,
              x0_pred: torch.Tensor = None) -> torch.Tensor:
    """Deterministic DDIM (eta = 0) jump from t to t_prev < t: predict x0 (clipped), then re-noise it to t_prev
    along eps. The clip bounds the step: |x_{t_prev} - sqrt(1 - alphabar_{t_prev}) eps| <= sqrt(alphabar_{t_prev}).
    x0_pred: the x0 of a v prediction, used (clipped) in place of the one recovered from eps."""
    x0 = predict_x0(x_t, eps_pred, t, sched, x0_pred)
    return sched["sqrtab"][t_prev] * x0 + sched["sqrtmab"][t_prev] * eps_pred


def dpm_step(x_t: torch.Tensor, x0: torch.Tensor, x0_last: torch.Tensor, t: int, t_next: int, t_last: int,
             sched: dict) -> torch.Tensor:
    """One step of the multistep DPM-Solver++(2M) (Lu et al., arXiv 2211.01095, algorithm 2) from t to t_next < t,
    in the data prediction x0 (clipped by the caller). With alpha_t = sqrt(alphabar_t), sigma_t = sqrt(1 - alphabar_t)
    and lambda_t = log(alpha_t / sigma_t), h = lambda_{t_next} - lambda_t:
        x_{t_next} = sigma_{t_next} / sigma_t x_t - alpha_{t_next} (e^{-h} - 1) D,
    with D = x0 on the first step (it is then DDIM) and D = (1 + 1/(2r)) x0 - 1/(2r) x0_last after it, where
    r = h_last / h and x0_last is the previous step's x0 (at t_last). alpha_{t_next} (e^{-h} - 1) is written as
    alpha_t sigma_{t_next} / sigma_t - alpha_{t_next}, finite where alpha_t = 0 (t = T at zero SNR). The last step, to
    t = 0 (sigma_0 = 0), lands on x0: first order there, as the paper's solver ends."""
    if t_next == 0:
        return x0
    alpha, sigma = sched["sqrtab"], sched["sqrtmab"]
    d = x0
    if x0_last is not None:
        lam = lambda u: torch.log(alpha[u]) - torch.log(sigma[u])  # -inf at zero SNR: that step stays first order
        h, h_last = lam(t_next) - lam(t), lam(t) - lam(t_last)
        if torch.isfinite(h_last):
            r = h_last / h
            d = (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * x0_last
    ratio = sigma[t_next] / sigma[t]
    return ratio * x_t + (alpha[t_next] - alpha[t] * ratio) * d


def timesteps(T: int, sampler: str, steps: int, sched: dict = None) -> list:
    """The descending list of timesteps the sampler visits, ending at 0: every step for DDPM, `steps` evenly spaced
    jumps for DDIM. DPM-Solver++ (given the table) visits the t nearest to `steps` points evenly spaced in lambda_t =
    log(alpha_t / sigma_t) from t = T to t = 1, as its paper advises for small images (even steps in t leave the last
    jump, to t = 1, many times longer in lambda than the one before, and the 2M extrapolation across it large), and
    its last network evaluation, at t = 1, gives x0: a jump to sigma_0 = 0 would be infinite in lambda. At most
    `steps` evaluations (nearby points can share a t)."""
    steps = max(1, min(steps, T))
    if sampler == "ddpm":
        return list(range(T, -1, -1))
    if sampler == "dpm" and steps > 1:
        lam = (sched["sqrtab"][1:].double().log() - sched["sqrtmab"][1:].double().log())  # lambda_1 .. lambda_T
        # a floor for the noisiest end (-inf at zero SNR, far below -5 for the cosine schedule), where an even grid
        # would spend its steps on the first few t; T itself is always visited first
        floored = bool(lam[-1] < LAMBDA_FLOOR)
        grid = torch.linspace(max(float(lam[-1]), LAMBDA_FLOOR), float(lam[0]), steps - floored, dtype=torch.float64)
        nearest = {int((lam - g).abs().argmin()) + 1 for g in grid}
        return sorted(nearest | {T, 1}, reverse=True) + [0]
    return sorted({round(T * i / steps) for i in range(steps + 1)}, reverse=True)


class Diffusion:
    """The noise process of a run: the ddpm_schedules table, T and what the network predicts (eps or v). Built from a
    run's settings or a checkpoint's config (from_config); offers the training inputs and loss, and the samplers."""

    def __init__(self, T: int = 400, beta1: float = 1e-4, beta2: float = 0.02, schedule: str = "linear",
                 zero_snr: bool = False, prediction: str = "eps"):
        self.T, self.prediction = T, prediction
        self.config = {"T": T, "beta1": beta1, "beta2": beta2, "schedule": schedule, "zero_snr": int(zero_snr),
                       "prediction": prediction}  # what a checkpoint records of it
        self.table = ddpm_schedules(beta1, beta2, T, schedule, bool(zero_snr))
        self._on = {}  # the table on each device it was asked on
        self._t_cdf = {}  # the cumulative P(t) of each log-SNR draw asked for, on each device

    @classmethod
    def from_config(cls, cfg: dict) -> "Diffusion":
        """From a checkpoint's config; one saved before zero_snr and v existed predicts eps on the plain schedule."""
        return cls(cfg["T"], cfg["beta1"], cfg["beta2"], cfg["schedule"], bool(cfg.get("zero_snr", 0)),
                   cfg.get("prediction", "eps"))

    def on(self, device) -> dict:
        key = str(device)
        if key not in self._on:
            self._on[key] = {k: v.to(device) for k, v in self.table.items()}
        return self._on[key]

    def t_probs(self, logsnr_draw) -> torch.Tensor:
        """P(t) for t = 1..T (T,) in float64 when training draws the log-SNR lambda = log(alphabar / (1 - alphabar))
        from the normal N(mean, std^2) given as logsnr_draw = (mean, std), truncated to the table's range, and takes
        the t whose lambda_t is nearest: the normal's mass between the midpoints of neighbouring lambda_t. (0, 2) is
        the logit-normal t of Esser et al. (arXiv 2403.03206), which gathers the draws around SNR = 1."""
        mean, std = map(float, logsnr_draw)
        c = self.config
        ab = ddpm_schedules(c["beta1"], c["beta2"], self.T, c["schedule"], bool(c["zero_snr"]),
                            torch.float64)["alphabar_t"][1:]
        lam = (ab / (1 - ab)).log()  # decreasing in t
        if torch.isinf(lam[-1]) and self.T > 2:  # zero SNR at t = T: its bin as wide as the one before
            lam[-1] = 2 * lam[-2] - lam[-3]
        edges = torch.cat([lam[:1], (lam[:-1] + lam[1:]) / 2, lam[-1:]])  # T + 1 edges, the ends the range's
        if not lam[-1] <= mean <= lam[0]:  # else nearly all of it would pile up at one end
            raise ValueError(f"log-SNR draw {mean:g},{std:g}: MEAN {mean:g} is outside the schedule's log-SNR "
                             f"range [{lam[-1].item():.2f}, {lam[0].item():.2f}]")
        z = (edges - mean) / std
        # the normal's mass between neighbouring edges, from its nearer tail (ndtr rounds to 1 far above 0)
        ndtr = torch.special.ndtr
        mass = torch.where(z[1:] > 0, ndtr(-z[1:]) - ndtr(-z[:-1]), ndtr(z[:-1]) - ndtr(z[1:]))
        return mass / mass.sum()

    def draw_t(self, n: int, device, gen: torch.Generator = None, logsnr_draw=None) -> torch.Tensor:
        """n integer timesteps in 1..T: uniform, or by t_probs(logsnr_draw), by inverting its cumulative sum (one
        uniform draw each: deterministic on CUDA, where multinomial is not in every torch)."""
        if not logsnr_draw:
            return torch.randint(1, self.T + 1, (n,), device=device, generator=gen)  # t = 1 is one noising step
        key = (*map(float, logsnr_draw), str(device))
        if key not in self._t_cdf:
            self._t_cdf[key] = self.t_probs(logsnr_draw).cumsum(0).to(device)
        cdf = self._t_cdf[key]
        u = torch.rand(n, device=device, generator=gen, dtype=torch.float64)
        return torch.searchsorted(cdf, u, right=True).clamp(max=self.T - 1) + 1

    def noisy(self, x0: torch.Tensor, cond: torch.Tensor, drop_prob: float, gen: torch.Generator = None,
              logsnr_draw=None):
        """What the network is trained on: x_t ~ q(x_t | x0) at a t drawn per sample from 1..T (uniform, or by
        t_probs(logsnr_draw)), and the condition with a per-sample coin for classifier-free dropout (all zeros is
        "no condition"). x0 (B, C, S, S) in [-1, 1], cond (B, 24) multi-hot. Returns (x_t, cond with dropped rows
        zeroed, integer t (B,), eps); gen: a generator of its own, or the global one."""
        sched, bs = self.on(x0.device), x0.shape[0]
        keep = (torch.rand(bs, device=x0.device, generator=gen) >= drop_prob).to(cond.dtype)
        t = self.draw_t(bs, x0.device, gen, logsnr_draw)
        eps = torch.randn(x0.shape, device=x0.device, generator=gen)
        return q_sample(x0, t, eps, sched), cond * keep[:, None], t, eps

    def loss(self, net, x0: torch.Tensor, cond: torch.Tensor, drop_prob: float, min_snr: float = 0.0,
             precision: str = "fp32", channels_last: bool = False, logsnr_draw=None) -> torch.Tensor:
        """The DDPM objective ||eps - eps_pred(x_t, c, t)||^2 with condition dropout (||v - v_pred||^2 for v). The
        network is given t / T, in [0, 1]. With min_snr = g, each sample's error is weighted by min(SNR_t, g) /
        SNR_t (Min-SNR, arXiv 2303.09556): the nearly clean steps, where the image already says everything, stop
        dominating the gradient. For v the weight is min(SNR_t, g) / (SNR_t + 1), the same weight on the error of
        the implied x0. logsnr_draw: how t is drawn (noisy)."""
        sched = self.on(x0.device)
        x_t, c, t, eps = self.noisy(x0, cond, drop_prob, logsnr_draw=logsnr_draw)
        target = eps if self.prediction == "eps" else v_target(x0, t, eps, sched)
        if channels_last:
            x_t = x_t.contiguous(memory_format=torch.channels_last)
        with autocast(x0.device, precision):
            pred = net(x_t, c, t.float() / self.T)
        if not min_snr:
            return F.mse_loss(pred.float(), target)
        alphabar = sched["alphabar_t"][t]
        snr = alphabar / (1 - alphabar)
        per_sample = (pred.float() - target).square().mean(dim=(1, 2, 3))
        return (per_sample * snr.clamp(max=min_snr) / (snr if self.prediction == "eps" else snr + 1)).mean()

    @torch.inference_mode()
    def sample(self, model, cond: torch.Tensor, w: float = 0.5, sampler: str = "ddpm", steps: int = 50,
               seed: int = 0, n_frames: int = 0, precision: str = "auto", clip_x0: bool = False,
               w_interval=(0.0, 1.0), batched_guidance: bool = True, cuda_graph: bool = False, progress: bool = False):
        """Draw one image per row of cond (N, 24) with guidance eps = (1 + w) eps(x, c) - w eps(x, null). Returns x0
        (N, 3, S, S) in [-1, 1] and, if n_frames > 1, that many snapshots of x_t from pure noise to the result.
        The noise comes from its own generator seeded with `seed`, so the output does not depend on what ran before;
        x_T comes from a CPU generator, so the deterministic samplers give the same images on every device.
        steps: the jumps of DDIM and DPM-Solver++ (DDPM takes all T). clip_x0: DDPM's mean around the clipped x0
        (DDIM and DPM-Solver++ always clip). w_interval (lo, hi): guidance only where lo <= t / T <= hi (arXiv
        2404.07724). cuda_graph: on CUDA each step's forward replayed from a CUDA graph (the same arithmetic)."""
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}: use one of {', '.join(SAMPLERS)}")
        device = next(model.parameters()).device
        sched, T = self.on(device), self.T
        size = model.config["image_size"]
        gen = torch.Generator(device).manual_seed(seed)  # DDPM's per-step noise, drawn where the model runs
        start = gen if device.type == "cpu" else torch.Generator().manual_seed(seed)
        n = cond.shape[0]
        cond = cond.to(device)
        null = torch.zeros_like(cond)  # all zeros is "no condition", as in training
        x_t = torch.randn(n, model.config["in_channels"], size, size, generator=start).to(device)
        ts = timesteps(T, sampler, steps, sched)
        record = {round(i * (len(ts) - 1) / (n_frames - 1)) for i in range(n_frames)} if n_frames > 1 else set()
        frames = [x_t.float().cpu()] if 0 in record else []
        precision = resolve_precision(precision, device)
        net = graphed(model, device, precision) if cuda_graph and device.type == "cuda" else model
        x0_last, t_last = None, None  # DPM-Solver++'s previous x0 and its t
        for i, (t, t_next) in enumerate(tqdm(list(zip(ts[:-1], ts[1:])), desc=f"sampling ({sampler})",
                                             disable=not progress, leave=False)):
            t_in = torch.full((n,), t / T, device=device)  # the net sees t scaled to [0, 1]
            guided = w != 0 and w_interval[0] <= t / T <= w_interval[1]
            with autocast(device, precision):
                if not guided:
                    out = net(x_t, cond, t_in).float()
                elif batched_guidance:  # conditional and unconditional halves in one forward pass of 2N
                    out_c, out_u = net(torch.cat([x_t, x_t]), torch.cat([cond, null]), t_in.repeat(2)).float().chunk(2)
                    out = guided_eps(out_c, out_u, w)
                else:
                    out = guided_eps(net(x_t, cond, t_in).float(), net(x_t, null, t_in).float(), w)
            x0, eps = from_v(x_t, out, t, sched) if self.prediction == "v" else (None, out)
            if sampler == "ddpm":
                z = torch.randn(x_t.shape, generator=gen, device=device) if t > 1 else torch.zeros_like(x_t)
                x_t = ddpm_step(x_t, eps, t, z, sched, clip_x0, x0)
            elif sampler == "ddim":
                x_t = ddim_step(x_t, eps, t, t_next, sched, x0)
            else:
                x0 = predict_x0(x_t, eps, t, sched, x0)
                x_t, x0_last, t_last = dpm_step(x_t, x0, x0_last, t, t_next, t_last, sched), x0, t
            if i + 1 in record:
                frames.append(x_t.float().cpu())
        return x_t.float().clamp(-1, 1).cpu(), frames
