"""LoRA loading for pipelines whose UNet is a ``UNet2DModel`` (Diffusers' ``load_lora_weights`` only covers
``UNet2DConditionModel``-style pipelines).

The file is the Diffusers LoRA format (``pytorch_lora_weights.safetensors``, ``unet.``-prefixed peft keys, the
``LoraConfig`` in the safetensors metadata) that ``StableDiffusionPipeline.save_lora_weights`` writes and that
``train/alignprop.py`` saves.

    >>> pipe = ClassConditionalLoraPipeline.from_pretrained("checkpoints/digits-teacher")
    >>> pipe.load_lora_weights("checkpoints/digits-alignprop-lora")
"""

from __future__ import annotations

from gen.reward.lora import LORA_WEIGHT_NAME, load_lora_into_unet, save_lora

from .class_conditional import ClassConditionalPipeline


class UNetLoraLoaderMixin:
    """``load_lora_weights`` / ``save_lora_weights`` / ``unload_lora_weights`` for a pipeline with ``self.unet``."""

    def load_lora_weights(self, pretrained_model_name_or_path, adapter_name: str = "default", **kwargs):
        """Inject and load a LoRA from a folder holding ``pytorch_lora_weights.safetensors`` (or the file).

        Hub ids are resolved with ``huggingface_hub.snapshot_download`` (``weight_name=`` picks another file).
        Raises ``ValueError`` if the file is missing or its keys match no module of the UNet.
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
        if adapter_name in getattr(self.unet, "peft_config", {}):
            raise ValueError(f"adapter {adapter_name!r} is already loaded; pass another adapter_name")
        meta = load_lora_into_unet(self.unet, path, adapter_name=adapter_name)
        self.unet.eval()
        return meta

    @classmethod
    def save_lora_weights(cls, save_directory, unet_lora_layers: dict, unet_lora_adapter_metadata: dict | None = None,
                          **kwargs):
        """Write ``unet_lora_layers`` (peft state dict without prefix) in the Diffusers format."""
        return save_lora(save_directory, unet_lora_layers, unet_lora_adapter_metadata or {})

    def unload_lora_weights(self):
        """Remove every LoRA layer (restores the base UNet)."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        for name, module in list(self.unet.named_modules()):
            if isinstance(module, BaseTunerLayer):
                parent_name, _, child = name.rpartition(".")
                parent = self.unet.get_submodule(parent_name) if parent_name else self.unet
                setattr(parent, child, module.get_base_layer())
        if hasattr(self.unet, "peft_config"):
            del self.unet.peft_config


class ClassConditionalLoraPipeline(UNetLoraLoaderMixin, ClassConditionalPipeline):
    """:class:`ClassConditionalPipeline` with ``load_lora_weights`` (loads the same folders)."""


__all__ = ["ClassConditionalLoraPipeline", "LORA_WEIGHT_NAME", "UNetLoraLoaderMixin"]
