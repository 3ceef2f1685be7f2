"""Model adapters: one calling shape for every network family the sampling core drives.

An adapter is called as ``adapter(x_in, timestep, **inputs) -> prediction`` where ``inputs`` are the family's
conditioning tensors, batched along dim 0 like ``x_in`` (so the core can select and concatenate rows of the
conditional and unconditional branches), and the prediction is in the scheduler's prediction space with any
learned-variance channels removed. :class:`Conditioning` holds both branches' inputs.

Families (``adapter_for(model)`` picks one by the network's class):

======================  ==============================  ===============================================  ==========
network                  family                          inputs                                           null branch
======================  ==============================  ===============================================  ==========
``UNet2DModel``          class-conditional (digits)      ``class_labels`` [B] long; ``concat`` [B,C',H,W]  last class
``UNet2DConditionModel`` SD 1.x/2.x, SDXL                ``encoder_hidden_states`` [B,L,D]; SDXL also      empty or
                                                         ``text_embeds`` [B,D'], ``time_ids`` [B,6]        negative
                                                                                                          prompt
``SD3Transformer2DModel`` SD3-style flow transformers    ``encoder_hidden_states`` [B,L,D],                idem
                                                         ``pooled_projections`` [B,D']
``DiTTransformer2DModel`` class-conditional DiT          ``class_labels`` [B] long                          1000
======================  ==============================  ===============================================  ==========
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import ClassVar

import torch


@dataclass
class Conditioning:
    """The network inputs of the conditional branch and, if the model has one, of the unconditional branch.

    Args:
        cond: name -> tensor batched like the samples (or a non-tensor passed through unchanged).
        uncond: the same names for the unconditional branch (null class, empty/negative prompt); None when the
            model has no unconditional branch (an unconditional or bridge UNet), so guidance is impossible.
    """

    cond: dict = field(default_factory=dict)
    uncond: dict | None = None
    _both: tuple | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def has_uncond(self) -> bool:
        return self.uncond is not None

    def both(self) -> dict:
        """``cat_inputs(cond, uncond)``: the inputs of a call on every row of both branches, concatenated once and
        reused while the two dicts hold the same objects (a guided step would otherwise copy the prompt embeddings,
        ``[2B, L, D]``, at every step)."""
        key = [*self.cond.items(), *self.uncond.items()]   # the objects themselves, compared by identity
        old = self._both
        if old is None or len(old[0]) != len(key) or any(a[0] != b[0] or a[1] is not b[1]
                                                        for a, b in zip(old[0], key)):
            self._both = old = (key, cat_inputs(self.cond, self.uncond))
        return old[1]


_DTYPES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()   # network -> (first-parameter key, dtype)


def select_rows(inputs: dict, rows: torch.Tensor, batch: int) -> dict:
    """Rows ``rows`` (a [B] bool mask) of every tensor in ``inputs`` whose first dim is ``batch``."""
    return {k: (v[rows] if torch.is_tensor(v) and v.ndim and v.shape[0] == batch else v) for k, v in inputs.items()}


def cat_inputs(a: dict, b: dict) -> dict:
    """Concatenate two input dicts along dim 0 (tensors); other values must agree."""
    if set(a) != set(b):
        raise ValueError(f"conditional and unconditional inputs differ in names: {sorted(a)} vs {sorted(b)}")
    out = {}
    for k, v in a.items():
        w = b[k]
        if torch.is_tensor(v) and v.ndim:
            out[k] = torch.cat([v, w.to(device=v.device, dtype=v.dtype)])
        else:
            out[k] = v
    return out


class ModelAdapter:
    """Base class: wraps one network and calls it with the family's keyword arguments.

    Attributes:
        family: short name of the family (see the module table).
        conditioning_kind: ``"class"``, ``"text"`` or ``"none"``.
    """

    family: ClassVar[str] = "callable"
    conditioning_kind: ClassVar[str] = "none"

    def __init__(self, model):
        self.model = model
        self.net = unwrap_network(model)  # for its class and config under DDP/FSDP/compile/peft wrappers

    def __call__(self, x_in: torch.Tensor, timestep, **inputs) -> torch.Tensor:
        out = self.model(x_in, timestep, **inputs)
        return out.sample if hasattr(out, "sample") else out

    @property
    def dtype(self):
        """The network's dtype (``ModelMixin.dtype``). Diffusers computes it by walking every submodule (about 2 ms
        for an SDXL UNet on a CPU), so it is remembered per network until its first parameter changes (``.to()``)."""
        net = self.net
        first = next(net.parameters(), None) if isinstance(net, torch.nn.Module) else None
        if first is None:
            return getattr(net, "dtype", None)
        key = (id(first), first.dtype, first.device)
        hit = _DTYPES.get(net)
        if hit is None or hit[0] != key:
            hit = _DTYPES[net] = (key, getattr(net, "dtype", None))
        return hit[1]

    def check_condition(self, prompt=None, class_labels=None) -> None:
        """``ValueError`` for a condition of the wrong kind: a prompt given to a class-conditional (or unconditional)
        network, or class labels given to a text-conditional one."""
        name = type(self.net).__name__
        if self.conditioning_kind == "text" and class_labels is not None:
            raise ValueError(f"class_labels given, but {name} ({self.family}) is a text-conditional model: give "
                             "prompt (or prompt_embeds), not class_labels")
        if self.conditioning_kind != "text" and prompt is not None:
            what = "class_labels" if self.conditioning_kind == "class" else "no condition"
            raise ValueError(f"prompt given, but {name} ({self.family}) has no text encoder input: give {what}, "
                             "not prompt")

    @property
    def config(self):
        return self.net.config


class CallableAdapter(ModelAdapter):
    """Any callable ``f(x_in, t, **inputs) -> prediction`` (a guided function, a toy score, ...)."""

    family = "callable"


class ClassUNetAdapter(ModelAdapter):
    """A Diffusers ``UNet2DModel``, optionally class-conditional with a null class trained by label dropout
    (``num_class_embeds = classes + 1``; the last index is the null class), optionally with extra input channels
    (``concat``: a bridge's observation, fed as ``cat([x, concat], dim=1)``)."""

    family = "class_unet"
    conditioning_kind = "class"

    @property
    def num_classes(self) -> int | None:
        n = self.net.config.num_class_embeds
        return None if n is None else n - 1

    @property
    def null_class(self) -> int | None:
        return self.num_classes

    def __call__(self, x_in, timestep, class_labels=None, concat=None):
        inp = x_in if concat is None else torch.cat([x_in, concat.to(x_in.dtype)], dim=1)
        return self.model(inp, timestep, class_labels=class_labels).sample

    def class_conditioning(self, labels: torch.Tensor | None, extra: dict | None = None) -> Conditioning:
        """Inputs of the labelled branch and of the null class (no unconditional branch without class embeddings)."""
        extra = dict(extra or {})
        if labels is None or self.num_classes is None:
            return Conditioning(cond={**({} if labels is None else {"class_labels": labels}), **extra}, uncond=None)
        null = torch.full_like(labels, self.null_class)
        return Conditioning(cond={"class_labels": labels, **extra}, uncond={"class_labels": null, **extra})


class DiTAdapter(ModelAdapter):
    """``DiTTransformer2DModel`` (Peebles & Xie 2023): class labels with the null class ``num_embeds_ada_norm``
    (1000 for ImageNet); a learned-variance output (``out_channels = 2 x in_channels``) keeps its first half, the
    noise prediction, as Diffusers' ``DiTPipeline`` does."""

    family = "dit"
    conditioning_kind = "class"

    @property
    def num_classes(self) -> int:
        return int(self.net.config.num_embeds_ada_norm)

    @property
    def null_class(self) -> int | None:
        """``num_classes``, the row DiT's label embedding adds for label dropout (None if a table lacks it)."""
        table = _dit_label_table(self.net)
        if table is not None and table.num_embeddings <= self.num_classes:
            return None
        return self.num_classes

    def __call__(self, x_in, timestep, class_labels=None):
        t = torch.as_tensor(timestep, device=x_in.device)
        t = t.expand(x_in.shape[0]) if t.ndim == 0 else t
        out = self.model(x_in, timestep=t, class_labels=class_labels).sample
        c = x_in.shape[1]
        return out[:, :c] if out.shape[1] == 2 * c else out

    def class_conditioning(self, labels: torch.Tensor) -> Conditioning:
        """Labels ``[B]`` long in ``0 .. num_classes - 1``; the unconditional branch is the null class (none when the
        network has no null row, so guidance is then a ``ValueError`` in the core)."""
        null = self.null_class
        uncond = None if null is None else {"class_labels": torch.full_like(labels, null)}
        return Conditioning(cond={"class_labels": labels}, uncond=uncond)


def no_label_dropout(net) -> None:
    """Switch off the label dropout Diffusers' DiT keeps in training mode (10 %, for CFG; its ``LabelEmbedding``
    replaces labels by the null class at random): methods that train a DiT on the labels they give it (f-distill's
    student and fake score, AlignProp's sampling with gradients) call this. The null row of the table stays."""
    for m in net.modules():
        if type(m).__name__ == "LabelEmbedding":
            m.dropout_prob = 0.0


def _dit_label_table(net):
    # the first block's AdaLayerNormZero holds DiT's CombinedTimestepLabelEmbeddings
    try:
        return net.transformer_blocks[0].norm1.emb.class_embedder.embedding_table
    except (AttributeError, IndexError, TypeError):
        return None


class UNetTextAdapter(ModelAdapter):
    """``UNet2DConditionModel`` of Stable Diffusion 1.x/2.x (``encoder_hidden_states``) and SDXL (plus the added
    ``text_embeds`` = pooled text embedding and ``time_ids`` = original size, crop and target size); optional
    ``timestep_cond`` (guidance-distilled models)."""

    family = "unet_text"
    conditioning_kind = "text"

    def __call__(self, x_in, timestep, encoder_hidden_states=None, text_embeds=None, time_ids=None,
                 timestep_cond=None):
        added = None
        if text_embeds is not None or time_ids is not None:
            added = {"text_embeds": text_embeds, "time_ids": time_ids}
        return self.model(x_in, timestep, encoder_hidden_states=encoder_hidden_states, timestep_cond=timestep_cond,
                          added_cond_kwargs=added, return_dict=False)[0]


class SD3Adapter(ModelAdapter):
    """``SD3Transformer2DModel`` (Esser et al. 2024, MMDiT): ``encoder_hidden_states`` (CLIP-L/G + T5 tokens) and
    ``pooled_projections`` (pooled CLIP embeddings); predicts the flow ``eps - x0`` for
    ``FlowMatchEulerDiscreteScheduler``."""

    family = "sd3"
    conditioning_kind = "text"

    def __call__(self, x_in, timestep, encoder_hidden_states=None, pooled_projections=None):
        t = torch.as_tensor(timestep, device=x_in.device)
        t = t.expand(x_in.shape[0]) if t.ndim == 0 else t
        return self.model(hidden_states=x_in, timestep=t, encoder_hidden_states=encoder_hidden_states,
                          pooled_projections=pooled_projections, return_dict=False)[0]


def _families() -> dict[str, type[ModelAdapter]]:
    from diffusers import DiTTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel, UNet2DModel

    return {UNet2DModel.__name__: ClassUNetAdapter, UNet2DConditionModel.__name__: UNetTextAdapter,
            SD3Transformer2DModel.__name__: SD3Adapter, DiTTransformer2DModel.__name__: DiTAdapter}


SUPPORTED_NETWORKS = ("UNet2DModel", "UNet2DConditionModel", "SD3Transformer2DModel", "DiTTransformer2DModel")


def unwrap_network(model):
    """The network under DDP/FSDP/torch.compile/peft wrappers and f-distill's adapter views (``base_network``: one
    LoRA adapter over a shared base, :class:`gen.distill.lora.AdapterView`), for reading its class and config."""
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        for attr in ("module", "_orig_mod", "base_network"):
            inner = getattr(model, attr, None)
            if isinstance(inner, torch.nn.Module):
                model = inner
                break
        else:
            base = getattr(model, "get_base_model", None)
            if callable(base) and type(model).__name__.startswith("Peft"):
                model = base()
            else:
                break
    return model


def adapter_for(model) -> ModelAdapter:
    """The adapter of ``model``'s family; an adapter is returned as is.

    Raises:
        ValueError: naming the network class and listing the supported ones.
    """
    if isinstance(model, ModelAdapter):
        return model
    families = _families()
    net = unwrap_network(model)
    for cls in type(net).__mro__:
        if cls.__name__ in families:
            return families[cls.__name__](model)
    raise ValueError(f"unsupported network family {type(net).__name__}; supported: {', '.join(SUPPORTED_NETWORKS)}"
                     " (or wrap a callable in gen.sampling.CallableAdapter)")
