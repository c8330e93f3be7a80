"""
EmoNeXt: an Adapted ConvNeXt for Facial Emotion Recognition (El Boudouri & Bohi, MMSP 2023), in one file.

ConvNeXt + a Spatial Transformer Network in front + Squeeze-Excitation after each downsampling conv + a
self-attention regulariser added to the loss. Parameter names are those of the official code
(github.com/yelboudouri/EmoNeXt), so its checkpoints load with strict=True, and facebookresearch ConvNeXt
ImageNet checkpoints load through `load_weights`.

This file imports only torch and works when copied alone. When the repo's `kernels/` package sits beside it,
the ConvNeXt block and the STN ask it, once each, whether a fused CUDA/Triton op applies to the tensor at hand.

Usage:
    model = EmoNeXt.from_size("tiny", in_chans=1, img_size=48)
    logits = model(x)                  # x: (N, 1, 48, 48) normalised grey faces
    logits, loss = model(x, targets)   # loss = cross-entropy(label_smoothing) + sa_weight * SA
    probs = model.predict(faces)       # faces: uint8 grey or RGB images of any size -> (N, num_classes)
    logits = model.predict_logits(x)   # x: uint8 grey faces (N, 48, 48), as data.py loads them; tta="tencrop"
    model.config.class_names           # what each of the num_classes outputs means
    fast = model.for_inference()       # an eval copy for serving: options channels_last=, compile=
"""
import contextlib
import copy
import errno
import io
import os
import shutil
import stat
import sys
import tempfile
import zipfile
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

try:  # optional fused ops; absent when this file is copied alone
    import kernels
    if not hasattr(kernels, "use_dwconv_layernorm"):  # an unrelated package of the same name
        kernels = None
except ImportError:
    kernels = None


class InputConv2d(nn.Conv2d):
    """The convs that see the model's input (the stem's, the localization net's first). They also take grey (N, 1, H, W)
    input to an RGB model: the weights summed over the channels give what that image repeated over the channels
    gives, at 1/in_channels of the work. The model's reference path (training, gradients) repeats the image."""

    def weight_for(self, x):
        return self.weight.sum(1, keepdim=True) if x.shape[1] == 1 < self.in_channels else self.weight

    def forward(self, x):
        return self._conv_forward(x, self.weight_for(x), self.bias)


def max_pool2_relu(x):
    """relu(max_pool2d(x, 2, stride=2)) as the maximum of the four strided views: the same numbers (NaN included),
    and on CPU far cheaper than max_pool2d, which computes argmax indices and is slow for these small channel counts."""
    h, w = x.shape[-2] // 2 * 2, x.shape[-1] // 2 * 2  # floor mode: an odd last row/column is left out
    y = torch.maximum(x[..., 0:h:2, 0:w:2], x[..., 0:h:2, 1:w:2])
    torch.maximum(y, x[..., 1:h:2, 0:w:2], out=y)
    torch.maximum(y, x[..., 1:h:2, 1:w:2], out=y)
    return y.clamp_min_(0)


def localization_folded(localization, x):
    """The STN's localization net (conv, BatchNorm, max pool, ReLU, twice) as eval mode computes it, with less work:
    eval-mode BatchNorm is a per-channel affine map y = (z - mean) * s + beta, s = gamma / sqrt(var + eps), so it
    folds into the conv before it: weight * s, (bias - mean) * s + beta (the same numbers up to float rounding)."""
    conv0, bn0, _, _, conv1, bn1, _, _ = localization
    for conv, bn in ((conv0, bn0), (conv1, bn1)):
        scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
        weight = conv.weight_for(x) if isinstance(conv, InputConv2d) else conv.weight
        x = max_pool2_relu(conv._conv_forward(x, weight * scale[:, None, None, None],
                                              (conv.bias - bn.running_mean) * scale + bn.bias))
    return x


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an (N, C, H, W) tensor (the official "channels_first" LayerNorm)."""

    def forward(self, x):
        return F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias,
                            self.eps).permute(0, 3, 1, 2)


class DropPath(nn.Module):
    """Stochastic depth: drops a sample's whole residual branch with probability p, scales survivors by 1/(1-p)."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x):
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask.div_(keep)

    def extra_repr(self):
        return f"p={self.p}"


class SqueezeExcite(nn.Module):
    """Channel gating from global context (Hu et al. 2018): x * sigmoid(W2 relu(W1 avgpool(x))).

    Args:
        channels (int): number of channels of the input.
        reduction (int): bottleneck ratio of the two bias-free linear layers. Default: 16.
    """

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        hidden = max(1, channels // reduction)
        self.fc = nn.Sequential(nn.Linear(channels, hidden, bias=False), nn.ReLU(inplace=True),
                                nn.Linear(hidden, channels, bias=False), nn.Sigmoid())

    def forward(self, x):  # (N, C, H, W)
        return x * self.fc(x.mean((2, 3)))[:, :, None, None]


class Block(nn.Module):
    """ConvNeXt block: dwconv 7x7 -> LayerNorm -> Linear 4x -> GELU -> Linear -> layer scale -> drop path, residual.

    Args:
        dim (int): number of channels.
        drop_path (float): stochastic depth rate. Default: 0.
        layer_scale_init (float): initial value of the per-channel layer scale `gamma`; <= 0 disables it.
    """

    def __init__(self, dim: int, drop_path: float = 0.0, layer_scale_init: float = 1e-6):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), layer_scale_init)) if layer_scale_init > 0 else None
        self.drop_path = DropPath(drop_path)

    def forward(self, x):  # (N, C, H, W)
        if kernels is not None and kernels.use_dwconv_layernorm(x):
            # one pass: reads x once, writes the normalised (N, H, W, C) activation once
            y = kernels.dwconv_layernorm(x, self.dwconv.weight, self.dwconv.bias,
                                         self.norm.weight, self.norm.bias, self.norm.eps)
        else:
            y = self.norm(self.depthwise(x).permute(0, 2, 3, 1))  # (N, H, W, C)
        y = self.pwconv2(self.act(self.pwconv1(y)))
        if self.gamma is not None:
            y = self.gamma * y
        return x + self.drop_path(y.permute(0, 3, 1, 2))

    def depthwise(self, x):  # (N, C, H, W) -> (N, C, H, W)
        # On a map smaller than the kernel (the last stage at 48 or 64 px: 1x1, 2x2) only the central
        # (2H-1) x (2W-1) taps ever meet a pixel, the others meet the zero padding: the same conv, exactly, on the
        # taps that count, since CPU conv kernels are slow at a 7x7 kernel on a 1x1 map.
        r = self.dwconv.padding[0]
        rh, rw = min(r, x.shape[-2] - 1), min(r, x.shape[-1] - 1)
        if rh == rw == r:
            return self.dwconv(x)
        weight = self.dwconv.weight[:, :, r - rh:r + rh + 1, r - rw:r + rw + 1]
        return F.conv2d(x, weight, self.dwconv.bias, padding=(rh, rw), groups=self.dwconv.groups)


class BatchSelfAttention(nn.Module):
    """The official code's self-attention regulariser: attention between the pooled features of a batch.

    Returns the (B, B) weights softmax(Q K^T / d**0.25) of the LayerNorm-ed (B, d) features; the loss term is
    SA = mean((W - mean(W))**2). The paper's text describes attention per feature vector scaled by 1/sqrt(d);
    the official code, whose numbers the paper reports, attends across the batch with d**0.25, and that is what
    this module does, so results and checkpoints carry over. `value` is unused by the loss and kept only so that
    official state dicts load with strict=True. The term never changes the logits.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)

    def forward(self, x):  # (B, d) -> (B, B)
        x = self.norm(x)
        scores = self.query(x) @ self.key(x).T / x.shape[-1] ** 0.25
        return scores.softmax(dim=-1)


FACE_SIDE = 48  # FER2013's faces are 48x48 grey: predict() brings faces of other sizes to it first, as predict.py does
FER2013_MEAN, FER2013_STD = 0.5077, 0.2551  # grey levels (0..1) over the 28,709 faces of FER2013's Training split
FER2013_CLASS_NAMES = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")  # its labels 0..6


@dataclass
class EmoNeXtConfig:
    depths: tuple = (3, 3, 9, 3)
    dims: tuple = (96, 192, 384, 768)
    img_size: int = 224           # square input side; fixes the STN regressor's input width
    in_chans: int = 3             # 1 for grey input at a third of the stem's work; 3 to match ImageNet weights
    stem_stride: int = 4          # the paper's patchify stem; 2 (the same 4x4 kernel, overlapping) keeps 4x the map
    num_classes: int = 7
    drop_path_rate: float = 0.1   # stochastic depth of the last block; linear from 0 over the blocks
    layer_scale_init: float = 1e-6
    label_smoothing: float = 0.2
    sa_weight: float = 1.0        # weight of the self-attention regulariser in the loss
    pixel_mean: float = FER2013_MEAN  # input normalisation: (grey / 255 - pixel_mean) / pixel_std
    pixel_std: float = FER2013_STD
    class_names: tuple = FER2013_CLASS_NAMES  # what each logit means, num_classes of them


# fields that checkpoints written before them lack; such a checkpoint gets the default, which is what it used, except
# class_names: those of the checkpoint's top level where it has them (train.py wrote them there first)
CONFIG_FIELDS_ADDED_LATER = ("pixel_mean", "pixel_std", "class_names", "stem_stride")


SIZES = {
    "atto": ((2, 2, 6, 2), (40, 80, 160, 320)),
    "femto": ((2, 2, 6, 2), (48, 96, 192, 384)),
    "pico": ((2, 2, 6, 2), (64, 128, 256, 512)),
    "nano": ((2, 2, 8, 2), (80, 160, 320, 640)),
    "tiny": ((3, 3, 9, 3), (96, 192, 384, 768)),
    "small": ((3, 3, 27, 3), (96, 192, 384, 768)),
    "base": ((3, 3, 27, 3), (128, 256, 512, 1024)),
    "large": ((3, 3, 27, 3), (192, 384, 768, 1536)),
    "xlarge": ((3, 3, 27, 3), (256, 512, 1024, 2048)),
}

TTA_MODES = ("none", "tencrop")  # test-time augmentation: the plain path, or the official recipe's ten-crop
DEFAULT_TTA = "tencrop"  # what a score (eval.py) and a photo's faces (predict.py) get unless told otherwise
MIN_IMG_SIZE = 32  # the 32x downsampling leaves 1x1 at stage 4; the localization net needs 18
STEM_STRIDES = (4, 2)  # the stem's stride: the paper's 4, or 2 for small faces (the same weights fit both)


def _autocast_off(device: torch.device):
    """A context with autocast off on `device` (nothing to turn off where autocast does not exist, e.g. meta)."""
    return torch.autocast(device.type, enabled=False) if torch.amp.is_autocast_available(device.type) \
        else contextlib.nullcontext()


def stn_feature_side(img_size: int) -> int:
    # conv7 -> maxpool2 -> conv5 -> maxpool2; 52 at 224 as in the official code
    return ((img_size - 6) // 2 - 4) // 2


class EmoNeXt(nn.Module):
    """EmoNeXt classifier.

    Args:
        config (EmoNeXtConfig): architecture and loss settings; `EmoNeXt.from_size` builds the standard ones.
    """

    def __init__(self, config: EmoNeXtConfig):
        super().__init__()
        if len(config.depths) != 4 or len(config.dims) != 4:
            raise ValueError(f"depths and dims need 4 stages, got depths={config.depths} dims={config.dims}")
        if config.img_size < MIN_IMG_SIZE:
            raise ValueError(f"img_size={config.img_size} is too small: EmoNeXt needs at least {MIN_IMG_SIZE} "
                             f"(the 32x downsampling and the STN localization net)")
        if config.in_chans < 1:
            raise ValueError(f"in_chans must be >= 1, got {config.in_chans}")
        if config.stem_stride not in STEM_STRIDES:
            raise ValueError(f"stem_stride must be one of {STEM_STRIDES}, got {config.stem_stride}")
        self.config = config
        dims, c = config.dims, config.in_chans

        # Spatial transformer: a small CNN regresses a 2x3 affine matrix that warps the input
        self.localization = nn.Sequential(
            InputConv2d(c, 8, kernel_size=7), nn.BatchNorm2d(8), nn.MaxPool2d(2, stride=2), nn.ReLU(True),
            nn.Conv2d(8, 10, kernel_size=5), nn.BatchNorm2d(10), nn.MaxPool2d(2, stride=2), nn.ReLU(True))
        s = stn_feature_side(config.img_size)
        self.fc_loc = nn.Sequential(nn.Linear(10 * s * s, 32), nn.ReLU(True), nn.Linear(32, 6))

        # ConvNeXt: stem (conv 4x4/4 + LN), then 3 x (LN + conv 2x2/2 + SE) between the 4 stages. At stride 2 the
        # stem's 4x4 kernel overlaps (padding 1): 48 px faces give stage maps of 24, 12, 6, 3 instead of 12, 6, 3, 1
        stride = config.stem_stride
        stem = nn.Sequential(InputConv2d(c, dims[0], kernel_size=4, stride=stride, padding=(4 - stride) // 2),
                             LayerNorm2d(dims[0], eps=1e-6))
        self.downsample_layers = nn.ModuleList([stem])
        for i in range(3):
            self.downsample_layers.append(nn.Sequential(LayerNorm2d(dims[i], eps=1e-6),
                                                        nn.Conv2d(dims[i], dims[i + 1], kernel_size=2, stride=2),
                                                        SqueezeExcite(dims[i + 1])))
        rates = torch.linspace(0, config.drop_path_rate, sum(config.depths), device="cpu").tolist()
        self.stages = nn.ModuleList()
        for i, depth in enumerate(config.depths):
            start = sum(config.depths[:i])
            self.stages.append(nn.Sequential(*[Block(dims[i], rates[start + j], config.layer_scale_init)
                                               for j in range(depth)]))
        self.norm = nn.LayerNorm(dims[-1], eps=1e-6)
        self.attention = BatchSelfAttention(dims[-1])
        self.head = nn.Linear(dims[-1], config.num_classes)

        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        # the STN starts as the identity warp
        nn.init.zeros_(self.fc_loc[2].weight)
        with torch.no_grad():
            self.fc_loc[2].bias.copy_(torch.tensor([1.0, 0, 0, 0, 1, 0]))

    @classmethod
    def from_size(cls, name: str, **overrides) -> "EmoNeXt":
        """Builds a standard size (atto ... xlarge); keyword arguments override EmoNeXtConfig fields."""
        if name not in SIZES:
            raise ValueError(f"unknown EmoNeXt size {name!r}; choose one of {', '.join(SIZES)}")
        depths, dims = SIZES[name]
        return cls(EmoNeXtConfig(**{"depths": depths, "dims": dims, **overrides}))

    @classmethod
    def from_checkpoint(cls, src, prefer_ema: bool = True, name: str = None) -> "EmoNeXt":
        """Builds the model a checkpoint of this project (train.py's, with its "config") describes, and loads it.
        src: a path, an URL or the checkpoint dict; name: what errors call it (default: the path, or "checkpoint")."""
        ckpt = read_checkpoint(src)
        path = name or ("checkpoint" if isinstance(src, dict) else str(src))
        if not isinstance(ckpt.get("config"), dict):
            raise ValueError(f"{path}: not an EmoNeXt checkpoint of this project (no 'config' entry); "
                             f"build the model yourself and use load_weights(model, path)")
        config = dict(ckpt["config"])
        expected = [f.name for f in fields(EmoNeXtConfig)]
        missing = [k for k in expected if k not in config and k not in CONFIG_FIELDS_ADDED_LATER]
        unknown = [k for k in config if k not in expected]
        if missing or unknown:
            raise ValueError(f"{path}: its config does not describe an EmoNeXt: "
                             + "; ".join(f"{what} {', '.join(map(repr, keys))}" for what, keys in
                                         (("missing", missing), ("unknown", unknown)) if keys)
                             + f" (expected exactly {', '.join(expected)})")
        try:
            names = tuple(config["class_names"] if "class_names" in config else
                          ckpt.get("class_names") or FER2013_CLASS_NAMES)  # see CONFIG_FIELDS_ADDED_LATER
            if len(names) != config["num_classes"]:
                raise ValueError(f"{path}: {len(names)} class names ({', '.join(map(str, names))}) for a model of "
                                 f"{config['num_classes']} classes")
            config.update(depths=tuple(config["depths"]), dims=tuple(config["dims"]), class_names=names)
            model = cls(EmoNeXtConfig(**config))
        except TypeError as e:
            raise ValueError(f"{path}: its config does not describe an EmoNeXt: {e}") from None
        load_weights(model, ckpt, prefer_ema=prefer_ema, verbose=False)
        return model

    def _check_input(self, x):
        c, s = self.config.in_chans, self.config.img_size
        if x.ndim != 4 or x.shape[1] not in (1, c) or x.shape[2] != s or x.shape[3] != s:
            raise ValueError(f"EmoNeXt expects input of shape (N, {c}, {s}, {s})"
                             f"{' or (N, 1, %d, %d)' % (s, s) if c != 1 else ''}, got {tuple(x.shape)}")

    def _fast_eval(self) -> bool:
        """Eval mode without autograd (predict, eval.py, torch.inference_mode): the STN's BatchNorms are folded into
        its convs and grey input to an RGB model stays one channel, the same logits up to float rounding for less
        work. Training and anything taking gradients run the reference layers, exactly as trained."""
        return not (self.training or torch.is_grad_enabled())

    def stn(self, x):
        """Warps x by the affine matrix the localization net regresses from it. Returns (warped x, theta (N,2,3)).
        theta and the sampling run in the weights' precision (fp32) even under autocast: with bf16 grid coordinates
        even the identity warp samples off the pixels (by up to 0.06 px at 64, 0.2 px at 224)."""
        xs = (localization_folded(self.localization, x) if self._fast_eval() else self.localization(x)).flatten(1)
        with _autocast_off(x.device):
            theta = self.fc_loc(xs.to(self.fc_loc[0].weight.dtype)).view(-1, 2, 3)
            xt = x.to(theta.dtype)
            if kernels is not None and kernels.use_affine_sample(x):
                warped = kernels.affine_sample(xt, theta)
            else:
                grid = F.affine_grid(theta, list(x.shape), align_corners=True)
                warped = F.grid_sample(xt, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
        return warped.to(x.dtype), theta

    def forward_features(self, x):
        """(N, C, H, W) input -> (N, dims[-1]) pooled, normalised features."""
        self._check_input(x)
        if not self._fast_eval():  # else grey input to an RGB model stays one channel: see InputConv2d
            x = x.expand(-1, self.config.in_chans, -1, -1)  # grey input to an RGB model: a view, no copy
        x, _ = self.stn(x)
        for downsample, stage in zip(self.downsample_layers, self.stages):
            x = stage(downsample(x))
        return self.norm(x.mean((2, 3)))

    def forward(self, x, targets=None, loss_parts: bool = False):
        """Returns logits; with targets, (logits, loss); with loss_parts=True also (cross_entropy, sa)."""
        features = self.forward_features(x)
        logits = self.head(features)
        if targets is None:
            return logits
        ce = F.cross_entropy(logits, targets, label_smoothing=self.config.label_smoothing)
        weights = self.attention(features)
        sa = ((weights - weights.mean()) ** 2).mean()
        loss = ce + self.config.sa_weight * sa
        return (logits, loss, (ce, sa)) if loss_parts else (logits, loss)

    def for_inference(self, channels_last: bool = False, compile: bool = False) -> "EmoNeXt":
        """A copy of this model ready for fast inference: eval mode, no gradients. This model is left as it is.

        The fast path itself is eval mode under torch.inference_mode() or torch.no_grad() (see `_fast_eval`), which
        `model.eval()` alone also gets: it folds in each forward and changes no weight, so the copy's state dict is
        this model's (same keys, same values) and saving it saves this model, never folded weights.

        Args:
            channels_last (bool): conv weights in channels-last memory format (the ConvNeXt stages already run
                channels-last after the stem's LayerNorm2d; this changes the STN's and the stem's convs: measure).
            compile (bool): compile the copy (torch.compile, inductor, weight freezing): its weights become
                constants of the compiled code, so changes to them after the first call are not seen. Compiling
                takes minutes on a small CPU, and may happen again for each new batch size.
        """
        model = copy.deepcopy(self).eval().requires_grad_(False)
        model.zero_grad()  # the copy keeps no gradients
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        if compile:
            model.compile(options={"freezing": True})
        return model

    @torch.inference_mode()
    def predict_logits(self, x, tta: str = "none", batch_size: int = 256, amp: bool = False) -> torch.Tensor:
        """Logits (N, num_classes), float32 on the CPU, of uint8 grey faces x (N, H, W) (FER2013's are 48x48): the
        one inference path of eval.py, train.py's validation and test, predict.py and `predict`.

        Each batch is resized to the config's img_size and normalised with its pixel_mean / pixel_std (`preprocess`);
        tta="tencrop" averages the logits of `ten_crop`'s 10 crops, batch_size crops per forward (not 10x that:
        smaller activations, no page-fault storm on CPUs). amp: bf16 autocast. Eval mode under inference mode is
        the fast path (see `_fast_eval`); the weights are untouched and the caller's train/eval mode comes back.
        """
        if not isinstance(x, torch.Tensor) or x.dtype != torch.uint8 or x.ndim != 3:
            raise ValueError(f"predict_logits takes uint8 grey faces (N, H, W), got "
                             f"{f'{x.dtype} {tuple(x.shape)}' if isinstance(x, torch.Tensor) else type(x).__name__}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a whole number of at least 1, got {batch_size!r}")
        if tta not in TTA_MODES:
            raise ValueError(f"tta must be one of {', '.join(map(repr, TTA_MODES))}, got {tta!r}")
        c, device, was_training = self.config, next(self.parameters()).device, self.training
        self.eval()
        out = [torch.zeros(0, c.num_classes)]
        try:
            for start in range(0, len(x), batch_size):
                xb = x[start:start + batch_size].to(device)
                with torch.autocast(device.type, torch.bfloat16, enabled=amp):
                    if tta == "tencrop":
                        crops = ten_crop(xb, c.img_size, c.pixel_mean, c.pixel_std).flatten(0, 1)  # (B * 10, 1, S, S)
                        logits = torch.cat([self(b) for b in crops.split(batch_size)]).view(len(xb), 10, -1)
                        logits = logits.float().mean(1)
                    else:
                        logits = self(preprocess(xb, c.img_size, c.pixel_mean, c.pixel_std)).float()
                out.append(logits.cpu())
        finally:
            self.train(was_training)
        return torch.cat(out)

    def predict(self, faces, batch_size: int = 256, tta: str = "none", amp: bool = False) -> torch.Tensor:
        """Emotion probabilities (N, num_classes), on the CPU, of uint8 faces of any size: (H, W) or (N, H, W) grey,
        (H, W, 3) or (N, H, W, 3) RGB, tensors or numpy arrays, or a list of single faces of different sizes.
        Column i is config.class_names[i].

        Evaluation's transform, nothing else to set up: `grey_faces` (as predict.py reads image files), then
        `predict_logits` (eval.py's path: the config's img_size, pixel_mean, pixel_std; tta="tencrop" its ten-crop,
        amp bf16 autocast), batch_size faces at a time; call it on `for_inference(compile=True)` to serve many calls
        from compiled code.
        """
        return self.predict_logits(grey_faces(faces), tta, batch_size, amp).softmax(-1)


# -----------------------------------------------------------------------------
# loading weights: official EmoNeXt, this project's checkpoints, facebookresearch ConvNeXt ImageNet

_INPUT_CONVS = ("downsample_layers.0.0.weight", "localization.0.weight")  # the convs that see the input channels
_WRAPPER_PREFIXES = ("module.", "_orig_mod.", "ema_model.")  # DDP, torch.compile, ema_pytorch


def read_checkpoint(src) -> dict:
    """A checkpoint dict from a dict, a path (torch.load weights_only=True) or an URL (torch.hub's cache)."""
    if isinstance(src, dict):
        return src
    src = str(src)
    if src.startswith(("http://", "https://")):
        return torch.hub.load_state_dict_from_url(src, map_location="cpu", weights_only=True)
    if not os.path.exists(src):
        raise FileNotFoundError(f"checkpoint not found: {src}")
    damaged = _damaged_record(src)
    if damaged:
        raise ValueError(f"{src}: damaged: {damaged} (the file changed after it was written; copy it again)")
    try:
        ckpt = torch.load(src, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"checkpoint not found: {src}") from None
    except Exception as e:  # truncated file, pickle of arbitrary objects, not a torch file at all
        raise ValueError(f"{src}: cannot be read as a weights-only torch checkpoint ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''})") from None
    if not isinstance(ckpt, dict):
        raise ValueError(f"{src}: expected a dict checkpoint, found {type(ckpt).__name__}")
    return ckpt


def _damaged_record(path) -> str:
    """What is damaged in a torch zip checkpoint, or "" if nothing is (or if it is no zip: torch.load judges it).
    torch.load does not check the zip's CRC-32 of each record, so a few changed bytes inside a tensor would load."""
    if not zipfile.is_zipfile(path):
        return ""
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except Exception as e:  # BadZipFile, EOFError, a header that does not decode...
        return f"its zip structure is broken ({type(e).__name__}: {e})"
    return f"its record {bad} fails the CRC-32 check" if bad else ""


def _state_dict_of(ckpt: dict, prefer_ema: bool) -> dict:
    order = ("ema", "model", "state_dict") if prefer_ema else ("model", "ema", "state_dict")
    for key in order:
        if isinstance(ckpt.get(key), dict) and ckpt[key]:
            ckpt = ckpt[key]
            break
    state = {}
    for k, v in ckpt.items():
        if not isinstance(v, torch.Tensor) or k.startswith("online_model.") or k in ("initted", "step"):
            continue  # ema_pytorch also stores the online copy and its counters (tensor buffers)
        for prefix in _WRAPPER_PREFIXES:
            k = k.removeprefix(prefix)
        state[k] = v
    return state


def _convert_input_convs(state: dict, own: dict) -> list:
    """Converts, in place, the checkpoint's input convs to the model's input channel count: 3 -> 1 sums over the
    channels, 1 -> 3 splits evenly; other counts are left to the shape check. Returns what was converted."""
    converted = []
    for k in _INPUT_CONVS:
        if k in state and k in own and state[k].ndim == 4 and state[k].shape[1] != own[k].shape[1]:
            w, c = state[k], own[k].shape[1]
            if c == 1:
                state[k] = w.sum(1, keepdim=True)
            elif w.shape[1] == 1:
                state[k] = w.expand(-1, c, -1, -1) / c
            else:
                continue  # left to the shape check
            converted.append(f"{k}: {w.shape[1]} -> {c} input channels")
    return converted


def _drop_mismatched_head(state: dict, own: dict, name: str) -> list:
    """Drops, in place, a head of another class count; any other shape that differs from the model's is an error.
    Returns what was dropped."""
    mismatched = [k for k in state if k in own and state[k].shape != own[k].shape]
    skipped = []
    for k in mismatched:
        if k.startswith("head."):
            skipped.append(f"{k} {tuple(state.pop(k).shape)} (model has {tuple(own[k].shape)})")
    bad = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
           for k in mismatched if k in state]
    if bad:
        raise ValueError(f"{name}: checkpoint does not fit this model (another size or img_size?): "
                         + "; ".join(bad[:4]) + (f"; ... {len(bad) - 4} more" if len(bad) > 4 else ""))
    return skipped


def load_weights(model: EmoNeXt, src, prefer_ema: bool = True, verbose: bool = True) -> dict:
    """Loads EmoNeXt or ConvNeXt weights into `model` and reports exactly what did not map.

    Args:
        model (EmoNeXt): the model to fill in place.
        src: a state dict, a checkpoint dict (holding "model" / "ema" / "state_dict"), a path, or an URL
            (downloaded through torch.hub's cache). Files load with torch.load(weights_only=True).
        prefer_ema (bool): take a checkpoint's "ema" weights over its "model" weights when it has both.
        verbose (bool): print the report.

    An EmoNeXt checkpoint (official or this project's) must match the model key for key. A facebookresearch
    ConvNeXt checkpoint fills the ConvNeXt part; STN, SE and attention keep their initialisation and its head is
    dropped when num_classes differs. Input convs are converted between channel counts: 3 -> 1 sums over the RGB
    weights (a grey image then gives the same logits as that image repeated 3 times), 1 -> 3 splits them evenly.

    Returns: {"kind": "emonext" | "convnext", "missing": [...], "unexpected": [...], "skipped": [...],
              "converted": [...]} — keys the model kept at init, checkpoint keys not used, checkpoint keys dropped
              for their shape (the head), and input convs converted between channel counts.
    """
    name = src if isinstance(src, str) else "state dict"
    state = _state_dict_of(read_checkpoint(src), prefer_ema)
    own = model.state_dict()
    if "fc_loc.0.weight" in state or any(k.startswith("attention.") for k in state):
        kind = "emonext"
    elif "downsample_layers.0.0.weight" in state:
        kind = "convnext"
    else:
        hint = " (a timm-format ConvNeXt: use facebookresearch's convnext_*.pth)" if "stem.0.weight" in state else ""
        raise ValueError(f"{name}: neither an EmoNeXt nor a facebookresearch ConvNeXt checkpoint{hint}; "
                         f"first keys: {list(state)[:5]}")
    converted = _convert_input_convs(state, own)
    skipped = _drop_mismatched_head(state, own, name)

    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if kind == "emonext" and (unexpected or any(not k.startswith("head.") for k in missing)):
        raise ValueError(f"{name}: EmoNeXt checkpoint does not match this model: "
                         f"missing {missing[:4]}, unexpected {unexpected[:4]}")
    model.load_state_dict(state, strict=False)  # strictness enforced above; what differs is reported below
    report = {"kind": kind, "missing": missing, "unexpected": unexpected, "skipped": skipped,
              "converted": converted}
    if verbose:
        print(f"load_weights: {kind} checkpoint from {name}: {len(state) - len(unexpected)} tensors loaded")
        for what in ("converted", "skipped", "unexpected", "missing"):
            if report[what]:
                print(f"  {what} ({len(report[what])}): {', '.join(report[what])}")
    return report


def config_dict(model: EmoNeXt) -> dict:
    """The model's config as plain numbers, strings and lists, for checkpoints that torch.load(weights_only=True)
    reads."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(model.config).items()}


# -----------------------------------------------------------------------------
# writing files: checkpoints and pictures, atomically

def _stream(path) -> bool:
    """Whether writes to path go straight to it: "-" (stdout), a path under /dev or /proc (/dev/stdout, /dev/fd/N),
    or something there that is not a file or a folder (a FIFO, a character device, a socket)."""
    if path == "-" or os.path.abspath(path).startswith(("/dev/", "/proc/")):
        return True
    try:
        mode = os.stat(path).st_mode  # through links
    except OSError:
        return False
    return not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))


def write_atomically(path, write, nbytes: int = None):
    """write(p) writes the file at p, the way the path asks. A file: p is a temporary file beside it, which then
    replaces it (os.replace): a kill leaves the old file or the new one, never half of one; missing folders are made.
    A symlink: the same beside its target, which is replaced (the link stays a link). "-", a FIFO, a character device
    or /dev/stdout: written straight (p is the path, "-" as /dev/stdout), as a stream. The temporary name is this
    process's own (two writers never share one) and ends in .tmp: name the format when saving. A failed write
    removes it and raises OSError saying what and where; with nbytes, the size to write, a full disk says how much
    was needed."""
    if _stream(path):
        try:
            if path == "-":
                sys.stdout.flush()  # what was printed before comes first
            write("/dev/stdout" if path == "-" else path)
        except OSError as e:
            raise OSError(e.errno, f"cannot write {path} ({e.strerror or e})") from None
        return
    target = os.path.realpath(path)  # a symlink's target (the path itself otherwise)
    tmp, folder = f"{target}.{os.getpid()}.tmp", os.path.dirname(target)
    try:
        if os.path.exists(folder) and not os.path.isdir(folder):  # makedirs would say "File exists"
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
        os.makedirs(folder, exist_ok=True)
        write(tmp)
        os.replace(tmp, target)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if not isinstance(e, OSError):
            raise
        room = ""
        if e.errno == errno.ENOSPC and nbytes is not None:
            free = shutil.disk_usage(folder).free
            room = f": {nbytes / 2**20:.1f} MiB to write, {free / 2**20:.1f} MiB free there"
        raise OSError(e.errno, f"cannot write {path} ({e.strerror or e}{room})") from None


def check_writable(path):
    """Raises OSError, as write_atomically would ("cannot write PATH (why)"), where path cannot be written; writes
    nothing that stays. For a script to call before its work, so that a bad output path ends it at once."""
    if _stream(path):
        if path != "-" and not os.access(path, os.W_OK):
            raise OSError(errno.EACCES, f"cannot write {path} ({os.strerror(errno.EACCES)})")
        return
    target = os.path.realpath(path)
    folder = os.path.dirname(target)
    while not os.path.exists(folder):  # write_atomically makes the missing folders: the first that exists decides
        folder = os.path.dirname(folder)
    why = (errno.EISDIR if os.path.isdir(target) else errno.ENOTDIR if not os.path.isdir(folder)
           else None if os.access(folder, os.W_OK | os.X_OK) else errno.EACCES)
    if why is None and folder == os.path.dirname(target):  # the folder is there: try it (read-only disks, root)
        try:
            fd, probe = tempfile.mkstemp(dir=folder, suffix=".tmp")
            os.close(fd)
            os.remove(probe)
        except OSError as e:
            why = e.errno
    if why is not None:
        raise OSError(why, f"cannot write {path} ({os.strerror(why)})")


def save_checkpoint(state: dict, path):
    """torch.save through a temporary file (write_atomically). The bytes are made in memory first, so a full disk
    is an OSError from the write (ENOSPC, with the size) rather than an error inside torch's zip writer."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = buffer.getbuffer()

    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(data)
    write_atomically(path, write, nbytes=len(data))


def export_checkpoint(model: EmoNeXt, path, extra: dict = None):
    """Writes the checkpoint to ship: the model's weights (as "ema") in half precision on the CPU, its config (the
    class names inside) and the `extra` entries that are not None
    (eval.py: train.py's "args", "iter", "best_val_acc"); no optimizer, no online weights. It loads with
    torch.load(weights_only=True) and EmoNeXt.from_checkpoint (weights back in fp32)."""
    state = {k: v.cpu().half() if v.is_floating_point() else v.cpu() for k, v in model.state_dict().items()}
    slim = {"config": config_dict(model), "ema": state, **(extra or {})}
    save_checkpoint({k: v for k, v in slim.items() if v is not None}, path)


# -----------------------------------------------------------------------------
# faces in: the one definition of evaluation's input transform (EmoNeXt.predict_logits and EmoNeXt.predict use it)

def _batch_of_faces(faces) -> torch.Tensor:
    """uint8 faces -> a tensor with the batch dimension, (N, H, W) grey or (N, H, W, 3) RGB.

    Arrays (numpy's, OpenCV's and PIL's layout), any strides: (H, W) or (N, H, W) grey, (H, W, 1) or (N, H, W, 1) grey,
    (H, W, 3) or (N, H, W, 3) RGB. Tensors read the same way, and channels-first as torch holds images: (N, 3, H, W)
    and (N, 1, H, W) are batches. A (3, H, W) tensor reads two ways (torchvision's read_image gives one RGB face so;
    three grey faces look the same), so it is refused with what to pass instead; a shape whose last side is 1 or 3
    reads as an array does."""
    if isinstance(faces, torch.Tensor):
        x = faces
        if x.ndim == 3 and x.shape[0] == 3 and x.shape[-1] not in (1, 3) and x.shape[1] > 0:
            raise ValueError(f"faces of shape {tuple(x.shape)} read two ways: pass x[None] for one channels-first RGB "
                             f"face (torchvision's read_image layout) or x[:, None] for three grey faces")
        if x.ndim == 4 and x.shape[1] in (1, 3) and x.shape[-1] not in (1, 3):
            x = x.movedim(1, -1)  # (N, C, H, W) -> (N, H, W, C)
    elif hasattr(faces, "__array__"):
        x = torch.from_numpy(faces.__array__().copy())  # a C-ordered copy: flipped views, read-only arrays
    else:
        raise ValueError(f"faces must be uint8 pixels (numpy arrays or tensors, or a list of them), got "
                         f"{type(faces).__name__}; to classify image files use python predict.py CKPT FILE...")
    shape = tuple(x.shape)
    if x.dtype != torch.uint8:
        raise ValueError(f"faces must be uint8 grey levels 0..255, got {x.dtype}")
    if x.ndim in (3, 4) and x.shape[-1] == 1:  # (H, W, 1) / (N, H, W, 1): grey with a channel axis
        x = x[..., 0]
    if x.ndim in (3, 4) and x.shape[-1] == 4:  # else (H, W, 4) would read as H faces 4 pixels wide
        raise ValueError(f"faces of shape {shape} look RGBA: pass faces[..., :3]")
    rgb = x.ndim in (3, 4) and x.shape[-1] == 3
    if x.ndim - rgb not in (2, 3):
        raise ValueError(f"faces must be (H, W) or (N, H, W) grey or (H, W, 3) or (N, H, W, 3) RGB, "
                         f"got shape {shape}")
    if min(x.shape[x.ndim - rgb - 2:x.ndim - rgb]) == 0:
        raise ValueError(f"faces of shape {shape} are empty images (a side of 0 pixels): there is no face to read")
    return x if x.ndim - rgb == 3 else x[None]


def grey_faces(faces) -> torch.Tensor:
    """uint8 faces of any size (as EmoNeXt.predict takes them) -> uint8 (N, 48, 48) grey faces like FER2013's.

    RGB becomes grey with ITU-R 601-2 weights in PIL's fixed point, so equal to PIL's convert("L"); a non-square
    face gives its centre square; other sides are resized to 48 (bilinear, antialiased) and rounded to levels.
    """
    if isinstance(faces, (list, tuple)):  # faces of different sizes, one at a time
        return torch.cat([grey_faces(f) for f in faces] or [torch.zeros(0, FACE_SIDE, FACE_SIDE, dtype=torch.uint8)])
    x = _batch_of_faces(faces)
    if x.ndim == 4:
        r, g, b = x.int().unbind(-1)
        x = ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).to(torch.uint8)
    h, w = x.shape[1:]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    x = x[:, top:top + side, left:left + side]
    if side == FACE_SIDE:
        return x
    x = F.interpolate(x[:, None].float(), size=(FACE_SIDE, FACE_SIDE), mode="bilinear", align_corners=False,
                      antialias=True)
    return x[:, 0].round().clamp(0, 255).to(torch.uint8)


def preprocess(x, img_size: int, mean: float = FER2013_MEAN, std: float = FER2013_STD) -> torch.Tensor:
    """uint8 grey faces (B, H, W) -> the model's input (B, 1, img_size, img_size): bilinear resize, then
    (x / 255 - mean) / std."""
    x = x.unsqueeze(1).float() / 255
    if x.shape[-2:] != (img_size, img_size):
        x = F.interpolate(x, size=(img_size, img_size), mode="bilinear", align_corners=False)
    return (x - mean) / std


def ten_crop(x, img_size: int, mean: float = FER2013_MEAN, std: float = FER2013_STD) -> torch.Tensor:
    """Test-time augmentation of the official recipe: resize to img_size * 236/224, take the 4 corner and the
    centre crops of img_size, and their horizontal flips. uint8 (B, H, W) -> normalised float (B, 10, 1, S, S)."""
    big, s = round(img_size * 236 / 224), img_size
    x = preprocess(x, big, mean, std)
    c = (big - s) // 2
    crops = [x[..., :s, :s], x[..., :s, -s:], x[..., -s:, :s], x[..., -s:, -s:], x[..., c:c + s, c:c + s]]
    crops = torch.stack(crops, 1)
    return torch.cat([crops, crops.flip(-1)], 1)
