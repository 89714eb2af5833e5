"""The denoising network: a ContextUnet (residual conv blocks, 2 down / 3 up) that predicts the noise eps in x_t.

The condition enters the decoder as `c_e * h + t_e`: a context embedding multiplies the feature map and a time
embedding is added, as in the classifier-free guidance MNIST ContextUnet that report C started from. Options, all off
by default: the same at the bottleneck vector; one token per object with cross-attention from the feature map to the
tokens (as the text tokens of latent diffusion, arXiv 2112.10752); GroupNorm with a scale and shift from the time and
condition embedding in the residual blocks (AdaGN, arXiv 2105.05233); self-attention among the positions of the S/4 map.
Its constructor arguments are saved in every
checkpoint (`model.config`), so that every script rebuilds the network from the checkpoint alone.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.fusion import fuse_conv_bn_eval


class ResidualConvBlock(nn.Module):
    """Two 3x3 conv -> norm -> GELU layers, with a skip connection when asked for. The norm is BatchNorm, or with
    emb_dim a GroupNorm whose per-channel scale and shift come from the (time + condition) embedding (AdaGN)."""

    def __init__(self, in_ch: int, out_ch: int, is_res: bool = False, emb_dim: int = 0):
        super().__init__()
        self.is_res, self.same_ch = is_res, in_ch == out_ch
        norm = (lambda: nn.GroupNorm(8, out_ch, affine=False)) if emb_dim else (lambda: nn.BatchNorm2d(out_ch))
        self.conv1 = nn.Sequential(nn.Conv2d(in_ch, out_ch, 3, 1, 1), norm(), nn.GELU())
        self.conv2 = nn.Sequential(nn.Conv2d(out_ch, out_ch, 3, 1, 1), norm(), nn.GELU())
        if emb_dim:
            self.film1, self.film2 = nn.Linear(emb_dim, 2 * out_ch), nn.Linear(emb_dim, 2 * out_ch)
            for film in (self.film1, self.film2):  # starts as a plain GroupNorm: scale 1, shift 0
                nn.init.zeros_(film.weight)
                nn.init.zeros_(film.bias)

    def forward(self, x, emb=None):
        h1 = self.conv1(x) if emb is None else self.modulated(self.conv1, self.film1, x, emb)
        h2 = self.conv2(h1) if emb is None else self.modulated(self.conv2, self.film2, h1, emb)
        if not self.is_res:
            return h2
        skip = x if self.same_ch else h1  # when the widths differ, conv1's output stands in for the input
        return (skip + h2) / 1.414  # keeps the variance of the sum near that of one branch

    @staticmethod
    def modulated(layer: nn.Sequential, film: nn.Linear, x, emb):
        """conv -> GroupNorm -> (1 + scale) * h + shift -> GELU, with (scale, shift) from emb (N, E)."""
        scale, shift = film(emb)[:, :, None, None].chunk(2, dim=1)  # (N, C, 1, 1) each
        return layer[2](layer[1](layer[0](x)) * (1 + scale) + shift)


class UnetDown(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, emb_dim: int = 0):
        super().__init__()
        self.net = nn.Sequential(ResidualConvBlock(in_ch, out_ch, emb_dim=emb_dim), nn.MaxPool2d(2))

    def forward(self, x, emb=None):
        return self.net[1](self.net[0](x, emb))


class UnetUp(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, emb_dim: int = 0):
        super().__init__()
        self.net = nn.Sequential(nn.ConvTranspose2d(in_ch, out_ch, 2, 2),
                                 ResidualConvBlock(out_ch, out_ch, emb_dim=emb_dim),
                                 ResidualConvBlock(out_ch, out_ch, emb_dim=emb_dim))

    def forward(self, x, skip, emb=None):
        h = self.net[0](torch.cat([x, skip], dim=1))
        return self.net[2](self.net[1](h, emb), emb)


class EmbedFC(nn.Module):
    """Linear -> GELU -> Linear (report C found the GELU matters: without it accuracy fell to about 0.7), or with
    linear=True one Linear layer."""

    def __init__(self, in_dim: int, out_dim: int, linear: bool = False):
        super().__init__()
        self.net = nn.Linear(in_dim, out_dim) if linear else \
            nn.Sequential(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))

    def forward(self, x):
        return self.net(x)[:, :, None, None]  # (N, out_dim, 1, 1) to broadcast over a feature map


class ObjectTokens(nn.Module):
    """The multi-hot condition (N, n_classes) as a set of max_objects tokens (N, max_objects, dim): one learned
    vector per object present, a learned empty token in the slots left over (all of them for the null condition of
    guidance). Each token is one object (a colour bound to a shape), so attention can place them one by one."""

    def __init__(self, n_classes: int, dim: int, max_objects: int):
        super().__init__()
        self.n_classes, self.max_objects = n_classes, max_objects
        self.table = nn.Embedding(n_classes + 1, dim)  # row n_classes: the empty slot

    def forward(self, cond):
        present, idx = cond.topk(self.max_objects, dim=1)  # the objects of the set come first (i-CLEVR: 1 to 3)
        return self.table(torch.where(present > 0, idx, self.n_classes))


class Attention(nn.Module):
    """h + proj(attention(query: each position of norm(h), keys and values: the object tokens, or with no tokens the
    positions of norm(h) themselves)). Cross-attention: the multi-hot embedding tells every position which objects the
    scene holds; attention lets each position pick one of them. Self-attention: each position sees what the others
    draw, so that two places do not draw the same object. The output projection starts at zero, so the block starts
    as the identity."""

    def __init__(self, ch: int, token_dim: int = None, head_dim: int = 32):
        super().__init__()
        # the most heads of about head_dim channels that split ch evenly (n_feat 56: 112 channels -> 2 heads, not 3)
        self.heads = next(h for h in range(max(1, ch // head_dim), 0, -1) if ch % h == 0)
        self.norm = nn.GroupNorm(8, ch)
        self.q, self.kv = nn.Conv2d(ch, ch, 1), nn.Linear(token_dim or ch, 2 * ch)
        self.proj = nn.Conv2d(ch, ch, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, h, tokens=None):
        n, c, height, width = h.shape
        normed = self.norm(h)
        q = self.q(normed).flatten(2).transpose(1, 2)                           # (N, HW, C)
        tokens = normed.flatten(2).transpose(1, 2) if tokens is None else tokens.to(q.dtype)  # (N, K, D); K = HW
        k, v = self.kv(tokens).chunk(2, dim=-1)                                 # (N, K, C) each
        # (N, heads, L, C/heads)
        split = lambda x: x.reshape(n, x.shape[1], self.heads, c // self.heads).transpose(1, 2)
        out = F.scaled_dot_product_attention(split(q), split(k), split(v))      # (N, heads, HW, C/heads)
        out = out.transpose(1, 2).reshape(n, height * width, c).transpose(1, 2).reshape(n, c, height, width)
        return h + self.proj(out)


class ContextUnet(nn.Module):
    """eps_pred = model(x_t, cond, t): x_t (N, C, S, S), cond (N, n_classes) multi-hot, t (N,) in [0, 1].

    An all-zero cond is the "no condition" input of classifier-free guidance: the context MLP then returns its
    bias path alone, a learned null embedding, with no sign tricks or extra flags. S must be divisible by 4.
    Options (off by default, saved in config only when on, so report C's checkpoints keep their exact config):
    cond_bottleneck: c_e * h + t_e at the bottleneck vector too; cross_attn 1: cross-attention to per-object tokens
    at S/4, 2: at S/4 and S/2; adagn: AdaGN in every residual block instead of BatchNorm; cond_embed "linear": each
    condition embedding one Linear layer instead of the MLP; self_attn: self-attention on the S/4 map after its
    cross-attention.
    """

    def __init__(self, in_channels: int = 3, n_feat: int = 128, n_classes: int = 24, image_size: int = 64,
                 cond_bottleneck: bool = False, cross_attn: int = 0, adagn: bool = False, cond_embed: str = "mlp",
                 max_objects: int = 3, self_attn: bool = False):
        super().__init__()
        if image_size % 4:
            raise ValueError(f"image_size {image_size} is not divisible by 4 (the net halves it twice)")
        if cross_attn not in (0, 1, 2) or cond_embed not in ("mlp", "linear"):
            raise ValueError(f"cross_attn {cross_attn} (0, 1 or 2), cond_embed {cond_embed!r} ('mlp' or 'linear')")
        self.config = dict(in_channels=in_channels, n_feat=n_feat, n_classes=n_classes, image_size=image_size)
        options = dict(cond_bottleneck=cond_bottleneck, cross_attn=cross_attn, adagn=adagn,
                       cond_embed=cond_embed if cond_embed != "mlp" else None,
                       max_objects=max_objects if cross_attn and max_objects != 3 else None,
                       self_attn=self_attn)
        self.config.update({k: v for k, v in options.items() if v})
        self.cond_bottleneck, self.cross_attn, self.adagn = cond_bottleneck, cross_attn, adagn
        self.self_attn = self_attn
        linear = cond_embed == "linear"
        bottom = image_size // 4  # spatial size after the two downsamplings
        emb_dim = 4 * n_feat if adagn else 0
        self.init_conv = ResidualConvBlock(in_channels, n_feat, is_res=True, emb_dim=emb_dim)
        self.down1 = UnetDown(n_feat, n_feat, emb_dim)
        self.down2 = UnetDown(n_feat, 2 * n_feat, emb_dim)
        # the bottleneck squeezes the whole S/4 map to one vector, then grows it back: global scene layout
        self.to_vec = nn.Sequential(nn.AvgPool2d(bottom), nn.GELU())
        self.timeembed1, self.timeembed2 = EmbedFC(1, 2 * n_feat), EmbedFC(1, n_feat)
        self.contextembed1, self.contextembed2 = (EmbedFC(n_classes, 2 * n_feat, linear),
                                                  EmbedFC(n_classes, n_feat, linear))
        # optionally the condition also shapes the bottleneck vector, from which up0 draws the whole scene layout
        if cond_bottleneck:
            self.timeembed0, self.contextembed0 = EmbedFC(1, 2 * n_feat), EmbedFC(n_classes, 2 * n_feat, linear)
        if cross_attn:  # at S/4 on the encoder's last map (the skip and the bottleneck both read it), then at S/2
            self.tokens = ObjectTokens(n_classes, 2 * n_feat, max_objects)
            self.attn_bottom = Attention(2 * n_feat, 2 * n_feat)
            if cross_attn == 2:
                self.attn_mid = Attention(n_feat, 2 * n_feat)
        if self_attn:  # on the S/4 map after the object tokens: where each object goes, seen by all positions
            self.attn_self = Attention(2 * n_feat)
        if adagn:  # one embedding of (t, cond) for every block, as in the guided-diffusion U-Net
            self.timeembed_norm, self.contextembed_norm = EmbedFC(1, emb_dim), EmbedFC(n_classes, emb_dim, linear)
        self.up0 = nn.Sequential(nn.ConvTranspose2d(2 * n_feat, 2 * n_feat, bottom, bottom),
                                 nn.GroupNorm(8, 2 * n_feat), nn.ReLU())
        self.up1 = UnetUp(4 * n_feat, n_feat, emb_dim)
        self.up2 = UnetUp(2 * n_feat, n_feat, emb_dim)
        self.out = nn.Sequential(nn.Conv2d(2 * n_feat, n_feat, 3, 1, 1), nn.GroupNorm(8, n_feat), nn.ReLU(),
                                 nn.Conv2d(n_feat, in_channels, 3, 1, 1))

    def forward(self, x_t: torch.Tensor, cond: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        # the embeddings run in float32 whatever autocast says: t / T in bf16 keeps only 328 of 400 steps apart
        with torch.autocast(x_t.device.type, enabled=False):
            t, cond = t.float().view(-1, 1), cond.float()
            c_e1, t_e1 = self.contextembed1(cond), self.timeembed1(t)  # (N, 2F, 1, 1) each
            c_e2, t_e2 = self.contextembed2(cond), self.timeembed2(t)  # (N, F, 1, 1) each
            # (N, 4F)
            emb = F.silu(self.contextembed_norm(cond) + self.timeembed_norm(t)).flatten(1) if self.adagn else None
            tokens = self.tokens(cond) if self.cross_attn else None  # (N, max_objects, 2F)
        x = self.init_conv(x_t, emb)     # (N, F, S, S)
        down1 = self.down1(x, emb)       # (N, F, S/2, S/2)
        down2 = self.down2(down1, emb)   # (N, 2F, S/4, S/4)
        if self.cross_attn:
            down2 = self.attn_bottom(down2, tokens)
        if self.self_attn:
            down2 = self.attn_self(down2)
        hidden = self.to_vec(down2)      # (N, 2F, 1, 1)
        if self.cond_bottleneck:
            with torch.autocast(x_t.device.type, enabled=False):
                hidden = self.contextembed0(cond) * hidden.float() + self.timeembed0(t)  # (N, 2F, 1, 1)
        up1 = self.up0(hidden)                                 # (N, 2F, S/4, S/4)
        up2 = self.up1(c_e1 * up1 + t_e1, down2, emb)          # (N, F, S/2, S/2)
        if self.cross_attn == 2:
            up2 = self.attn_mid(up2, tokens)
        up3 = self.up2(c_e2 * up2 + t_e2, down1, emb)          # (N, F, S, S)
        return self.out(torch.cat([up3, x], dim=1))


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """For sampling only: each eval-mode BatchNorm after a conv becomes part of that conv's weights and bias, which
    gives the same outputs (to rounding) without a separate pass over every feature map. Changes model in place."""
    for module in model.modules():
        if isinstance(module, ResidualConvBlock) and not module.training:
            for seq in (module.conv1, module.conv2):
                if isinstance(seq[1], nn.BatchNorm2d):
                    seq[0] = fuse_conv_bn_eval(seq[0], seq[1])
                    seq[1] = nn.Identity()
    return model


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
