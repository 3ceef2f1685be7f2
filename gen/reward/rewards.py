"""Differentiable rewards for reward backpropagation (AlignProp, arXiv 2310.03739), in a registry by name.

Contract: ``reward(images, prompts) -> tensor[B]`` with ``images`` float [B, C, H, W] in [0, 1] (gradients flow
back to them) and ``prompts`` a list of B strings or integer class labels (ignored by rewards that do not use
them). Loss shaping (maximise R, or |R - target|, a scale) lives in the trainer's config, never inside a reward.

Registered:

- ``aesthetic``: LAION aesthetic predictor v1 as used by AlignProp: CLIP ViT-L/14 image embedding (L2-normalised)
  -> MLP 768-1024-128-64-16-1 (weights from a file, e.g. ``sac+logos+ava1-l14-linearMSE.pth``).
- ``clip_score``: cosine similarity of CLIP image and text embeddings (optionally times CLIP's logit scale).
- ``compressibility``: minus the mean JPEG-quantised magnitude of the 8x8 DCT AC coefficients of the luma
  (a smooth surrogate of the bits a JPEG encoder spends); higher = more compressible.
- ``saturation``: mean HSV chroma, max_c - min_c (0 for grey images).
- ``contrast``: per-image standard deviation of the luma.
- ``digits_classifier``: log p(target | image) under the shipped digits classifier (CPU experiments).

``WeightedReward`` sums registered rewards with weights; :func:`build_reward` builds one from a config spec.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

REWARDS: dict[str, type] = {}

# CLIP's image normalisation (OpenAI CLIP, used by every CLIP checkpoint on the hub); read from a model folder's
# preprocessor_config.json when present.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# ITU-R BT.601 luma weights (what JPEG's YCbCr uses).
LUMA = (0.299, 0.587, 0.114)
# JPEG Annex K luminance quantisation table (quality 50), row-major over (vertical, horizontal) frequency.
JPEG_LUMA_Q50 = (
    16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55, 14, 13, 16, 24, 40, 57, 69, 56,
    14, 17, 22, 29, 51, 87, 80, 62, 18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
    49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99,
)


def register_reward(name: str):
    """Class decorator: add a reward class to :data:`REWARDS` under ``name``."""

    def deco(cls):
        if name in REWARDS:
            raise ValueError(f"reward {name!r} is already registered")
        REWARDS[name] = cls
        cls.reward_name = name
        return cls

    return deco


def reward_names() -> list[str]:
    return sorted(REWARDS)


def get_reward_class(name: str) -> type:
    if name not in REWARDS:
        raise ValueError(f"unknown reward {name!r}; known rewards: {', '.join(reward_names())}")
    return REWARDS[name]


class Reward(nn.Module):
    """Base class: frozen, eval-mode module; ``forward(images [B,C,H,W] in [0,1], prompts) -> [B]``."""

    reward_name = "reward"

    def freeze(self):
        self.eval()
        for p in self.parameters():
            p.requires_grad_(False)
        return self

    def train(self, mode: bool = True):  # rewards never use dropout / batch statistics
        return super().train(False)

    @staticmethod
    def check_images(images: torch.Tensor, channels: Sequence[int] | None = None) -> None:
        if not torch.is_tensor(images) or images.ndim != 4:
            shape = tuple(images.shape) if torch.is_tensor(images) else type(images).__name__
            raise ValueError(f"images must be a tensor [B, C, H, W] in [0, 1]; got {shape}")
        if channels is not None and images.shape[1] not in channels:
            raise ValueError(f"images have {images.shape[1]} channels; this reward takes {tuple(channels)}")


def to_rgb(images: torch.Tensor) -> torch.Tensor:
    """[B,1|3,H,W] -> [B,3,H,W] (grey images are repeated)."""
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


def luma(images: torch.Tensor) -> torch.Tensor:
    """BT.601 luma [B,1,H,W] of [B,1|3,H,W] images."""
    if images.shape[1] == 1:
        return images
    w = images.new_tensor(LUMA).view(1, 3, 1, 1)
    return (images * w).sum(1, keepdim=True)


# ---------------------------------------------------------------------------------------------------------------
# CLIP preprocessing (torch only, differentiable)
# ---------------------------------------------------------------------------------------------------------------
def center_crop(images: torch.Tensor, size: int) -> torch.Tensor:
    """Centre crop [B,C,H,W] to [B,C,size,size] (offsets rounded as torchvision/CLIP do: round((H-size)/2))."""
    h, w = images.shape[-2:]
    if h < size or w < size:
        raise ValueError(f"cannot centre-crop {h}x{w} images to {size}x{size}")
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return images[..., top:top + size, left:left + size]


def resize_short_side(images: torch.Tensor, size: int, mode: str = "bicubic") -> torch.Tensor:
    """Resize so that the short side is ``size`` (aspect kept), antialiased when shrinking; differentiable."""
    h, w = images.shape[-2:]
    if min(h, w) == size:
        return images
    if h <= w:
        new_h, new_w = size, max(size, int(round(w * size / h)))
    else:
        new_h, new_w = max(size, int(round(h * size / w))), size
    return F.interpolate(images, size=(new_h, new_w), mode=mode, align_corners=False, antialias=mode != "nearest")


def clip_preprocess(images: torch.Tensor, size: int = 224, mean=CLIP_MEAN, std=CLIP_STD,
                    mode: str = "bicubic") -> torch.Tensor:
    """CLIP's image preprocessing in torch: resize short side to ``size`` (bicubic, antialias), centre crop
    ``size`` x ``size``, normalise with CLIP mean/std. [B,1|3,H,W] in [0,1] -> [B,3,size,size]."""
    x = resize_short_side(to_rgb(images), size, mode)
    x = center_crop(x, size).clamp(0, 1) if mode == "bicubic" else center_crop(x, size)
    m = x.new_tensor(mean).view(1, 3, 1, 1)
    s = x.new_tensor(std).view(1, 3, 1, 1)
    return (x - m) / s


def _clip_norm_from_folder(path) -> tuple[tuple, tuple, int | None]:
    """(mean, std, crop size) from a CLIP folder's preprocessor_config.json, else CLIP's defaults."""
    p = Path(str(path)) / "preprocessor_config.json"
    if p.is_file():
        d = json.loads(p.read_text())
        crop = d.get("crop_size")
        crop = crop.get("height") if isinstance(crop, dict) else crop
        return tuple(d.get("image_mean", CLIP_MEAN)), tuple(d.get("image_std", CLIP_STD)), crop
    return CLIP_MEAN, CLIP_STD, None


def _load_state_dict(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"weights file {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


# ---------------------------------------------------------------------------------------------------------------
# Aesthetic score
# ---------------------------------------------------------------------------------------------------------------
class AestheticMLP(nn.Module):
    """LAION aesthetic predictor head: Linear(d,1024) Drop(.2) Linear(1024,128) Drop(.2) Linear(128,64) Drop(.1)
    Linear(64,16) Linear(16,1). Keys ``layers.{0,2,4,6,7}.{weight,bias}`` match ``sac+logos+ava1-l14-linearMSE.pth``."""

    def __init__(self, embed_dim: int = 768):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(embed_dim, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1),
        )

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        return self.layers(embeds)


def _load_clip(cls, model, dtype=None):
    if isinstance(model, nn.Module):
        return model
    try:
        return cls.from_pretrained(str(model), torch_dtype=dtype) if dtype else cls.from_pretrained(str(model))
    except OSError as err:
        raise ValueError(f"could not load {cls.__name__} from {str(model)!r}: {err}") from err


@register_reward("aesthetic")
class AestheticReward(Reward):
    """Aesthetic score (AlignProp's main reward): s = MLP(e / ||e||), e = CLIP ViT-L/14 image embedding.

    Args:
        clip_model: hub id or folder of a ``CLIPVisionModelWithProjection`` (or a ``CLIPModel``), or a module;
            AlignProp uses ``openai/clip-vit-large-patch14``.
        head_weights: file with the MLP weights (``.safetensors`` or a ``torch.save`` state dict, loaded with
            ``weights_only=True``), e.g. ``sac+logos+ava1-l14-linearMSE.pth``; or None with ``head=``.
        head: an :class:`AestheticMLP` instead of a file (tests).
        image_size: CLIP input size (default: the model's ``vision_config.image_size``).
        mean, std: normalisation (default: the folder's preprocessor_config.json, else CLIP's).
    """

    def __init__(self, clip_model="openai/clip-vit-large-patch14", head_weights: str | None = None,
                 head: nn.Module | None = None, image_size: int | None = None, mean=None, std=None):
        super().__init__()
        from transformers import CLIPModel, CLIPVisionModelWithProjection

        if isinstance(clip_model, nn.Module):
            self.clip = clip_model
            folder_mean, folder_std, crop = CLIP_MEAN, CLIP_STD, None
        else:
            folder_mean, folder_std, crop = _clip_norm_from_folder(clip_model)
            try:
                self.clip = _load_clip(CLIPVisionModelWithProjection, clip_model)
            except ValueError:
                self.clip = _load_clip(CLIPModel, clip_model)
        vcfg = getattr(self.clip.config, "vision_config", self.clip.config)
        self.image_size = int(image_size or crop or vcfg.image_size)
        self.mean, self.std = tuple(mean or folder_mean), tuple(std or folder_std)
        embed_dim = self.clip.config.projection_dim
        if head is None:
            if head_weights is None:
                raise ValueError("aesthetic reward needs head_weights (a file with the MLP weights) or head=")
            head = AestheticMLP(embed_dim)
            sd = _load_state_dict(head_weights)
            try:
                head.load_state_dict(sd)
            except RuntimeError as err:
                raise ValueError(f"head_weights {head_weights!r} do not fit the 768-1024-128-64-16-1 MLP: {err}") \
                    from err
        self.head = head
        self.freeze()

    def image_embeds(self, images: torch.Tensor) -> torch.Tensor:
        x = clip_preprocess(images, self.image_size, self.mean, self.std).to(self.clip.dtype)
        if hasattr(self.clip, "get_image_features"):
            e = self.clip.get_image_features(pixel_values=x)
            e = e.pooler_output if not torch.is_tensor(e) else e
        else:
            e = self.clip(pixel_values=x).image_embeds
        return e.float()

    def forward(self, images, prompts=None):
        self.check_images(images, (1, 3))
        e = self.image_embeds(images)
        e = e / e.norm(dim=-1, keepdim=True)
        return self.head(e.to(next(self.head.parameters()).dtype)).squeeze(-1).float()


@register_reward("clip_score")
class ClipScoreReward(Reward):
    """CLIP image-text similarity: cos(f_img(x), f_txt(prompt)) [* exp(logit_scale) if ``use_logit_scale``].

    Args:
        clip_model: hub id, folder or ``CLIPModel``.
        tokenizer: a tokenizer or folder (default: the model folder).
        use_logit_scale: multiply by CLIP's learned temperature (CLIPScore uses 100 * cos, clipped at 0).
    """

    def __init__(self, clip_model="openai/clip-vit-large-patch14", tokenizer=None, use_logit_scale: bool = False,
                 image_size: int | None = None, mean=None, std=None):
        super().__init__()
        from transformers import CLIPModel, CLIPTokenizer

        folder_mean, folder_std, crop = (CLIP_MEAN, CLIP_STD, None) if isinstance(clip_model, nn.Module) \
            else _clip_norm_from_folder(clip_model)
        self.clip = _load_clip(CLIPModel, clip_model)
        if tokenizer is None:
            if isinstance(clip_model, nn.Module):
                raise ValueError("clip_score with a CLIPModel module needs tokenizer=")
            tokenizer = clip_model
        self.tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer)) if isinstance(tokenizer, (str, Path)) \
            else tokenizer
        self.image_size = int(image_size or crop or self.clip.config.vision_config.image_size)
        self.mean, self.std = tuple(mean or folder_mean), tuple(std or folder_std)
        self.use_logit_scale = use_logit_scale
        self.freeze()

    def forward(self, images, prompts):
        self.check_images(images, (1, 3))
        if prompts is None or len(prompts) != images.shape[0]:
            raise ValueError("clip_score needs one text prompt per image")
        x = clip_preprocess(images, self.image_size, self.mean, self.std).to(self.clip.dtype)
        ids = self.tokenizer([str(p) for p in prompts], padding="max_length", truncation=True,
                             max_length=self.tokenizer.model_max_length, return_tensors="pt")
        img = self.clip.get_image_features(pixel_values=x)
        txt = self.clip.get_text_features(input_ids=ids.input_ids.to(x.device),
                                          attention_mask=ids.attention_mask.to(x.device))
        img = img if torch.is_tensor(img) else img.pooler_output
        txt = txt if torch.is_tensor(txt) else txt.pooler_output
        cos = F.cosine_similarity(img.float(), txt.float(), dim=-1)
        return cos * self.clip.logit_scale.exp().float() if self.use_logit_scale else cos


# ---------------------------------------------------------------------------------------------------------------
# Image statistics
# ---------------------------------------------------------------------------------------------------------------
def dct_matrix(n: int = 8, dtype=torch.float32) -> torch.Tensor:
    """Orthonormal DCT-II matrix D [n, n]: coefficients of a block X are D X D^T."""
    k = torch.arange(n, dtype=torch.float64).view(-1, 1)
    i = torch.arange(n, dtype=torch.float64).view(1, -1)
    d = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    d[0] /= math.sqrt(2.0)
    return d.to(dtype)


def jpeg_quant_table(quality: int = 50) -> torch.Tensor:
    """The JPEG Annex K luma table scaled to ``quality`` with libjpeg's formula, [8, 8]."""
    if not 1 <= quality <= 100:
        raise ValueError(f"quality must be in 1..100; got {quality}")
    scale = 5000 / quality if quality < 50 else 200 - 2 * quality
    q = torch.floor((torch.tensor(JPEG_LUMA_Q50, dtype=torch.float64) * scale + 50) / 100).clamp(min=1)
    return q.view(8, 8)


@register_reward("compressibility")
class CompressibilityReward(Reward):
    """Differentiable JPEG-compressibility proxy (AlignProp's paper optimises JPEG size; no code ships for it).

    R(x) = - mean over 8x8 blocks and the 63 AC frequencies of |DCT(Y*255 - 128)| / Q(quality),
    Y = BT.601 luma, zero-padded to a multiple of 8. A JPEG encoder spends bits roughly in proportion to the
    quantised AC magnitudes, so higher R = smaller file. This is a proxy, not a file size.
    """

    def __init__(self, quality: int = 50):
        super().__init__()
        self.register_buffer("dct", dct_matrix(8), persistent=False)
        self.register_buffer("q", jpeg_quant_table(quality).float(), persistent=False)
        self.quality = quality

    def forward(self, images, prompts=None):
        self.check_images(images, (1, 3))
        y = luma(images) * 255.0 - 128.0
        h, w = y.shape[-2:]
        y = F.pad(y, (0, (-w) % 8, 0, (-h) % 8), mode="replicate")
        b = y.shape[0]
        blocks = y.unfold(2, 8, 8).unfold(3, 8, 8).reshape(b, -1, 8, 8)  # [B, nblocks, 8, 8]
        d = self.dct.to(y.dtype)
        coef = d @ blocks @ d.T
        ac = (coef.abs() / self.q.to(y.dtype)).flatten(2)[..., 1:]
        return -ac.mean(dim=(1, 2))


@register_reward("saturation")
class SaturationReward(Reward):
    """Mean HSV chroma max_c(x) - min_c(x) over pixels (in [0, 1]; 0 for grey/1-channel images)."""

    def forward(self, images, prompts=None):
        self.check_images(images, (1, 3))
        return (images.amax(1) - images.amin(1)).flatten(1).mean(1)


@register_reward("contrast")
class ContrastReward(Reward):
    """RMS contrast: the per-image standard deviation of the BT.601 luma (in [0, 0.5])."""

    def forward(self, images, prompts=None):
        self.check_images(images, (1, 3))
        return luma(images).flatten(1).std(1)


@register_reward("digits_classifier")
class DigitsClassifierReward(Reward):
    """log p(target | x) under the digits classifier (``checkpoints/digits-classifier``), for CPU experiments.

    Images in [0, 1] are mapped to the classifier's [-1, 1] (x * 2 - 1; RGB averaged to grey).

    Args:
        classifier: folder of a ``DigitsClassifier`` (default the shipped one) or a module.
        target_class: a fixed class for every image, or None to use each image's label (``prompts``).
    """

    def __init__(self, classifier=None, target_class: int | None = None):
        super().__init__()
        if isinstance(classifier, nn.Module):
            self.classifier = classifier
        else:
            from gen.metrics.features import load_digits_classifier

            self.classifier, _ = load_digits_classifier(classifier)
        n = self.classifier.config.num_classes
        if target_class is not None and not 0 <= int(target_class) < n:
            raise ValueError(f"target_class={target_class}; allowed 0..{n - 1} or None (use the labels)")
        self.target_class = target_class
        self.num_classes = n
        self.freeze()

    def forward(self, images, prompts=None):
        self.check_images(images, (1, 3))
        x = images.mean(1, keepdim=True) * 2 - 1
        logp = torch.log_softmax(self.classifier(x).float(), dim=-1)
        if self.target_class is not None:
            target = torch.full((x.shape[0],), int(self.target_class), dtype=torch.long, device=x.device)
        else:
            if prompts is None or len(prompts) != x.shape[0]:
                raise ValueError("digits_classifier without target_class needs one integer label per image")
            target = torch.as_tensor([int(p) for p in prompts], dtype=torch.long, device=x.device)
            if ((target < 0) | (target >= self.num_classes)).any():
                raise ValueError(f"labels must be in 0..{self.num_classes - 1}; got {target.tolist()[:8]}")
        return logp.gather(1, target.view(-1, 1)).squeeze(1)


# ---------------------------------------------------------------------------------------------------------------
# Weighted sum
# ---------------------------------------------------------------------------------------------------------------
class WeightedReward(Reward):
    """R(x, c) = sum_k w_k R_k(x, c). ``components`` of the last call are kept (detached) for logging.

    Args:
        terms: list of ``(name, weight, reward module)``.
    """

    def __init__(self, terms: list[tuple[str, float, nn.Module]]):
        super().__init__()
        if not terms:
            raise ValueError("a weighted reward needs at least one term")
        names = [t[0] for t in terms]
        if len(set(names)) != len(names):
            raise ValueError(f"reward terms must have distinct names; got {names}")
        self.names = names
        self.weights = [float(t[1]) for t in terms]
        self.terms = nn.ModuleList([t[2] for t in terms])
        self.components: dict[str, torch.Tensor] = {}

    def forward(self, images, prompts=None):
        from .sampling import check_reward

        total, self.components = 0.0, {}
        for name, w, r in zip(self.names, self.weights, self.terms):
            v = check_reward(r(images, prompts), images.shape[0], f"reward {name!r}")
            self.components[name] = v.detach()
            total = total + w * v
        return total


def build_reward(spec) -> WeightedReward:
    """Build a :class:`WeightedReward` from a spec.

    ``spec`` is a list of ``{"name": str, "weight": float, **kwargs}`` dicts (kwargs go to the reward class; an
    optional ``"label"`` distinguishes two terms of the same reward), or a string ``"name:weight,name:weight"``.
    Unknown names raise ``ValueError`` listing the known ones.
    """
    if isinstance(spec, (list, tuple)) and spec and all(isinstance(s, str) for s in spec):
        spec = ",".join(spec)  # a command-line list of "name:weight" items
    if isinstance(spec, str):
        items = []
        for part in [p.strip() for p in spec.split(",") if p.strip()]:
            name, _, weight = part.partition(":")
            try:
                items.append({"name": name.strip(), "weight": float(weight) if weight else 1.0})
            except ValueError:
                raise ValueError(f"reward weight in {part!r} is not a number") from None
        spec = items
    if not isinstance(spec, (list, tuple)) or not spec:
        raise ValueError(f"reward spec must be a non-empty list of {{name, weight, ...}}; got {spec!r}")
    terms = []
    for item in spec:
        if not isinstance(item, dict) or "name" not in item:
            raise ValueError(f"each reward term needs a 'name'; got {item!r}")
        item = dict(item)
        name = item.pop("name")
        weight = float(item.pop("weight", 1.0))
        label = item.pop("label", name)
        cls = get_reward_class(name)
        try:
            terms.append((label, weight, cls(**item)))
        except TypeError as err:
            raise ValueError(f"bad arguments for reward {name!r}: {err}") from err
    return WeightedReward(terms)
