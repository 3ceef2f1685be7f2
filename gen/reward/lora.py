"""LoRA on a Diffusers denoiser (UNet or transformer) through peft: injection, Diffusers-format save/load, and
mixing of two fine-tunes.

File format: ``pytorch_lora_weights.safetensors`` with keys ``<prefix>.<module>.lora_A.weight`` /
``<prefix>.<module>.lora_B.weight`` and the peft ``LoraConfig`` in the safetensors metadata under
``lora_adapter_metadata`` (keys prefixed ``<prefix>.``), i.e. what Diffusers' ``save_lora_weights`` writes and
``load_lora_weights`` reads. The prefix is the pipeline component that holds the network:

==========================================  ===============  ==============================================
family                                      prefix           Diffusers loader
==========================================  ===============  ==============================================
SD 1.x/2.x, SDXL (``UNet2DConditionModel``)  ``unet``         ``StableDiffusionPipeline`` / ``...XLPipeline``
SD3-style (``SD3Transformer2DModel``)        ``transformer``  ``StableDiffusion3Pipeline.load_lora_weights``
class-conditional ``UNet2DModel``            ``unet``         ``pipelines.lora.UNetLoraLoaderMixin`` (ours:
                                                              Diffusers' loaders do not cover ``UNet2DModel``)
class-conditional ``DiTTransformer2DModel``  ``transformer``  ``pipelines.GuidedDiTPipeline.load_lora_weights``
                                                              (ours, ``TransformerLoraLoaderMixin``: Diffusers'
                                                              ``DiTPipeline`` has no LoRA loader)
==========================================  ===============  ==============================================

Mixing (AlignProp's "reward soup", Sec. 5 of the paper): theta = c * theta_A + (1 - c) * theta_B. With a common
base W0 this is W0 + c * dW_A + (1 - c) * dW_B, which :func:`mix_lora` writes exactly as one LoRA of rank
r_A + r_B (B = [c s_A/s B_A, (1-c) s_B/s B_B], A = [A_A; A_B]). The original code instead interpolated the LoRA
factors themselves (``mode="factors"``), which is not the interpolation of the weights (products of averages).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
METADATA_KEY = "lora_adapter_metadata"
PREFIX = "unet"
PREFIXES = ("unet", "transformer")


def lora_prefix(network: nn.Module) -> str:
    """The Diffusers LoRA key prefix of a network: ``transformer`` for transformer denoisers (SD3, DiT, Flux ...),
    ``unet`` for UNets."""
    from gen.sampling.adapters import unwrap_network

    return "transformer" if "Transformer" in type(unwrap_network(network)).__name__ else PREFIX


def matching_modules(model: nn.Module, target_modules) -> list[str]:
    """Names of ``nn.Linear``/``nn.Conv2d`` modules matched by peft's rule for a list of names
    (equal, or ending with ``"." + target``)."""
    targets = [target_modules] if isinstance(target_modules, str) else list(target_modules)
    found = []
    for name, mod in model.named_modules():
        if not isinstance(mod, (nn.Linear, nn.Conv2d)):
            continue
        if any(name == t or name.endswith("." + t) for t in targets):
            found.append(name)
    return found


def _candidates(model: nn.Module, limit: int = 32) -> str:
    leaves = sorted({n.split(".")[-1] if not n.split(".")[-1].isdigit() else ".".join(n.split(".")[-2:])
                     for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))})
    return ", ".join(leaves[:limit]) + (" ..." if len(leaves) > limit else "")


def add_lora(unet: nn.Module, rank: int = 4, alpha: float | None = None, target_modules=("to_q", "to_k", "to_v",
             "to_out.0"), init: str | bool = "gaussian", dropout: float = 0.0, adapter_name: str = "default"):
    """Inject LoRA adapters (peft) into ``unet`` and freeze everything else.

    Args:
        rank: LoRA rank r (>= 1).
        alpha: LoRA alpha (scale alpha / r); default r.
        target_modules: module-name suffixes (peft matching); a target matching no Linear/Conv2d raises
            ``ValueError`` listing candidate names.
        init: peft ``init_lora_weights``: ``"gaussian"`` (TRL's choice) or True (Kaiming A); B is zero either way,
            so the injected model equals the base model until trained.
    Returns:
        the peft ``LoraConfig``.
    """
    from peft import LoraConfig, inject_adapter_in_model

    if rank < 1:
        raise ValueError(f"lora rank must be >= 1; got {rank}")
    targets = [target_modules] if isinstance(target_modules, str) else list(target_modules)
    if not targets:
        raise ValueError("lora target_modules is empty")
    for t in targets:
        if not matching_modules(unet, [t]):
            raise ValueError(f"LoRA target module {t!r} matches no Linear/Conv2d in {type(unet).__name__}; "
                             f"module names there end with: {_candidates(unet)}")
    cfg = LoraConfig(r=rank, lora_alpha=rank if alpha is None else alpha, target_modules=targets,
                     init_lora_weights=init, lora_dropout=dropout)
    for p in unet.parameters():
        p.requires_grad_(False)
    inject_adapter_in_model(cfg, unet, adapter_name=adapter_name)
    for n, p in unet.named_parameters():
        p.requires_grad_("lora_" in n)
    return cfg


def lora_parameters(unet: nn.Module) -> list[nn.Parameter]:
    return [p for n, p in unet.named_parameters() if "lora_" in n]


def lora_state_dict(unet: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """peft state dict of the adapter (keys ``<module>.lora_A.weight``, no adapter name), detached, on CPU."""
    from peft.utils import get_peft_model_state_dict

    sd = get_peft_model_state_dict(unet, adapter_name=adapter_name)
    return {k: v.detach().float().cpu().contiguous() for k, v in sd.items()}


def lora_metadata(cfg) -> dict:
    """JSON-able LoraConfig fields (what diffusers stores in ``lora_adapter_metadata``)."""
    keep = ("r", "lora_alpha", "target_modules", "lora_dropout", "use_dora", "init_lora_weights", "bias",
            "rank_pattern", "alpha_pattern")
    d = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
    out = {}
    for k in keep:
        if k in d:
            v = d[k]
            out[k] = sorted(v) if isinstance(v, set) else v
    return out


def save_lora(folder, state_dict: dict[str, torch.Tensor], metadata: dict, prefix: str = PREFIX) -> Path:
    """Write ``folder/pytorch_lora_weights.safetensors`` in the Diffusers format (``prefix.`` keys + metadata).

    Args:
        prefix: ``unet`` (UNets) or ``transformer`` (SD3-style transformers, DiT); see :func:`lora_prefix`.
    """
    from safetensors.torch import save_file

    if prefix not in PREFIXES:
        raise ValueError(f"LoRA prefix {prefix!r}; allowed: {', '.join(PREFIXES)}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    packed = {f"{prefix}.{k}": v.contiguous() for k, v in state_dict.items()}
    meta = {"format": "pt", METADATA_KEY: json.dumps({f"{prefix}.{k}": v for k, v in metadata.items()},
                                                     indent=2, sort_keys=True)}
    path = folder / LORA_WEIGHT_NAME
    tmp = folder / f".{LORA_WEIGHT_NAME}.tmp"
    save_file(packed, str(tmp), metadata=meta)
    os.chmod(tmp, 0o644)
    tmp.replace(path)
    return path


def read_lora(path, with_prefix: bool = False) -> tuple:
    """(state dict without its ``unet.`` / ``transformer.`` prefix, LoraConfig fields) from a folder or a
    .safetensors file; with ``with_prefix`` also the prefix found, as a third item."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if path.is_dir():
        path = path / LORA_WEIGHT_NAME
    if not path.is_file():
        raise ValueError(f"no LoRA weights at {str(path)!r} (expected {LORA_WEIGHT_NAME})")
    try:
        sd = load_file(str(path))
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(METADATA_KEY)
    except Exception as err:  # safetensors raises its own SafetensorError (and OSError) for truncated/corrupt files
        raise ValueError(f"LoRA file {str(path)!r} is corrupt or truncated (not a readable safetensors file: "
                         f"{err})") from None
    found = [p for p in PREFIXES if any(k.startswith(f"{p}.") for k in sd)]
    if not found:
        raise ValueError(f"{str(path)!r} holds no '{PREFIX}.' (or 'transformer.') LoRA weights")
    if len(found) > 1:
        raise ValueError(f"{str(path)!r} holds both 'unet.' and 'transformer.' LoRA weights; one network per file")
    prefix = found[0]
    meta = {}
    if raw:
        try:
            parsed = json.loads(raw)
        except json.JSONDecodeError as err:
            raise ValueError(f"LoRA file {str(path)!r}: its {METADATA_KEY} metadata is not JSON ({err})") from None
        if not isinstance(parsed, dict):
            raise ValueError(f"LoRA file {str(path)!r}: its {METADATA_KEY} metadata is not a JSON object")
        meta = {k.removeprefix(f"{prefix}."): v for k, v in parsed.items() if k.startswith(f"{prefix}.")}
    unet_sd = {k.removeprefix(f"{prefix}."): v for k, v in sd.items() if k.startswith(f"{prefix}.")}
    for key, value in unet_sd.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise ValueError(f"LoRA file {str(path)!r}: {prefix}.{key} holds NaN/inf values; the file is corrupt")
    if "r" not in meta:  # no metadata: rank from the weights, alpha = rank (diffusers' convention)
        a = next(v for k, v in unet_sd.items() if k.endswith("lora_A.weight"))
        meta = {"r": a.shape[0], "lora_alpha": a.shape[0],
                "target_modules": sorted({k.rsplit(".lora_", 1)[0] for k in unet_sd})}
    return (unet_sd, meta, prefix) if with_prefix else (unet_sd, meta)


def load_lora_into_unet(unet: nn.Module, path, adapter_name: str = "default") -> dict:
    """Inject a LoRA read with :func:`read_lora` into ``unet`` (a UNet or transformer denoiser; peft) and load its
    weights; returns the metadata. A file whose key prefix is not the network's (:func:`lora_prefix`: ``unet.`` keys
    for a transformer, or the reverse) is a ``ValueError``."""
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict

    sd, meta, prefix = read_lora(path, with_prefix=True)
    expected = lora_prefix(unet)
    if prefix != expected:
        raise ValueError(f"LoRA file {str(path)!r} holds '{prefix}.' weights, but {type(unet).__name__} takes "
                         f"'{expected}.' ones (a LoRA of another network family)")
    try:
        cfg = LoraConfig(**{k: v for k, v in meta.items() if k in LoraConfig.__dataclass_fields__})
        inject_adapter_in_model(cfg, unet, adapter_name=adapter_name)
        result = set_peft_model_state_dict(unet, sd, adapter_name=adapter_name)
    except (TypeError, ValueError, RuntimeError, KeyError) as err:  # a config or tensor shape that does not fit
        raise ValueError(f"LoRA file {str(path)!r} does not fit this {type(unet).__name__}: {err}") from None
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise ValueError(f"LoRA file {str(path)!r} has keys that match no module: {unexpected[:4]}")
    for p in unet.parameters():
        p.requires_grad_(False)
    return meta


def mix_lora(path_a, path_b, c: float, out_folder, mode: str = "delta") -> Path:
    """Write the LoRA of theta = c theta_A + (1 - c) theta_B (two fine-tunes of the same base) to ``out_folder``.

    Args:
        c: mixing coefficient (any real; [0, 1] interpolates, outside extrapolates).
        mode: ``"delta"`` (exact weight interpolation, rank r_A + r_B) or ``"factors"`` (the original code's
            interpolation of lora_A and lora_B separately; needs equal ranks and alphas).
    """
    if mode not in ("delta", "factors"):
        raise ValueError(f"mix mode {mode!r}; allowed: delta, factors")
    sa, ma, pa = read_lora(path_a, with_prefix=True)
    sb, mb, pb = read_lora(path_b, with_prefix=True)
    if pa != pb:
        raise ValueError(f"the two LoRAs are for different networks ({pa!r} and {pb!r} keys); mixing needs one base")
    if set(sa) != set(sb):
        raise ValueError("the two LoRAs target different modules; mixing needs the same target modules")
    if mode == "factors":
        if ma["r"] != mb["r"] or ma["lora_alpha"] != mb["lora_alpha"]:
            raise ValueError("mode='factors' needs equal rank and alpha")
        out = {k: c * sa[k] + (1 - c) * sb[k] for k in sa}
        return save_lora(out_folder, out, ma, prefix=pa)
    if ma.get("rank_pattern") or mb.get("rank_pattern") or ma.get("alpha_pattern") or mb.get("alpha_pattern"):
        raise ValueError("mixing LoRAs with per-module rank/alpha patterns is not supported")
    ra, rb = int(ma["r"]), int(mb["r"])
    s_a, s_b = float(ma["lora_alpha"]) / ra, float(mb["lora_alpha"]) / rb
    r = ra + rb
    alpha = float(r)  # new scale 1: the old scales are folded into B
    out = {}
    for key in sa:
        if key.endswith("lora_A.weight"):
            out[key] = torch.cat([sa[key], sb[key]], dim=0)
        elif key.endswith("lora_B.weight"):
            out[key] = torch.cat([c * s_a * sa[key], (1 - c) * s_b * sb[key]], dim=1)
        else:
            raise ValueError(f"cannot mix LoRA tensor {key!r} (only lora_A / lora_B weights are supported)")
    meta = dict(ma, r=r, lora_alpha=alpha)
    return save_lora(out_folder, out, meta, prefix=pa)


class LoraParameters(nn.Module):
    """A module that owns (shares) the LoRA parameters of a UNet (an optimizer's parameter list in one module).

    Its state dict keys are the UNet's parameter names with ``.`` replaced by ``__``; loading it writes into the
    UNet's LoRA parameters in place.
    """

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.params = nn.ParameterDict({n.replace(".", "__"): p for n, p in unet.named_parameters() if "lora_" in n})
        if not self.params:
            raise ValueError("the UNet has no LoRA parameters (call add_lora first)")
