"""The schedule tables against their closed forms, computed here independently in float64."""
import math

import pytest
import torch

from schedule import Diffusion, ddpm_schedules, q_sample


def test_linear_betas_run_from_beta1_at_t1_to_beta2_at_T_and_alphabar_is_their_running_product():
    T, b1, b2 = 50, 1e-4, 0.02
    s = ddpm_schedules(b1, b2, T)
    alphabar = 1.0
    for t in range(1, T + 1):
        beta = b1 + (b2 - b1) * (t - 1) / (T - 1)
        alphabar *= 1 - beta
        assert math.isclose(s["beta_t"][t].item(), beta, rel_tol=1e-6)
        assert math.isclose(s["alphabar_t"][t].item(), alphabar, rel_tol=1e-5)
    assert s["beta_t"][0] == 0 and s["alphabar_t"][0] == 1  # t = 0 is the clean image


def test_derived_coefficients_match_their_definitions():
    s = ddpm_schedules(1e-4, 0.02, 100)
    t = torch.arange(1, 101)
    beta = 1e-4 + (0.02 - 1e-4) * (t.double() - 1) / 99  # independent float64 reference
    ab = torch.cumprod(1 - beta, 0)
    close = lambda a, b: torch.testing.assert_close(a.double(), b, rtol=1e-6, atol=0)  # float32 storage
    close(s["alpha_t"][t], 1 - beta)
    close(s["oneover_sqrta"][t], 1 / torch.sqrt(1 - beta))
    close(s["sqrt_beta_t"][t], torch.sqrt(beta))
    close(s["sqrtab"][t], torch.sqrt(ab))
    close(s["sqrtmab"][t], torch.sqrt(1 - ab))
    close(s["mab_over_sqrtmab"][t], beta / torch.sqrt(1 - ab))
    assert all(len(v) == 101 for v in s.values())


def test_cosine_alphabar_follows_the_improved_ddpm_closed_form():
    T, s_off = 200, 0.008
    s = ddpm_schedules(T=T, kind="cosine")
    f = lambda t: math.cos((t / T + s_off) / (1 + s_off) * math.pi / 2) ** 2
    for t in (1, 10, 100, 150):  # away from the clamped end
        assert math.isclose(s["alphabar_t"][t].item(), f(t) / f(0), rel_tol=1e-5)
    assert s["beta_t"].max() <= 0.999 + 1e-6


def test_q_sample_has_the_forward_marginal_mean_and_variance():
    s = ddpm_schedules(1e-4, 0.02, 400)
    x0 = torch.full((200_000,), 0.7)
    t = torch.full((200_000,), 123)
    x_t = q_sample(x0, t, torch.randn(200_000, generator=torch.Generator().manual_seed(0)), s)
    ab = s["alphabar_t"][123].item()
    assert abs(x_t.mean().item() - math.sqrt(ab) * 0.7) < 0.01
    assert abs(x_t.var().item() - (1 - ab)) < 0.01


def test_chaining_single_noising_steps_gives_the_same_marginal_as_q_sample():
    # x_t = sqrt(1 - beta_t) x_{t-1} + sqrt(beta_t) z applied t times: the definition q_sample shortcuts
    s = ddpm_schedules(1e-4, 0.02, 400)
    g = torch.Generator().manual_seed(1)
    x = torch.full((100_000,), -0.4)
    for t in range(1, 301):
        x = torch.sqrt(1 - s["beta_t"][t]) * x + s["sqrt_beta_t"][t] * torch.randn(x.shape, generator=g)
    ab = s["alphabar_t"][300].item()
    assert abs(x.mean().item() - math.sqrt(ab) * -0.4) < 0.01
    assert abs(x.var().item() - (1 - ab)) < 0.01


def test_min_snr_weights_each_sample_by_min_snr_gamma_over_snr():
    T, gamma = 100, 5.0
    d = Diffusion(T, 1e-4, 0.02)
    zero_net = lambda x_t, c, t: torch.zeros_like(x_t)  # then the loss is the weighted mean of eps^2
    x0, cond = torch.zeros(64, 3, 4, 4), torch.zeros(64, 24)
    torch.manual_seed(0)
    _, _, t, eps = d.noisy(x0, cond, 0.1)
    betas = torch.cat([torch.zeros(1, dtype=torch.float64), torch.linspace(1e-4, 0.02, T, dtype=torch.float64)])
    ab = torch.cumprod(1 - betas, 0)[t]  # independent float64 alphabar_t
    snr = ab / (1 - ab)
    expected = (torch.minimum(snr, torch.tensor(gamma, dtype=torch.float64)) / snr
                * eps.double().square().mean((1, 2, 3))).mean()
    torch.manual_seed(0)
    got = d.loss(zero_net, x0, cond, 0.1, min_snr=gamma)
    assert abs(got.item() - expected.item()) < 1e-5 * expected.item()
    assert (snr > gamma).any() and (snr < gamma).any()  # both branches of the min were exercised
    torch.manual_seed(0)
    plain = d.loss(zero_net, x0, cond, 0.1)
    assert abs(plain.item() - eps.square().mean().item()) < 1e-6 and got < plain


def test_zero_snr_rescale_keeps_the_first_step_ends_at_pure_noise_and_follows_algorithm_1():
    T = 100
    s, plain = ddpm_schedules(1e-4, 0.02, T, zero_snr=True), ddpm_schedules(1e-4, 0.02, T)
    beta = torch.cat([torch.zeros(1, dtype=torch.float64), torch.linspace(1e-4, 0.02, T, dtype=torch.float64)])
    root = torch.cumprod(1 - beta, 0).sqrt()  # independent float64 sqrt(alphabar_t) before the rescale
    expected = (root[1:] - root[T]) * root[1] / (root[1] - root[T])  # Lin et al., algorithm 1, over t = 1..T
    torch.testing.assert_close(s["sqrtab"][1:].double(), expected, rtol=1e-5, atol=1e-7)
    assert s["sqrtab"][T] == 0 and s["sqrtmab"][T] == 1 and s["beta_t"][T] == 1  # x_T is pure noise
    assert math.isclose(s["sqrtab"][1].item(), plain["sqrtab"][1].item(), rel_tol=1e-6)
    assert plain["sqrtab"][T] > 0.1  # what the rescale removes: 13 % of the image left at T by the linear schedule
    ab = s["alphabar_t"].double()
    torch.testing.assert_close(s["beta_t"][1:].double(), 1 - ab[1:] / ab[:-1], rtol=1e-5, atol=1e-7)
    assert (s["alphabar_t"][1:] < s["alphabar_t"][:-1]).all() and (s["beta_t"][1:] > 0).all()


def test_v_target_and_from_v_recover_x0_and_eps_at_every_t_including_zero_snr():
    from schedule import from_v, v_target
    s = ddpm_schedules(1e-4, 0.02, 50, zero_snr=True)
    g = torch.Generator().manual_seed(7)
    x0, eps = torch.rand(2, 3, 4, 4, generator=g) * 2 - 1, torch.randn(2, 3, 4, 4, generator=g)
    for t in (1, 25, 49, 50):
        tt = torch.full((2,), t)
        x_t, v = q_sample(x0, tt, eps, s), v_target(x0, tt, eps, s)
        x0_back, eps_back = from_v(x_t, v, t, s)
        torch.testing.assert_close(x0_back, x0, rtol=0, atol=1e-5)
        torch.testing.assert_close(eps_back, eps, rtol=0, atol=1e-5)
    torch.testing.assert_close(v_target(x0, torch.full((2,), 50), eps, s), -x0)  # at zero SNR v is -x0


def test_min_snr_for_v_weights_by_min_snr_gamma_over_snr_plus_one_and_stays_finite_at_zero_snr():
    from schedule import v_target
    T, gamma = 20, 1.0
    d = Diffusion(T, 1e-4, 0.2, zero_snr=True, prediction="v")
    s = d.table
    zero_net = lambda x_t, c, t: torch.zeros_like(x_t)  # then the loss is the weighted mean of v^2
    x0, cond = torch.rand(256, 3, 4, 4, generator=torch.Generator().manual_seed(8)) * 2 - 1, torch.zeros(256, 24)
    torch.manual_seed(0)
    _, _, t, eps = d.noisy(x0, cond, 0.1)
    assert (t == T).any()  # the zero-SNR step is in the batch
    ab = s["alphabar_t"].double()[t]
    snr = ab / (1 - ab)
    v2 = v_target(x0, t, eps, s).double().square().mean((1, 2, 3))
    torch.manual_seed(0)
    got = d.loss(zero_net, x0, cond, 0.1, min_snr=gamma)
    expected = (torch.clamp(snr, max=gamma) / (snr + 1) * v2).mean()
    assert torch.isfinite(got) and abs(got.item() - expected.item()) < 1e-5 * expected.item()
    torch.manual_seed(0)
    plain = d.loss(zero_net, x0, cond, 0.1)
    assert abs(plain.item() - v2.mean().item()) < 1e-5 * plain.item()


def test_logsnr_draw_gives_each_t_the_truncated_normals_mass_between_the_midpoints_of_its_lambda():
    T, mean, std = 400, 0.5, 2.0
    d = Diffusion(T, 1e-4, 0.02)
    betas = [1e-4 + (0.02 - 1e-4) * i / (T - 1) for i in range(T)]
    lam, ab = [], 1.0
    for beta in betas:  # independent float64 lambda_t = log(alphabar_t / (1 - alphabar_t)), t = 1..T
        ab *= 1 - beta
        lam.append(math.log(ab / (1 - ab)))
    cdf = lambda x: 0.5 * (1 + math.erf((x - mean) / (std * math.sqrt(2))))
    edges = [lam[0]] + [(a + b) / 2 for a, b in zip(lam, lam[1:])] + [lam[-1]]
    mass = [cdf(hi) - cdf(lo) for hi, lo in zip(edges, edges[1:])]
    expected = torch.tensor(mass, dtype=torch.float64) / sum(mass)
    got = d.t_probs([mean, std])
    assert got.shape == (T,) and torch.allclose(got, expected, atol=1e-9)
    near = torch.tensor([abs(v - mean) < std for v in lam])
    assert got[near].sum() > 0.65 and near.double().mean() < 0.55  # gathered near lambda = mean, unlike uniform t
    # the draws follow it: 200000 t's counted against P(t)
    torch.manual_seed(0)
    _, _, t, _ = d.noisy(torch.zeros(200000, 1, 1, 1), torch.zeros(200000, 24), 0.0, logsnr_draw=[mean, std])
    assert t.min() >= 1 and t.max() <= T
    freq = torch.bincount(t - 1, minlength=T).double() / len(t)
    assert (freq - expected).abs().max() < 1e-3  # uniform t would be 2e-3 off; a draw's sd is 1.5e-4


def test_the_loss_trains_on_the_ts_of_its_logsnr_draw():
    T = 50
    d = Diffusion(T, 1e-4, 0.02)
    ab = d.table["alphabar_t"][30].item()
    seen = []
    recording_net = lambda x_t, c, t: seen.append(t) or torch.zeros_like(x_t)
    x0, cond = torch.zeros(64, 3, 4, 4), torch.zeros(64, 24)
    d.loss(recording_net, x0, cond, 0.1, logsnr_draw=[math.log(ab / (1 - ab)), 1e-3])  # all at lambda_30
    assert torch.equal(seen[0], torch.full((64,), 30 / T))
    d.loss(recording_net, x0, cond, 0.1)  # the default: uniform on 1..T
    assert len(set(seen[1].tolist())) > 20


def test_logsnr_draw_reaches_t_T_of_a_zero_snr_schedule_and_the_far_tails_of_the_normal():
    zero = Diffusion(100, 1e-4, 0.02, zero_snr=True, prediction="v")  # lambda_T = -inf: x_T is pure noise
    p = zero.t_probs([-8.0, 2.0])
    assert torch.isfinite(p).all() and p[-1] > 0.05  # the step sampling starts from is trained
    torch.manual_seed(0)
    assert (zero.draw_t(20000, "cpu", logsnr_draw=[-8.0, 2.0]) == 100).any()
    d = Diffusion(400, 1e-4, 0.02)  # lambda in [-4.03, 9.21]: near the top end, where the normal's cdf rounds to 1
    top = d.t_probs([9.0, 0.5])
    assert abs(top.sum().item() - 1) < 1e-12 and top[:3].sum() > 0.99 and (top[:12].diff() < 0).all()
    with pytest.raises(ValueError, match="MEAN 12 is outside the schedule's log-SNR range"):
        d.t_probs([12.0, 1.0])
