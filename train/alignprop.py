"""AlignProp: fine-tune a diffusion model's LoRA by backpropagating a differentiable reward through sampling.

    accelerate launch train/alignprop.py --config configs/alignprop_digits.yaml [--key value ...]
    accelerate launch train/alignprop.py --config configs/alignprop_sdxl.yaml      # or _sd15 / _sd3 / _dit (GPU)
    accelerate launch --multi_gpu --num_processes 2 train/alignprop.py --config configs/alignprop_digits.yaml \
        --max_train_steps 4 --output_dir OUT

The objective (Prabhudesai et al., arXiv 2310.03739) is ``gen.reward.training.AlignPropObjective``; the loop is
``gen.training``. ``model_type``: class_conditional | stable_diffusion | sdxl | sd3 | dit; defaults follow TRL 0.23's
``AlignPropConfig``. Output: ``pytorch_lora_weights.safetensors`` (Diffusers format), ``logs.jsonl``, ``eval.jsonl``.
"""

from gen.cli import run_main
from gen.reward.training import (  # noqa: F401  (the trainer's pieces, importable from the script as before)
    AlignPropConfig,
    compute_loss,
    generate,
    load_model,
    make_backend,
    read_prompts,
)
from gen.training import parse_config, train  # noqa: F401


def main(argv=None):
    return train("alignprop", argv)


if __name__ == "__main__":
    run_main(main)
