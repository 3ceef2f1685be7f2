"""LoRA loading for pipelines whose Diffusers class has no ``load_lora_weights``: the class-conditional
``UNet2DModel`` pipeline (Diffusers' loaders cover ``UNet2DConditionModel``-style pipelines only) and the
class-conditional DiT (Diffusers' ``DiTPipeline`` has no LoRA loader).

The file is the Diffusers LoRA format (``pytorch_lora_weights.safetensors``, peft keys prefixed with the pipeline
component that holds the network, ``unet.`` or ``transformer.``, the ``LoraConfig`` in the safetensors metadata)
that ``StableDiffusionPipeline.save_lora_weights`` / ``StableDiffusion3Pipeline.save_lora_weights`` write and that
``train/alignprop.py`` saves.

    >>> pipe = ClassConditionalLoraPipeline.from_pretrained("checkpoints/digits-teacher")
    >>> pipe.load_lora_weights("checkpoints/digits-alignprop-lora")
    >>> dit = GuidedDiTPipeline.from_pretrained("facebook/DiT-XL-2-256")   # TransformerLoraLoaderMixin
    >>> dit.load_lora_weights("runs/alignprop-dit-aesthetic")
"""

from __future__ import annotations

from typing import ClassVar

from gen.reward.lora import LORA_WEIGHT_NAME, load_lora_into_unet, save_lora

from .class_conditional import ClassConditionalPipeline


class NetworkLoraLoaderMixin:
    """``load_lora_weights`` / ``save_lora_weights`` / ``unload_lora_weights`` for a pipeline whose denoiser is the
    component ``lora_component`` (``unet`` or ``transformer``; also the key prefix of the file)."""

    lora_component: ClassVar[str] = "unet"

    @property
    def _lora_network(self):
        return getattr(self, self.lora_component)

    def load_lora_weights(self, pretrained_model_name_or_path, adapter_name: str = "default", **kwargs):
        """Inject and load a LoRA from a folder holding ``pytorch_lora_weights.safetensors`` (or the file).

        Hub ids are resolved with ``huggingface_hub.snapshot_download`` (``weight_name=`` picks another file).
        Raises ``ValueError`` if the file is missing, holds another component's keys (``unet.`` for a transformer)
        or its keys match no module of the network.
        """
        from pathlib import Path

        from gen import validate
        from gen.sampling.loading import looks_local

        if not isinstance(pretrained_model_name_or_path, (str, Path)):
            raise validate.ArgumentTypeError(f"pretrained_model_name_or_path must be a folder, a file or a hub id; got "
                                             f"{validate.describe(pretrained_model_name_or_path)}")
        if not isinstance(adapter_name, str) or not adapter_name:
            raise validate.ArgumentTypeError(f"adapter_name must be a non-empty string; got "
                                             f"{validate.describe(adapter_name)}")
        path = Path(str(pretrained_model_name_or_path))
        if not path.exists() and not looks_local(str(pretrained_model_name_or_path)) \
                and "/" in str(pretrained_model_name_or_path):
            from huggingface_hub import snapshot_download

            try:
                path = Path(snapshot_download(str(pretrained_model_name_or_path)))
            except Exception as err:  # offline, unknown repo, ...: one error naming the id
                raise ValueError(f"could not fetch LoRA {str(pretrained_model_name_or_path)!r} from the hub: "
                                 f"{type(err).__name__}: {err}") from None
        elif not path.exists():
            raise ValueError(f"no LoRA weights at {str(path)!r}: no such folder or file")
        if path.is_dir() and kwargs.get("weight_name"):
            path = path / kwargs["weight_name"]
        network = self._lora_network
        if adapter_name in getattr(network, "peft_config", {}):
            raise ValueError(f"adapter {adapter_name!r} is already loaded; pass another adapter_name")
        meta = load_lora_into_unet(network, path, adapter_name=adapter_name)
        network.eval()
        return meta

    @classmethod
    def save_lora_weights(cls, save_directory, lora_layers: dict | None = None,
                          lora_adapter_metadata: dict | None = None, **kwargs):
        """Write ``lora_layers`` (peft state dict without prefix) in the Diffusers format, keys prefixed with
        ``lora_component``. Diffusers' keyword names are accepted too: ``unet_lora_layers`` /
        ``unet_lora_adapter_metadata`` or ``transformer_lora_layers`` / ``transformer_lora_adapter_metadata``."""
        name = cls.lora_component
        if lora_layers is None:
            lora_layers = kwargs.pop(f"{name}_lora_layers", None)
        if lora_adapter_metadata is None:
            lora_adapter_metadata = kwargs.pop(f"{name}_lora_adapter_metadata", None)
        if lora_layers is None:
            raise ValueError(f"give the LoRA state dict (lora_layers or {name}_lora_layers)")
        return save_lora(save_directory, lora_layers, lora_adapter_metadata or {}, prefix=name)

    def unload_lora_weights(self):
        """Remove every LoRA layer (restores the base network)."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        network = self._lora_network
        for name, module in list(network.named_modules()):
            if isinstance(module, BaseTunerLayer):
                parent_name, _, child = name.rpartition(".")
                parent = network.get_submodule(parent_name) if parent_name else network
                setattr(parent, child, module.get_base_layer())
        if hasattr(network, "peft_config"):
            del network.peft_config


class UNetLoraLoaderMixin(NetworkLoraLoaderMixin):
    """LoRA loading for a pipeline with ``self.unet`` (keys ``unet.``)."""

    lora_component = "unet"


class TransformerLoraLoaderMixin(NetworkLoraLoaderMixin):
    """LoRA loading for a pipeline with ``self.transformer`` (keys ``transformer.``; ``GuidedDiTPipeline``)."""

    lora_component = "transformer"


class ClassConditionalLoraPipeline(UNetLoraLoaderMixin, ClassConditionalPipeline):
    """:class:`ClassConditionalPipeline` with ``load_lora_weights`` (loads the same folders)."""


__all__ = ["ClassConditionalLoraPipeline", "LORA_WEIGHT_NAME", "NetworkLoraLoaderMixin", "TransformerLoraLoaderMixin",
           "UNetLoraLoaderMixin"]
