"""The maths of the forward (noising) and reverse (denoising) processes, and nothing else.

DDPM (Ho et al., arXiv 2006.11239) with linear betas, the improved-DDPM cosine schedule (Nichol and Dhariwal,
arXiv 2102.09672) as an option, classifier-free guidance (Ho and Salimans, arXiv 2207.12598) and the deterministic
DDIM update (Song et al., arXiv 2010.02502); as options, a schedule rescaled to zero terminal SNR and the network
predicting v = sqrt(alphabar_t) eps - sqrt(1 - alphabar_t) x0 instead of eps (Lin et al., arXiv 2305.08891).

Convention: every table has T + 1 entries indexed by the integer timestep t. t = 0 is the clean image
(beta_0 = 0, alphabar_0 = 1) and t = 1 is one noising step; training draws t from 1..T.
"""
import math

import torch


def ddpm_schedules(beta1: float = 1e-4, beta2: float = 0.02, T: int = 400, kind: str = "linear",
                   zero_snr: bool = False) -> dict:
    """Precomputed coefficients, each a float32 tensor of shape (T + 1,). Computed in float64 so that the running
    product alphabar_t does not drift over hundreds of steps. zero_snr: sqrt(alphabar_t) shifted and scaled so that
    it keeps its value at t = 1 and reaches 0 at t = T (Lin et al., algorithm 1). Unrescaled, the linear schedule
    leaves sqrt(alphabar_T) = 0.13 of the image in x_T, which training sees and sampling (from pure noise) does not.
    Then beta_T = 1, and the eps form of the DDPM mean is singular at t = T (1 / sqrt(alpha_T) is inf): such a
    schedule is sampled with v-prediction, through the posterior mean around the predicted x0."""
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
        "mab_over_sqrtmab": torch.where(t > 0, beta_t / sqrtmab.clamp(min=1e-12), 0.0),  # beta_t / sqrt(1 - alphabar_t)
    }
    # the posterior q(x_{t-1} | x_t, x_0) has mean coef_x0 * x_0 + coef_xt * x_t (DDPM eq. 7)
    alphabar_prev = torch.cat([alphabar_t.new_ones(1), alphabar_t[:-1]])
    one_minus_ab = (1 - alphabar_t).clamp(min=1e-12)
    table["coef_x0"] = torch.where(t > 0, alphabar_prev.sqrt() * beta_t / one_minus_ab, 0.0)     # sqrt(ab_{t-1}) b_t / (1 - ab_t)
    table["coef_xt"] = torch.where(t > 0, alpha_t.sqrt() * (1 - alphabar_prev) / one_minus_ab, 0.0)  # sqrt(a_t) (1 - ab_{t-1}) / (1 - ab_t)
    return {k: v.float() for k, v in table.items()}


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
    eps = sqrt(alphabar_t) v + sqrt(1 - alphabar_t) x_t, both finite at every t, t = T of a zero-SNR schedule included."""
    return sched["sqrtab"][t] * x_t - sched["sqrtmab"][t] * v_pred, sched["sqrtab"][t] * v_pred + sched["sqrtmab"][t] * x_t


def predict_x0(x_t: torch.Tensor, eps_pred: torch.Tensor, t: int, sched: dict) -> torch.Tensor:
    """x0 = (x_t - sqrt(1 - alphabar_t) eps) / sqrt(alphabar_t), clipped to the data range [-1, 1]. Unclipped, an error
    in eps is multiplied by sqrt(1 - alphabar_t) / sqrt(alphabar_t): about 250 at the cosine schedule's last step."""
    return ((x_t - sched["sqrtmab"][t] * eps_pred) / sched["sqrtab"][t]).clamp(-1, 1)


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
    x0 = predict_x0(x_t, eps_pred, t, sched) if x0_pred is None else x0_pred.clamp(-1, 1)
    return sched["sqrtab"][t_prev] * x0 + sched["sqrtmab"][t_prev] * eps_pred


def timesteps(T: int, sampler: str, steps: int) -> list:
    """The descending list of timesteps the sampler visits, ending at 0: every step for DDPM, `steps` evenly spaced
    jumps for DDIM."""
    if sampler == "ddpm":
        return list(range(T, -1, -1))
    steps = max(1, min(steps, T))
    return sorted({round(T * i / steps) for i in range(steps + 1)}, reverse=True)
