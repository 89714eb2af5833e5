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


OPTIONS = [dict(), dict(cross_attn=1), dict(cross_attn=2), dict(adagn=True), dict(cond_embed="linear"),
           dict(cross_attn=2, adagn=True, cond_bottleneck=True), dict(self_attn=True)]


def test_the_default_config_is_report_cs_and_options_appear_only_when_on():
    # report C's checkpoints hold exactly these keys: a new option must not change what the default network saves
    assert ContextUnet().config == dict(in_channels=3, n_feat=128, n_classes=24, image_size=64)
    m = ContextUnet(n_feat=8, image_size=16, cross_attn=2, adagn=True, cond_embed="linear", self_attn=True)
    assert m.config == dict(in_channels=3, n_feat=8, n_classes=24, image_size=16, cross_attn=2, adagn=True,
                            cond_embed="linear", self_attn=True)
    rebuilt = ContextUnet(**m.config)
    rebuilt.load_state_dict(m.state_dict())  # every weight has its place in the network rebuilt from config alone


def test_train_py_builds_the_network_its_flags_ask_for():
    from settings import decide
    from train import build_model
    s = decide(["--n-feat", "8", "--image-size", "16", "--cross-attn", "1", "--self-attn", "1"])
    config = build_model(s, torch.eye(24)[:3].sum(0, keepdim=True)).config
    assert (config["cross_attn"], config["self_attn"]) == (1, True)
    assert "self_attn" not in build_model(decide(["--n-feat", "8"]), torch.eye(24)[:1]).config


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
def test_the_network_and_each_option_overfit_one_small_batch_and_use_the_condition(options):
    torch.manual_seed(0)
    model = ContextUnet(n_feat=16, image_size=16, **options)
    x_t, eps = torch.randn(8, 3, 16, 16), torch.randn(8, 3, 16, 16)
    cond, t = (torch.rand(8, 24) < 0.1).float(), torch.rand(8)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(150):
        loss = F.mse_loss(model(x_t, cond, t), eps)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 20, (losses[0], losses[-1])
    model.eval()
    one = torch.zeros(1, 24)
    one[0, 5] = 1
    assert not torch.allclose(model(x_t[:1], one, t[:1]), model(x_t[:1], torch.zeros(1, 24), t[:1]))


def test_object_tokens_are_one_per_object_then_the_empty_token():
    from model import ObjectTokens
    tokens = ObjectTokens(24, 4, max_objects=3)
    cond = torch.zeros(3, 24)
    cond[0, [2, 17]] = 1          # two objects
    cond[1, [0, 9, 23]] = 1       # three, including index 0
    out = tokens(cond)            # row 2: the null condition of guidance
    table, empty = tokens.table.weight[:24], tokens.table.weight[24]
    as_set = lambda rows: sorted(map(tuple, rows.tolist()))
    assert out.shape == (3, 3, 4)
    assert as_set(out[0]) == as_set(torch.stack([table[2], table[17], empty]))
    assert as_set(out[1]) == as_set(table[[0, 9, 23]])
    assert as_set(out[2]) == as_set(empty.expand(3, 4))


def test_cross_attention_starts_as_the_identity_and_reads_the_tokens():
    from model import Attention
    torch.manual_seed(0)
    attn = Attention(16, 8)
    h, tokens = torch.randn(2, 16, 4, 4), torch.randn(2, 3, 8)
    torch.testing.assert_close(attn(h, tokens), h)  # zero output projection: training starts from the plain U-Net
    torch.nn.init.normal_(attn.proj.weight)
    assert not torch.allclose(attn(h, tokens), attn(h, tokens.flip(0)))
    # attention over a set: the order of the tokens does not matter
    torch.testing.assert_close(attn(h, tokens), attn(h, tokens[:, [2, 0, 1]]))


def test_adagn_has_no_batchnorm_and_its_scale_and_shift_follow_the_condition():
    torch.manual_seed(0)
    model = ContextUnet(n_feat=8, image_size=16, adagn=True).eval()
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    x, t = torch.randn(2, 3, 16, 16), torch.rand(2)
    c = torch.zeros(2, 24)
    c[1, 3] = 1
    model.contextembed1.net[2].weight.data.zero_()  # silence the multiplicative path: only AdaGN carries cond
    model.contextembed1.net[2].bias.data.fill_(1)
    model.contextembed2.net[2].weight.data.zero_()
    model.contextembed2.net[2].bias.data.fill_(1)
    x = x[:1].repeat(2, 1, 1, 1)
    out = model(x, c, t[:1].repeat(2))
    torch.testing.assert_close(out[0], out[1])  # zero-initialised scale and shift: a plain GroupNorm at the start
    for name, p in model.named_parameters():
        if "film" in name:
            torch.nn.init.normal_(p, std=0.1)
    out = model(x, c, t[:1].repeat(2))
    assert not torch.allclose(out[0], out[1])


def test_self_attention_starts_as_the_identity_and_mixes_distant_positions():
    from model import Attention
    torch.manual_seed(0)
    attn = Attention(16)
    h = torch.randn(2, 16, 4, 4)
    torch.testing.assert_close(attn(h), h)
    torch.nn.init.normal_(attn.proj.weight)
    moved = h.clone()
    moved[:, :, 0, 0] += 1  # one corner changes: a 1x1 or 3x3 layer would leave the far corner as it was
    assert not torch.allclose(attn(h)[:, :, 3, 3], attn(moved)[:, :, 3, 3])


def test_linear_condition_embedding_is_one_layer():
    m = ContextUnet(n_feat=8, image_size=16, cond_embed="linear", cond_bottleneck=True)
    for e in (m.contextembed0, m.contextembed1, m.contextembed2):
        assert isinstance(e.net, torch.nn.Linear)
    assert isinstance(m.timeembed1.net, torch.nn.Sequential)  # time keeps its MLP


@pytest.mark.parametrize("n_feat", [56, 88])
@pytest.mark.parametrize("cross_attn", [1, 2])
def test_cross_attention_runs_at_widths_that_are_not_multiples_of_32(n_feat, cross_attn):
    model = ContextUnet(n_feat=n_feat, image_size=16, cross_attn=cross_attn)
    x = torch.randn(2, 3, 16, 16)
    assert model(x, torch.zeros(2, 24), torch.rand(2)).shape == x.shape


@pytest.mark.parametrize("ch", [32, 64, 128, 256])
def test_cross_attention_keeps_one_head_per_32_channels_where_32_divides_the_width(ch):
    from model import Attention
    assert Attention(ch, 8).heads == ch // 32
