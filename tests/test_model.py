"""The network: shapes at any size divisible by 4, the condition actually used, and a gradient path that learns."""
import pytest
import torch
import torch.nn.functional as F

from model import ContextUnet, count_params, fold_batchnorm


@pytest.mark.parametrize("size", [16, 32])
def test_output_has_the_input_shape(size):
    model = ContextUnet(n_feat=8, image_size=size)
    x = torch.randn(2, 3, size, size)
    assert model(x, torch.zeros(2, 24), torch.rand(2)).shape == x.shape


def test_image_size_not_divisible_by_4_is_refused():
    with pytest.raises(ValueError, match="divisible by 4"):
        ContextUnet(n_feat=8, image_size=30)


def test_default_model_is_report_c_sized():
    assert 15e6 < count_params(ContextUnet()) < 30e6  # n_feat 128 ContextUnet


def test_the_condition_changes_the_output():
    torch.manual_seed(0)
    model = ContextUnet(n_feat=8, image_size=16).eval()
    x, t = torch.randn(1, 3, 16, 16), torch.rand(1)
    c = torch.zeros(1, 24)
    c[0, 3] = 1
    assert not torch.allclose(model(x, c, t), model(x, torch.zeros(1, 24), t))


def test_model_overfits_one_small_batch():
    torch.manual_seed(0)
    model = ContextUnet(n_feat=16, image_size=16)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    x_t, eps = torch.randn(8, 3, 16, 16), torch.randn(8, 3, 16, 16)
    cond, t = (torch.rand(8, 24) < 0.1).float(), torch.rand(8)
    losses = []
    for _ in range(150):
        loss = F.mse_loss(model(x_t, cond, t), eps)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 20, (losses[0], losses[-1])


def test_folding_batchnorm_keeps_the_outputs():
    torch.manual_seed(0)
    model = ContextUnet(n_feat=8, image_size=16)
    for m in model.modules():  # non-trivial running statistics and affine parameters, as after training
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    model.eval()
    x, c, t = torch.randn(3, 3, 16, 16), (torch.rand(3, 24) < 0.1).float(), torch.rand(3)
    before = model(x, c, t)
    fold_batchnorm(model)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    torch.testing.assert_close(model(x, c, t), before, rtol=1e-4, atol=1e-5)


def test_under_bf16_autocast_neighbouring_timesteps_stay_apart():
    # t / T in bf16 merges 398/400 and 399/400 (8 mantissa bits): the embeddings must see float32
    torch.manual_seed(0)
    model = ContextUnet(n_feat=8, image_size=16).eval()
    x, c = torch.randn(1, 3, 16, 16).repeat(2, 1, 1, 1), torch.zeros(2, 24)
    t = torch.tensor([398 / 400, 399 / 400])
    assert torch.tensor(398 / 400).bfloat16() == torch.tensor(399 / 400).bfloat16()  # the trap itself
    with torch.autocast("cpu", torch.bfloat16):
        out = model(x, c, t)
    assert not torch.equal(out[0], out[1])
