"""Swin Transformer backbone (Liu et al., "Swin Transformer: Hierarchical Vision Transformer using
Shifted Windows", ICCV 2021) as a detectron2 ``Backbone``.

The module tree and parameter names follow the published Swin / MaskFormer checkpoints
(``patch_embed.*``, ``layers.{i}.blocks.{j}.*``, ``layers.{i}.downsample.*``, ``norm{i}.*``), so
those checkpoints load without any key remapping.

Internally feature maps are kept channels-last, ``B x H x W x C``; the outputs are
``B x C x H x W``.
"""
import math
from typing import ContextManager, Dict, Optional, Sequence

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, Backbone
from torch import nn

from ...layers.context_switch import ContextSwitch
from ...layers.fused_linear import linear

__all__ = [
    "D2SwinTransformer",
    "window_partition",
    "window_reverse",
    "relative_position_index",
    "shifted_window_attention_mask",
    "zero_masked_attention",
    "zero_masked_attention_enabled",
]

# Value added to attention logits between tokens that were not neighbours before the cyclic
# shift. The original implementation uses -100 (not -inf); kept for numerical parity.
_MASKED_LOGIT = -100.0
_ZERO_MASKED = ContextSwitch("swin_zero_masked_attention")


def zero_masked_attention(enabled: bool = True) -> ContextManager[None]:
    """
    Within this context the shifted windows mask their attention with -inf instead of the
    original's -100: the masked pairs get a weight of exactly 0 instead of about e^-100, which is
    below float32's resolution beside the unmasked weights (the same result to float rounding) but
    is a denormal number, and a matrix product with denormal operands runs many times slower on
    x86 CPUs (a 441 x 768 x 768 product of Swin-T's last stage: 30 ms instead of 1.6 ms). Every
    token attends at least to itself, so no row is masked entirely. The optimised inference path
    and training with ``optimize_training`` (``SegmentationMetaArch.backbone_features``) enter it;
    the modules as built keep -100.
    """
    return _ZERO_MASKED(enabled)


def zero_masked_attention_enabled() -> bool:
    """Whether the calling code runs inside :func:`zero_masked_attention`."""
    return _ZERO_MASKED.enabled()


def window_partition(x: torch.Tensor, window_size: int) -> torch.Tensor:
    """
    Split a feature map into non-overlapping square windows.

    Args:
        x: B x H x W x C, with H and W multiples of ``window_size``.
    Returns:
        (B * num_windows) x window_size**2 x C, windows in row-major order per image and the
        tokens of each window in row-major order.
    """
    B, H, W, C = x.shape
    if H % window_size or W % window_size:
        raise ValueError(
            f"window_partition: feature map of size {H}x{W} is not a multiple of the window "
            f"size {window_size}"
        )
    x = x.view(B, H // window_size, window_size, W // window_size, window_size, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window_size * window_size, C)


def window_reverse(windows: torch.Tensor, window_size: int, H: int, W: int) -> torch.Tensor:
    """
    Inverse of :func:`window_partition`.

    Args:
        windows: (B * num_windows) x window_size**2 x C
    Returns:
        B x H x W x C
    """
    C = windows.shape[-1]
    x = windows.view(-1, H // window_size, W // window_size, window_size, window_size, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, H, W, C)


def relative_position_index(window_size: int) -> torch.Tensor:
    """
    Index into the relative position bias table for every pair of tokens in a window.

    For tokens i, j at (row, col) positions p_i, p_j the offset d = p_i - p_j lies in
    [-(w-1), w-1]^2; it is mapped to ``(d_row + w - 1) * (2w - 1) + (d_col + w - 1)``.

    Returns:
        int64 tensor of shape window_size**2 x window_size**2.
    """
    rows, cols = torch.meshgrid(
        torch.arange(window_size), torch.arange(window_size), indexing="ij"
    )
    coords = torch.stack([rows.flatten(), cols.flatten()])  # 2 x N
    offsets = coords[:, :, None] - coords[:, None, :]  # 2 x N x N
    offsets = offsets + (window_size - 1)
    return offsets[0] * (2 * window_size - 1) + offsets[1]


def shifted_window_attention_mask(
    height: int, width: int, window_size: int, shift_size: int, device=None,
    masked_logit: float = _MASKED_LOGIT,
) -> torch.Tensor:
    """
    Additive attention mask for windows taken after a cyclic shift by ``-shift_size``.

    After the shift, the windows along the bottom and right borders contain tokens that come from
    opposite sides of the image; those must not attend to each other. Tokens are labelled by the
    region they come from, and pairs with different labels get a large negative logit.

    Args:
        height, width: size of the (padded) feature map, multiples of ``window_size``.
        masked_logit: the value of the masked pairs (-100, as the original, or -inf).
    Returns:
        num_windows x window_size**2 x window_size**2 float tensor of 0 and ``masked_logit``.
    """
    labels = torch.zeros((1, height, width, 1), device=device)
    bands = (
        slice(0, -window_size),
        slice(-window_size, -shift_size),
        slice(-shift_size, None),
    )
    label = 0
    for row_band in bands:
        for col_band in bands:
            labels[:, row_band, col_band, :] = label
            label += 1
    window_labels = window_partition(labels, window_size).squeeze(-1)  # nW x N
    different = window_labels[:, None, :] != window_labels[:, :, None]
    return torch.zeros(different.shape, device=device).masked_fill_(different, masked_logit)


def drop_path(x: torch.Tensor, drop_prob: float, training: bool) -> torch.Tensor:
    """Stochastic depth: zero the whole residual branch of each sample with probability
    ``drop_prob`` and rescale the kept ones by 1 / (1 - drop_prob)."""
    if drop_prob == 0.0 or not training:
        return x
    keep_prob = 1.0 - drop_prob
    mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep_prob)
    return x * mask / keep_prob


class DropPath(nn.Module):
    """Module wrapper of :func:`drop_path`."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x):
        return drop_path(x, self.drop_prob, self.training)

    def extra_repr(self):
        return f"drop_prob={self.drop_prob}"


class Mlp(nn.Module):
    """Two-layer feed-forward network with GELU: C -> hidden -> C, applied on the last dim (each
    linear layer with its activation one call inside ``layers.inference_kernels``)."""

    def __init__(self, dim: int, hidden_dim: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x):
        return self.drop(linear(self.drop(linear(x, self.fc1, "gelu")), self.fc2))


class WindowAttention(nn.Module):
    """
    Multi-head self-attention inside each window, with a learned bias per head for every
    relative position of two tokens in the window.
    """

    def __init__(
        self,
        dim: int,
        window_size: int,
        num_heads: int,
        qkv_bias: bool = True,
        qk_scale: Optional[float] = None,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"Swin: channels {dim} are not divisible by num_heads {num_heads}")
        self.dim = dim
        self.window_size = window_size
        self.num_heads = num_heads
        self.scale = qk_scale or (dim // num_heads) ** -0.5

        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((2 * window_size - 1) ** 2, num_heads)
        )
        # Persistent: the published checkpoints contain it.
        self.register_buffer("relative_position_index", relative_position_index(window_size))

        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def relative_position_bias(self) -> torch.Tensor:
        """Returns: num_heads x N x N bias, N = window_size**2."""
        n = self.window_size * self.window_size
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        return bias.view(n, n, self.num_heads).permute(2, 0, 1)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """
        Args:
            x: (B * num_windows) x N x C tokens of each window.
            mask: num_windows x N x N additive mask (0 / large negative), or None.
        Returns:
            (B * num_windows) x N x C
        """
        num_win_total, n, c = x.shape
        head_dim = c // self.num_heads
        # qkv output channels are laid out as (3, heads, head_dim) in the checkpoints.
        qkv = linear(x, self.qkv).view(num_win_total, n, 3, self.num_heads, head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B*nW) x heads x N x d

        attn_bias = self.relative_position_bias().unsqueeze(0)  # 1 x heads x N x N
        if mask is not None:
            num_windows = mask.shape[0]
            attn_bias = attn_bias.unsqueeze(0) + mask[None, :, None].to(attn_bias.dtype)
            attn_bias = attn_bias.expand(num_win_total // num_windows, -1, -1, -1, -1)
            attn_bias = attn_bias.reshape(num_win_total, self.num_heads, n, n)
        attn_bias = attn_bias.to(q.dtype)

        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=attn_bias,
            dropout_p=self.attn_drop if self.training else 0.0,
            scale=self.scale,
        )
        out = out.transpose(1, 2).reshape(num_win_total, n, c)
        return self.proj_drop(linear(out, self.proj))

    def extra_repr(self):
        return f"dim={self.dim}, window_size={self.window_size}, num_heads={self.num_heads}"


class SwinTransformerBlock(nn.Module):
    """
    One Swin block: (shifted-)window attention and an MLP, each pre-normed and residual.
    Feature maps of any size are padded to multiples of the window size and cropped back.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: int,
        shift_size: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        qk_scale: Optional[float] = None,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
    ):
        super().__init__()
        if not 0 <= shift_size < window_size:
            raise ValueError(
                f"Swin: shift_size {shift_size} must be in [0, window_size={window_size})"
            )
        self.window_size = window_size
        self.shift_size = shift_size
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(
            dim, window_size, num_heads, qkv_bias, qk_scale, attn_drop=attn_drop, proj_drop=drop
        )
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor]) -> torch.Tensor:
        """
        Args:
            x: B x H x W x C
            attn_mask: mask from :func:`shifted_window_attention_mask` for the padded size;
                used only when this block shifts.
        Returns:
            B x H x W x C
        """
        B, H, W, C = x.shape
        ws = self.window_size
        shortcut = x
        x = self.norm1(x)
        pad_b = (ws - H % ws) % ws
        pad_r = (ws - W % ws) % ws
        x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
        Hp, Wp = H + pad_b, W + pad_r

        if self.shift_size > 0:
            x = torch.roll(x, shifts=(-self.shift_size, -self.shift_size), dims=(1, 2))
        else:
            attn_mask = None
        windows = self.attn(window_partition(x, ws), mask=attn_mask)
        x = window_reverse(windows, ws, Hp, Wp)
        if self.shift_size > 0:
            x = torch.roll(x, shifts=(self.shift_size, self.shift_size), dims=(1, 2))
        x = x[:, :H, :W, :]

        x = shortcut + self.drop_path(x)
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchMerging(nn.Module):
    """
    Halve the resolution and double the channels: concatenate each 2x2 neighbourhood
    (odd sizes are zero-padded) to 4C channels, LayerNorm, then a linear map to 2C.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x: B x H x W x C
        Returns:
            B x ceil(H/2) x ceil(W/2) x 2C
        """
        H, W = x.shape[1:3]
        x = F.pad(x, (0, 0, 0, W % 2, 0, H % 2))
        # Order of the four neighbours as in the published checkpoints: (row, col) offsets
        # (0, 0), (1, 0), (0, 1), (1, 1).
        x = torch.cat(
            [x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1
        )
        return linear(self.norm(x), self.reduction)


class SwinStage(nn.Module):
    """
    A stage of ``depth`` Swin blocks alternating regular and shifted windows, optionally
    followed by patch merging.
    """

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        window_size: int,
        mlp_ratio: float,
        qkv_bias: bool,
        qk_scale: Optional[float],
        drop: float,
        attn_drop: float,
        drop_path: Sequence[float],
        downsample: bool,
    ):
        super().__init__()
        self.window_size = window_size
        self.shift_size = window_size // 2
        self.blocks = nn.ModuleList(
            [
                SwinTransformerBlock(
                    dim,
                    num_heads,
                    window_size,
                    shift_size=0 if i % 2 == 0 else self.shift_size,
                    mlp_ratio=mlp_ratio,
                    qkv_bias=qkv_bias,
                    qk_scale=qk_scale,
                    drop=drop,
                    attn_drop=attn_drop,
                    drop_path=drop_path[i],
                )
                for i in range(depth)
            ]
        )
        self.downsample = PatchMerging(dim) if downsample else None

    def forward(self, x: torch.Tensor):
        """
        Args:
            x: B x H x W x C
        Returns:
            (stage output B x H x W x C, input of the next stage B x H/2 x W/2 x 2C, or the
            stage output itself when this stage does not downsample)
        """
        H, W = x.shape[1:3]
        ws = self.window_size
        attn_mask = None
        if self.shift_size > 0 and len(self.blocks) > 1:
            attn_mask = shifted_window_attention_mask(
                math.ceil(H / ws) * ws, math.ceil(W / ws) * ws, ws, self.shift_size, x.device,
                float("-inf") if zero_masked_attention_enabled() else _MASKED_LOGIT,
            )
        for block in self.blocks:
            x = block(x, attn_mask)
        if self.downsample is None:
            return x, x
        return x, self.downsample(x)


class PatchEmbed(nn.Module):
    """Non-overlapping patch embedding: a strided conv, then LayerNorm (optional)."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int, patch_norm: bool):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim) if patch_norm else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x: B x C_in x H x W; H and W are zero-padded to multiples of the patch size.
        Returns:
            B x ceil(H/p) x ceil(W/p) x embed_dim (channels last)
        """
        H, W = x.shape[-2:]
        p = self.patch_size
        x = F.pad(x, (0, (p - W % p) % p, 0, (p - H % p) % p))
        x = self.proj(x).permute(0, 2, 3, 1)
        if self.norm is not None:
            x = self.norm(x)
        return x


@BACKBONE_REGISTRY.register()
class D2SwinTransformer(Backbone):
    """
    Hierarchical Swin Transformer returning stage outputs ``res2..res5`` (strides 4, 8, 16, 32;
    channels embed_dim * 1, 2, 4, 8), each LayerNorm-ed by ``norm{i}``.

    Accepts inputs of any size; output sizes are ceil(H / stride) x ceil(W / stride).
    """

    @configurable
    def __init__(
        self,
        *,
        pretrain_img_size: int = 224,
        patch_size: int = 4,
        in_chans: int = 3,
        embed_dim: int = 96,
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_size: int = 7,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        qk_scale: Optional[float] = None,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.2,
        ape: bool = False,
        patch_norm: bool = True,
        out_features: Sequence[str] = ("res2", "res3", "res4", "res5"),
    ):
        """
        Args:
            pretrain_img_size: image size of pre-training; sets the grid of the absolute
                position embedding (only with ``ape``).
            patch_size: side of the square patches of the patch embedding.
            in_chans: input channels.
            embed_dim: channels of the first stage; doubled at every following stage.
            depths: number of blocks per stage.
            num_heads: attention heads per stage.
            window_size: side of the attention windows; windows of odd blocks are shifted by
                ``window_size // 2``.
            mlp_ratio: hidden / input channels of the MLPs.
            qkv_bias, qk_scale: bias of the qkv projection; scale of q·k (default head_dim**-0.5).
            drop_rate, attn_drop_rate: dropout after projections / on attention weights.
            drop_path_rate: stochastic depth rate of the last block, growing linearly from 0.
            ape: add a learned absolute position embedding after patch embedding.
            patch_norm: LayerNorm after patch embedding.
            out_features: subset of ``res2 .. res{len(depths)+1}`` to return.
        """
        super().__init__()
        depths, num_heads = list(depths), list(num_heads)
        if len(depths) != len(num_heads):
            raise ValueError(
                f"MODEL.SWIN.DEPTHS {depths} and MODEL.SWIN.NUM_HEADS {num_heads} must have the "
                "same length (one entry per stage)"
            )
        num_stages = len(depths)
        stage_names = [f"res{i + 2}" for i in range(num_stages)]
        unknown = [f for f in out_features if f not in stage_names]
        if unknown or not out_features:
            raise ValueError(
                f"MODEL.SWIN.OUT_FEATURES {list(out_features)} must be a non-empty subset of "
                f"{stage_names}"
            )
        self.in_chans = in_chans
        self.num_stages = num_stages
        self.ape = ape

        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim, patch_norm)
        if ape:
            grid = pretrain_img_size // patch_size
            self.absolute_pos_embed = nn.Parameter(torch.zeros(1, embed_dim, grid, grid))
            nn.init.trunc_normal_(self.absolute_pos_embed, std=0.02)
        self.pos_drop = nn.Dropout(p=drop_rate)

        # Stochastic depth rate grows linearly from 0 (first block) to drop_path_rate (last).
        num_blocks = sum(depths)
        block_drop_path = [drop_path_rate * i / max(num_blocks - 1, 1) for i in range(num_blocks)]
        self.layers = nn.ModuleList()
        for i in range(num_stages):
            first = sum(depths[:i])
            self.layers.append(
                SwinStage(
                    dim=embed_dim * 2**i,
                    depth=depths[i],
                    num_heads=num_heads[i],
                    window_size=window_size,
                    mlp_ratio=mlp_ratio,
                    qkv_bias=qkv_bias,
                    qk_scale=qk_scale,
                    drop=drop_rate,
                    attn_drop=attn_drop_rate,
                    drop_path=block_drop_path[first : first + depths[i]],
                    downsample=i < num_stages - 1,
                )
            )

        # Keep the stage order, whatever the order of out_features.
        self._out_features = [name for name in stage_names if name in out_features]
        self._out_feature_channels = {}
        self._out_feature_strides = {}
        for i, name in enumerate(stage_names):
            if name in self._out_features:
                self.add_module(f"norm{i}", nn.LayerNorm(embed_dim * 2**i))
                self._out_feature_channels[name] = embed_dim * 2**i
                self._out_feature_strides[name] = patch_size * 2**i

        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module):
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    @classmethod
    def from_config(cls, cfg, input_shape: Optional[ShapeSpec] = None):
        swin = cfg.MODEL.SWIN
        in_chans = 3
        if input_shape is not None and input_shape.channels is not None:
            in_chans = input_shape.channels
        return {
            "pretrain_img_size": swin.PRETRAIN_IMG_SIZE,
            "patch_size": swin.PATCH_SIZE,
            "in_chans": in_chans,
            "embed_dim": swin.EMBED_DIM,
            "depths": swin.DEPTHS,
            "num_heads": swin.NUM_HEADS,
            "window_size": swin.WINDOW_SIZE,
            "mlp_ratio": swin.MLP_RATIO,
            "qkv_bias": swin.QKV_BIAS,
            "qk_scale": swin.QK_SCALE,
            "drop_rate": swin.DROP_RATE,
            "attn_drop_rate": swin.ATTN_DROP_RATE,
            "drop_path_rate": swin.DROP_PATH_RATE,
            "ape": swin.APE,
            "patch_norm": swin.PATCH_NORM,
            "out_features": swin.OUT_FEATURES,
        }

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """
        Args:
            x: B x in_chans x H x W normalized images, any H and W.
        Returns:
            dict of the requested ``res{i}``: B x C_i x ceil(H / s_i) x ceil(W / s_i), in the
            memory format of ``x`` (contiguous, or channels-last)
        """
        if x.dim() != 4 or x.shape[1] != self.in_chans:
            raise ValueError(
                f"D2SwinTransformer takes a B x {self.in_chans} x H x W tensor, "
                f"got shape {tuple(x.shape)}"
            )
        # Outputs keep the input's layout: planar by default; for a channels-last input (the
        # optimised inference path) the B x H x W x C stage outputs are returned as they lie.
        memory_format = (torch.channels_last if x.is_contiguous(memory_format=torch.channels_last)
                         and not x.is_contiguous() else torch.contiguous_format)
        x = self.patch_embed(x)  # B x Hp x Wp x C
        if self.ape:
            pos = F.interpolate(
                self.absolute_pos_embed, size=x.shape[1:3], mode="bicubic", align_corners=False
            )
            x = x + pos.permute(0, 2, 3, 1)
        x = self.pos_drop(x)

        outputs = {}
        for i, stage in enumerate(self.layers):
            stage_out, x = stage(x)
            name = f"res{i + 2}"
            if name in self._out_features:
                stage_out = getattr(self, f"norm{i}")(stage_out)
                outputs[name] = stage_out.permute(0, 3, 1, 2).contiguous(memory_format=memory_format)
        return outputs

    def output_shape(self) -> Dict[str, ShapeSpec]:
        return {
            name: ShapeSpec(
                channels=self._out_feature_channels[name], stride=self._out_feature_strides[name]
            )
            for name in self._out_features
        }

    @property
    def size_divisibility(self) -> int:
        return 32
