"""One reverse step against the posterior formula, DDIM against the forward marginal, the guidance formula, and
whole sampling loops driven by a model whose exact answer is known in closed form."""
import torch
import torch.nn as nn

from schedule import Diffusion, ddim_step, ddpm_schedules, ddpm_step, dpm_step, guided_eps, q_sample, timesteps


def test_ddpm_step_mean_is_the_posterior_mean_of_q_x_tminus1_given_x_t_and_x0():
    s = ddpm_schedules(1e-4, 0.02, 400)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(4, 3, 8, 8, generator=g), torch.randn(4, 3, 8, 8, generator=g)
    for t in (1, 2, 57, 400):
        x_t = q_sample(x0, torch.full((4,), t), eps, s)
        betas = torch.cat([torch.zeros(1, dtype=torch.float64), torch.linspace(1e-4, 0.02, 400, dtype=torch.float64)])
        beta, ab, ab_prev = betas[t], torch.prod(1 - betas[:t + 1]), torch.prod(1 - betas[:t])
        # DDPM eq. 7: mu~ = sqrt(ab_{t-1}) beta_t / (1 - ab_t) x0 + sqrt(alpha_t) (1 - ab_{t-1}) / (1 - ab_t) x_t
        mu = ((ab_prev.sqrt() * beta / (1 - ab)) * x0.double()
              + ((1 - beta).sqrt() * (1 - ab_prev) / (1 - ab)) * x_t.double())
        step = ddpm_step(x_t, eps, t, torch.zeros_like(x_t), s)
        torch.testing.assert_close(step.double(), mu, rtol=0, atol=2e-3)  # float32 step; wrong maths is off by >0.01


def test_ddpm_step_adds_noise_of_std_sqrt_beta_t():
    s = ddpm_schedules(1e-4, 0.02, 400)
    x_t, eps, z = (torch.zeros(100_000), torch.zeros(100_000),
                   torch.randn(100_000, generator=torch.Generator().manual_seed(2)))
    out = ddpm_step(x_t, eps, 200, z, s)
    assert abs(out.std().item() - s["beta_t"][200].sqrt().item()) < 1e-3


def test_ddim_step_with_the_true_eps_lands_on_the_forward_sample_at_t_prev():
    s = ddpm_schedules(1e-4, 0.02, 400)
    g = torch.Generator().manual_seed(3)
    x0 = torch.rand(2, 3, 8, 8, generator=g) * 2 - 1  # data lies in [-1, 1], where the x0 clip changes nothing
    eps = torch.randn(2, 3, 8, 8, generator=g)
    for t, t_prev in ((400, 392), (100, 37), (8, 0)):
        x_t = q_sample(x0, torch.full((2,), t), eps, s)
        expected = s["alphabar_t"][t_prev].sqrt() * x0 + (1 - s["alphabar_t"][t_prev]).sqrt() * eps
        torch.testing.assert_close(ddim_step(x_t, eps, t, t_prev, s), expected, rtol=1e-4, atol=1e-4)


def test_guidance_is_one_plus_w_cond_minus_w_uncond():
    c, u = torch.tensor([1.0, -2.0]), torch.tensor([0.5, 1.0])
    torch.testing.assert_close(guided_eps(c, u, 0.0), c)  # w = 0: plain conditional
    torch.testing.assert_close(guided_eps(c, u, 2.0), torch.tensor([3 * 1.0 - 2 * 0.5, 3 * -2.0 - 2 * 1.0]))


def test_ddim_timesteps_descend_from_T_to_0_in_the_asked_number_of_jumps():
    ts = timesteps(400, "ddim", 50)
    assert ts[0] == 400 and ts[-1] == 0 and len(ts) == 51 and ts == sorted(ts, reverse=True)
    assert timesteps(10, "ddpm", 0) == list(range(10, -1, -1))


class ExactEps(nn.Module):
    """The Bayes-optimal noise predictor when all data is one image x_star (conditional) or -x_star (null):
    eps = (x_t - sqrt(ab_t) x*) / sqrt(1 - ab_t). Both samplers must then return x* exactly."""

    def __init__(self, x_star, sched, T):
        super().__init__()
        self.x_star, self.s, self.T = x_star, sched, T
        self.dummy = nn.Parameter(torch.zeros(1))
        self.config = {"image_size": x_star.shape[-1], "in_channels": 3}

    def forward(self, x_t, cond, t_in):
        t = (t_in * self.T).round().long()
        target = torch.where(cond.sum(1, keepdim=True)[:, :, None, None] > 0, self.x_star, -self.x_star)
        return (x_t - self.s["sqrtab"][t].view(-1, 1, 1, 1) * target) / self.s["sqrtmab"][t].view(-1, 1, 1, 1)


def test_samplers_driven_by_the_exact_eps_return_the_data_point():
    T = 50
    d = Diffusion(T, 1e-4, 0.2)
    x_star = torch.rand(3, 8, 8) * 2 - 1
    model = ExactEps(x_star, d.table, T)
    cond = torch.zeros(3, 24)
    cond[:, 5] = 1
    for sampler in ("ddpm", "ddim", "dpm"):
        x0, frames = d.sample(model, cond, w=0.0, sampler=sampler, steps=10, seed=0, n_frames=4)
        torch.testing.assert_close(x0, x_star.expand(3, -1, -1, -1).clamp(-1, 1), rtol=1e-3, atol=1e-3)
        assert len(frames) == 4 and frames[0].std() > 0.5  # the strip starts from noise


class ExactV(ExactEps):
    """The same Bayes-optimal answer as v = sqrt(ab_t) eps - sqrt(1 - ab_t) x*, defined at t = T of a zero-SNR
    schedule too, where the eps form is 0 / 0."""

    def forward(self, x_t, cond, t_in):
        t = (t_in * self.T).round().long()
        target = torch.where(cond.sum(1, keepdim=True)[:, :, None, None] > 0, self.x_star, -self.x_star)
        # sqrt(ab) eps - sqrt(1 - ab) x* with eps = (x_t - sqrt(ab) x*) / sqrt(1 - ab)
        return (self.s["sqrtab"][t].view(-1, 1, 1, 1) * x_t - target) / self.s["sqrtmab"][t].view(-1, 1, 1, 1)


def test_samplers_driven_by_the_exact_v_on_a_zero_snr_schedule_return_the_data_point():
    T = 50
    d = Diffusion(T, 1e-4, 0.2, zero_snr=True, prediction="v")
    s = d.table
    assert torch.isinf(s["oneover_sqrta"][T])  # the eps form of the mean cannot take the first step
    x_star = torch.rand(3, 8, 8) * 2 - 1
    cond = torch.zeros(3, 24)
    cond[:, 5] = 1
    for sampler in ("ddpm", "ddim", "dpm"):
        x0, _ = d.sample(ExactV(x_star, s, T), cond, w=0.0, sampler=sampler, steps=10, seed=0)
        torch.testing.assert_close(x0, x_star.expand(3, -1, -1, -1), rtol=1e-3, atol=1e-3)
        # guidance on v: 3 v(x*) - 2 v(-x*) is the exact v of the point 5 x*, which the samplers return, clipped
        x0, _ = d.sample(ExactV(x_star, s, T), cond, w=2.0, sampler=sampler, steps=10, seed=0)
        torch.testing.assert_close(x0, (5 * x_star).clamp(-1, 1).expand(3, -1, -1, -1), rtol=1e-3, atol=1e-3)


def exact_setup(T=30):
    """The noise process, x*, the exact-eps model and two conditions of one object: what the guidance tests share."""
    d = Diffusion(T, 1e-4, 0.2)
    x_star = torch.rand(3, 8, 8) * 2 - 1
    cond = torch.zeros(2, 24)
    cond[:, 1] = 1
    return d, x_star, ExactEps(x_star, d.table, T), cond


def test_guided_sampling_with_w_zero_ignores_the_unconditional_answer_and_batched_equals_separate():
    d, x_star, model, cond = exact_setup()
    a, _ = d.sample(model, cond, w=0.0, sampler="ddim", steps=10)
    torch.testing.assert_close(a, x_star.expand(2, -1, -1, -1))
    b, _ = d.sample(model, cond, w=1.5, sampler="ddpm", seed=4, batched_guidance=True)
    c, _ = d.sample(model, cond, w=1.5, sampler="ddpm", seed=4, batched_guidance=False)
    torch.testing.assert_close(b, c)
    assert not torch.allclose(b, a)  # guidance moved the result away from x*


def test_ddim_clips_x0_so_an_eps_error_cannot_be_amplified():
    # cosine schedule, first DDIM-50 jump: unclipped, an error in eps reaches x_{t_prev} multiplied by about 250
    s = ddpm_schedules(T=400, kind="cosine")
    t, t_prev = timesteps(400, "ddim", 50)[:2]
    g = torch.Generator().manual_seed(5)
    x_t, eps = torch.randn(4, 3, 8, 8, generator=g), torch.randn(4, 3, 8, 8, generator=g)
    gain = (s["sqrtab"][t_prev] * s["sqrtmab"][t] / s["sqrtab"][t]).item()
    assert gain > 100  # the amplification the clip guards against
    for error in (0.1, 10.0):
        out = ddim_step(x_t, eps + error, t, t_prev, s)
        # x_{t_prev} = sqrt(ab_prev) x0 + sqrt(1 - ab_prev) eps with |x0| <= 1
        bound = s["sqrtab"][t_prev] + 1e-6
        assert ((out - s["sqrtmab"][t_prev] * (eps + error)).abs() <= bound).all()


def test_ddpm_x0_clipped_step_is_the_posterior_mean_when_x0_is_in_range_and_bounded_when_not():
    s = ddpm_schedules(1e-4, 0.02, 400)
    g = torch.Generator().manual_seed(6)
    x0 = torch.rand(2, 3, 8, 8, generator=g) * 1.8 - 0.9  # inside [-1, 1]
    eps = torch.randn(2, 3, 8, 8, generator=g)
    zero = torch.zeros_like(x0)
    for t in (1, 50, 400):
        x_t = q_sample(x0, torch.full((2,), t), eps, s)
        torch.testing.assert_close(ddpm_step(x_t, eps, t, zero, s, clip_x0=True), ddpm_step(x_t, eps, t, zero, s),
                                   rtol=0, atol=2e-4)
        wild = ddpm_step(x_t, eps + 50.0, t, zero, s, clip_x0=True)  # x0 prediction far outside the data range
        assert ((wild - s["coef_xt"][t] * x_t).abs() <= s["coef_x0"][t] + 1e-6).all()


def test_guidance_interval_guides_only_the_steps_inside_it():
    # ExactEps pulls the conditional answer to x* and the unconditional one to -x*: each guided step moves x_t
    d, x_star, model, cond = exact_setup()
    draw = lambda w, interval: d.sample(model, cond, w=w, sampler="ddim", steps=10, w_interval=interval)[0]
    plain = x_star.expand(2, -1, -1, -1)
    torch.testing.assert_close(draw(0.0, (0.0, 1.0)), plain)
    torch.testing.assert_close(draw(2.0, (0.0, 0.0)), plain)  # no step inside: plain conditional sampling
    torch.testing.assert_close(draw(2.0, (0.3, 0.7)), plain)  # unguided last steps land on the conditional answer
    assert not torch.allclose(draw(2.0, (0.0, 0.5)), plain)  # guided last steps do not
    calls = []
    class Counting(ExactEps):
        def forward(self, x_t, cond, t_in):
            calls.append((len(x_t), float(t_in[0])))
            return super().forward(x_t, cond, t_in)
    counting = Counting(x_star, d.table, 30)
    d.sample(counting, cond, w=2.0, sampler="ddim", steps=10, w_interval=(0.3, 0.7))
    assert all((n == 4) == (0.3 <= t <= 0.7) for n, t in calls)  # a batch of 2N exactly where guided


class GaussianEps(nn.Module):
    """The exact eps for data x0 ~ N(0, v I): E[eps | x_t] = sqrt(1 - ab) x_t / (ab v + 1 - ab). Its probability flow
    ODE keeps each marginal N(0, (ab v + 1 - ab) I): it scales x_T by sqrt((ab_t v + 1 - ab_t) / (ab_T v + 1 - ab_T))
    on the way to x_t, in closed form."""

    def __init__(self, v, sched, T):
        super().__init__()
        self.v, self.s, self.T = v, sched, T
        self.dummy = nn.Parameter(torch.zeros(1))
        self.config = {"image_size": 8, "in_channels": 3}

    def forward(self, x_t, cond, t_in):
        ab = self.s["alphabar_t"][(t_in * self.T).round().long()].view(-1, 1, 1, 1).double()
        return ((1 - ab).sqrt() * x_t.double() / (ab * self.v + 1 - ab)).float()


def test_dpm_solver_2m_solves_the_probability_flow_ode_to_second_order_and_beats_ddim():
    T, v = 1000, 0.02  # |x0| stays far inside [-1, 1]: the clips never act
    d = Diffusion(T, 1e-4, 0.02)
    model, cond = GaussianEps(v, d.table, T), torch.zeros(4, 24)
    ab_T, ab_1 = d.table["alphabar_t"][T].double(), d.table["alphabar_t"][1].double()
    x_T = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))  # the seed sample() draws x_T with
    x_1 = x_T.double() * ((ab_1 * v + 1 - ab_1) / (ab_T * v + 1 - ab_T)).sqrt()
    exact = x_1 * ab_1.sqrt() * v / (ab_1 * v + 1 - ab_1)  # the solver's last evaluation: x0 predicted at t = 1
    error = lambda sampler, steps: (d.sample(model, cond, w=0.0, sampler=sampler, steps=steps)[0].double() -
                                    exact).abs().max().item()
    assert error("dpm", 10) < error("ddim", 10) / 4
    # a quarter of the step divides a second-order error by about 16 (a first-order one by 4), but for the rounding of t
    assert error("dpm", 80) < error("dpm", 20) / 6


def test_dpm_step_is_ddim_on_its_first_step_and_lands_on_x0_at_t_0():
    s = ddpm_schedules(1e-4, 0.02, 400)
    g = torch.Generator().manual_seed(7)
    x0, eps = torch.rand(2, 3, 8, 8, generator=g) * 1.8 - 0.9, torch.randn(2, 3, 8, 8, generator=g)
    x_t = q_sample(x0, torch.full((2,), 300), eps, s)
    torch.testing.assert_close(dpm_step(x_t, x0, None, 300, 200, None, s), ddim_step(x_t, eps, 300, 200, s),
                               rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(dpm_step(x_t, x0, x0 + 1, 8, 0, 16, s), x0)
    ts = timesteps(400, "dpm", 10, s)
    lam = (s["sqrtab"] / s["sqrtmab"]).log()
    assert ts[0] == 400 and ts[-2:] == [1, 0] and len(ts) == 11  # 10 evaluations, the last one at t = 1
    gaps = (lam[ts[1:-1]] - lam[ts[:-2]]).tolist()
    assert max(gaps) < 1.5 * min(gaps)  # even steps in lambda, but for the rounding of t
