"""The denoising network: a ContextUnet (residual conv blocks, 2 down / 3 up) that predicts the noise eps in x_t.

The condition enters the decoder as `c_e * h + t_e`: a context embedding multiplies the feature map and a time
embedding is added, as in the classifier-free guidance MNIST ContextUnet that report C started from. Its constructor
arguments are saved in every checkpoint (`model.config`), so that every script rebuilds the network from the
checkpoint alone.
"""
import torch
import torch.nn as nn
from torch.nn.utils.fusion import fuse_conv_bn_eval


class ResidualConvBlock(nn.Module):
    """Two 3x3 conv -> BatchNorm -> GELU layers, with a skip connection when asked for."""

    def __init__(self, in_ch: int, out_ch: int, is_res: bool = False):
        super().__init__()
        self.is_res, self.same_ch = is_res, in_ch == out_ch
        self.conv1 = nn.Sequential(nn.Conv2d(in_ch, out_ch, 3, 1, 1), nn.BatchNorm2d(out_ch), nn.GELU())
        self.conv2 = nn.Sequential(nn.Conv2d(out_ch, out_ch, 3, 1, 1), nn.BatchNorm2d(out_ch), nn.GELU())

    def forward(self, x):
        h1 = self.conv1(x)
        h2 = self.conv2(h1)
        if not self.is_res:
            return h2
        skip = x if self.same_ch else h1  # when the widths differ, conv1's output stands in for the input
        return (skip + h2) / 1.414  # keeps the variance of the sum near that of one branch


class UnetDown(nn.Module):
    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.net = nn.Sequential(ResidualConvBlock(in_ch, out_ch), nn.MaxPool2d(2))

    def forward(self, x):
        return self.net(x)


class UnetUp(nn.Module):
    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.net = nn.Sequential(nn.ConvTranspose2d(in_ch, out_ch, 2, 2),
                                 ResidualConvBlock(out_ch, out_ch), ResidualConvBlock(out_ch, out_ch))

    def forward(self, x, skip):
        return self.net(torch.cat([x, skip], dim=1))


class EmbedFC(nn.Module):
    """Linear -> GELU -> Linear. Report C found the GELU matters: without it accuracy fell to about 0.7."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))

    def forward(self, x):
        return self.net(x)[:, :, None, None]  # (N, out_dim, 1, 1) to broadcast over a feature map


class ContextUnet(nn.Module):
    """eps_pred = model(x_t, cond, t): x_t (N, C, S, S), cond (N, n_classes) multi-hot, t (N,) in [0, 1].

    An all-zero cond is the "no condition" input of classifier-free guidance: the context MLP then returns its
    bias path alone, a learned null embedding, with no sign tricks or extra flags. S must be divisible by 4.
    """

    def __init__(self, in_channels: int = 3, n_feat: int = 128, n_classes: int = 24, image_size: int = 64,
                 cond_bottleneck: bool = False):
        super().__init__()
        if image_size % 4:
            raise ValueError(f"image_size {image_size} is not divisible by 4 (the net halves it twice)")
        self.config = dict(in_channels=in_channels, n_feat=n_feat, n_classes=n_classes, image_size=image_size)
        if cond_bottleneck:  # only when set, so report C's checkpoints keep their exact config
            self.config["cond_bottleneck"] = True
        bottom = image_size // 4  # spatial size after the two downsamplings
        self.init_conv = ResidualConvBlock(in_channels, n_feat, is_res=True)
        self.down1 = UnetDown(n_feat, n_feat)
        self.down2 = UnetDown(n_feat, 2 * n_feat)
        # the bottleneck squeezes the whole S/4 map to one vector, then grows it back: global scene layout
        self.to_vec = nn.Sequential(nn.AvgPool2d(bottom), nn.GELU())
        self.timeembed1, self.timeembed2 = EmbedFC(1, 2 * n_feat), EmbedFC(1, n_feat)
        self.contextembed1, self.contextembed2 = EmbedFC(n_classes, 2 * n_feat), EmbedFC(n_classes, n_feat)
        # optionally the condition also shapes the bottleneck vector, from which up0 draws the whole scene layout
        self.cond_bottleneck = cond_bottleneck
        if cond_bottleneck:
            self.timeembed0, self.contextembed0 = EmbedFC(1, 2 * n_feat), EmbedFC(n_classes, 2 * n_feat)
        self.up0 = nn.Sequential(nn.ConvTranspose2d(2 * n_feat, 2 * n_feat, bottom, bottom),
                                 nn.GroupNorm(8, 2 * n_feat), nn.ReLU())
        self.up1 = UnetUp(4 * n_feat, n_feat)
        self.up2 = UnetUp(2 * n_feat, n_feat)
        self.out = nn.Sequential(nn.Conv2d(2 * n_feat, n_feat, 3, 1, 1), nn.GroupNorm(8, n_feat), nn.ReLU(),
                                 nn.Conv2d(n_feat, in_channels, 3, 1, 1))

    def forward(self, x_t: torch.Tensor, cond: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        x = self.init_conv(x_t)          # (N, F, S, S)
        down1 = self.down1(x)            # (N, F, S/2, S/2)
        down2 = self.down2(down1)        # (N, 2F, S/4, S/4)
        hidden = self.to_vec(down2)      # (N, 2F, 1, 1)
        # the embeddings run in float32 whatever autocast says: t / T in bf16 keeps only 328 of 400 steps apart
        with torch.autocast(x_t.device.type, enabled=False):
            t, cond = t.float().view(-1, 1), cond.float()
            c_e1, t_e1 = self.contextembed1(cond), self.timeembed1(t)  # (N, 2F, 1, 1) each
            c_e2, t_e2 = self.contextembed2(cond), self.timeembed2(t)  # (N, F, 1, 1) each
            if self.cond_bottleneck:
                hidden = self.contextembed0(cond) * hidden.float() + self.timeembed0(t)  # (N, 2F, 1, 1)
        up1 = self.up0(hidden)                                 # (N, 2F, S/4, S/4)
        up2 = self.up1(c_e1 * up1 + t_e1, down2)               # (N, F, S/2, S/2)
        up3 = self.up2(c_e2 * up2 + t_e2, down1)               # (N, F, S, S)
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
