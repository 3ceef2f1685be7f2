"""AlignProp on the model families (``eval/alignprop_families.py``): time and memory of one training step on tiny
SDXL, tiny SD3-style and tiny class-conditional DiT components, K = 1 with checkpointing against full
backpropagation.

One training step is what ``train/alignprop.py`` does per micro-step: encode the prompts with the family pipeline's own
encoders (DiT: class labels and the null class), sample T steps with gradients through the last K
(``gen.reward.training.generate``: the one sampling core, CFG through its guider, the network and the VAE decode
checkpointed or not), reward (``contrast``), loss, backward, clip, AdamW on the rank-4 LoRA. Each configuration runs in
a fresh subprocess with ``MALLOC_MMAP_THRESHOLD_`` fixed (freed tensors return to the OS, so RSS follows live memory);
after one warm-up step, ``n_steps`` timed steps. Reported per configuration: seconds per step (median wall time, and the
process's CPU time, which other jobs on a shared box disturb less at one thread), the step's RSS high-water above the
RSS before the timed steps (``/proc/self/clear_refs`` reset, then ``VmHWM``: the target measure, as in the digits table
of ``eval/alignprop.py``), the bytes autograd saves for backward, and the process peak RSS. On CUDA the worker also
reports ``torch.cuda.max_memory_allocated``.

    python eval/alignprop_families.py [--families sdxl sd3 dit] [--steps 10] [--batch 2] [--out outputs/...json]
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
import time

import torch

from gen.evaluation import REPO_ROOT, machine, option, output_path

logger = logging.getLogger("gen.evaluation.alignprop_families")
FAMILIES = ("sdxl", "sd3", "dit")
PROMPTS = ["a photo of a cat", "a dog", "a red car", "a house by a lake"]
LABELS = ["1", "207", "360", "979"]   # DiT: class labels (ImageNet indices; the tiny DiT has 1000 classes)
MMAP_THRESHOLD = "131072"


@dataclasses.dataclass
class AlignPropFamiliesSettings:
    families: list[str] = option(list(FAMILIES), "model families to measure", choices=FAMILIES)
    steps: int = option(10, "T sampling steps (DDIM for SDXL and DiT as the trainer's default; flow Euler for SD3)")
    batch: int = option(2, "prompts per training step")
    width: int = option(64, "tiny denoiser width (SDXL UNet channels 64/128; SD3 MMDiT and DiT width)")
    sample_size: int = option(32, "latent side (images are twice as large: the tiny VAE's factor is 2)")
    sd3_layers: int = option(4, "joint transformer blocks of the tiny SD3")
    dit_layers: int = option(4, "transformer blocks of the tiny DiT (learned sigma, patch 2)")
    sd3_max_sequence_length: int = option(256, "SD3: T5 tokens (zeros: the tiny SD3 has no T5), Diffusers' default")
    guidance_scale: float = option(5.0, "CFG weight (two network rows per sample and step)")
    n_steps: int = option(3, "timed training steps per configuration (after one warm-up)")
    reps: int = option(1, "fresh-process repetitions per configuration; the one with the lowest median is kept")
    threads: int = option(1, "torch threads per worker")
    out: str = option("outputs/alignprop_families/results.json", "JSON file to write")
    update_shipped: bool = option(False, "allow --out inside eval/results/ (the shipped results)")

    def __post_init__(self):
        bad = [f for f in self.families if f not in FAMILIES]
        if bad or not self.families:
            raise ValueError(f"families {bad or self.families}; allowed: {', '.join(FAMILIES)}")
        for name in ("steps", "batch", "n_steps", "reps", "threads", "sd3_layers", "dit_layers",
                     "sd3_max_sequence_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1; got {getattr(self, name)}")
        if self.width < 8 or self.width % 8:
            raise ValueError(f"width must be a positive multiple of 8; got {self.width}")
        if self.sample_size < 2 or self.sample_size % 2:
            raise ValueError(f"sample_size must be even and >= 2; got {self.sample_size}")


def configurations(settings: AlignPropFamiliesSettings) -> list[dict]:
    """K = 1 and K = T (full backprop), each with checkpointing (network and VAE decode) on and off."""
    out = []
    for family in settings.families:
        for k in sorted({1, settings.steps}):
            for ckpt in (True, False):
                out.append({"family": family, "k": k, "checkpointing": ckpt, "steps": settings.steps,
                            "batch": settings.batch, "width": settings.width, "sample_size": settings.sample_size,
                            "sd3_layers": settings.sd3_layers, "dit_layers": settings.dit_layers,
                            "guidance_scale": settings.guidance_scale,
                            "max_sequence_length": settings.sd3_max_sequence_length, "n_steps": settings.n_steps})
    return out


def tiny_pipeline(spec: dict):
    """The family pipeline on tiny random components of the spec's size (nothing downloaded)."""
    from gen.models.tiny_families import build_tiny_dit, build_tiny_sd3, build_tiny_sdxl
    from pipelines import GuidedDiTPipeline, GuidedStableDiffusion3Pipeline, GuidedStableDiffusionXLPipeline

    if spec["family"] == "dit":
        parts = build_tiny_dit(0, width=spec["width"], sample_size=spec["sample_size"],
                               num_layers=spec.get("dit_layers", 4))
        return GuidedDiTPipeline(**parts)
    if spec["family"] == "sdxl":
        parts = build_tiny_sdxl(0, width=spec["width"], sample_size=spec["sample_size"])
        return GuidedStableDiffusionXLPipeline(**parts, add_watermarker=False)
    parts = build_tiny_sd3(0, width=spec["width"], sample_size=spec["sample_size"], num_layers=spec["sd3_layers"])
    return GuidedStableDiffusion3Pipeline(**parts)


def measure(spec: dict) -> dict:
    """One configuration, in this process: the trainer's step on the tiny family pipeline, timed and measured."""
    from gen.evaluation.alignprop import measure_steps
    from gen.reward import add_lora, build_reward, check_reward, lora_parameters
    from gen.reward.training import AlignPropConfig, compute_loss, denoiser, generate, make_backend, select_scheduler

    torch.manual_seed(0)
    prompts = LABELS if spec["family"] == "dit" else PROMPTS
    cfg = AlignPropConfig(model_type=spec["family"], pretrained_model="tiny", prompts=prompts, rewards="contrast:1.0",
                          num_inference_steps=spec["steps"], eta=0.0, guidance_scale=spec["guidance_scale"],
                          truncation="fixed", backprop_k=spec["k"], gradient_checkpointing=spec["checkpointing"],
                          checkpoint_decoder=spec["checkpointing"], train_batch_size=spec["batch"],
                          mixed_precision="no", max_sequence_length=spec["max_sequence_length"])
    cfg.validate()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    pipe = tiny_pipeline(spec)
    pipe.set_progress_bar_config(disable=True)
    select_scheduler(cfg, pipe)
    parts = [m for m in pipe.components.values() if isinstance(m, torch.nn.Module)]
    for m in parts:
        m.to(device).requires_grad_(False)
    net = denoiser(pipe)
    add_lora(net, cfg.lora_rank, cfg.lora_alpha, cfg.lora_target_modules, init="gaussian")
    params = lora_parameters(net)
    opt = torch.optim.AdamW(params, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                            weight_decay=cfg.weight_decay)
    reward = build_reward(cfg.rewards).to(device)
    backend = make_backend(cfg, pipe, net)
    trunc = cfg.truncation_spec()
    g = torch.Generator().manual_seed(0)

    def step(saved):
        batch = [prompts[int(i)] for i in torch.randint(0, len(prompts), (cfg.train_batch_size,), generator=g)]
        with saved if saved is not None else _null():
            images, info = generate(cfg, backend, batch, device, g, trunc)
            loss = compute_loss(cfg, check_reward(reward(images, batch), len(batch)))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)

    res = measure_steps(step, spec["n_steps"], device, [*parts, reward])
    res.update(lora_parameters=sum(p.numel() for p in params),
               network_parameters=sum(p.numel() for p in net.parameters()),
               image_size=backend.resolution, network=type(net).__name__, scheduler=type(pipe.scheduler).__name__)
    return res


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def run_worker(spec: dict, threads: int) -> dict:
    """``measure(spec)`` in a fresh subprocess; adds its peak RSS (``ru_maxrss``)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MALLOC_MMAP_THRESHOLD_=MMAP_THRESHOLD,
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONWARNINGS="ignore")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), *filter(None, [env.get("PYTHONPATH")])])
    proc = subprocess.run([sys.executable, "-m", "gen.evaluation.alignprop_families", json.dumps(spec), str(threads)],
                          env=env, cwd=str(REPO_ROOT), capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {spec} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    res = json.loads(line[len("RESULT "):])
    res["peak_rss_mb"] = max(res.pop("_maxrss_kb") / 1024, res.get("hwm_before_mb", 0))
    return res


def run(settings: AlignPropFamiliesSettings, command: str = "", in_process: bool = False) -> dict:
    """Measure every configuration (each in a fresh subprocess unless ``in_process``, for tests) and write JSON."""
    out = output_path(settings.out, settings.update_shipped)
    result = {"command": command, "machine": machine(), "settings": dataclasses.asdict(settings), "rows": []}
    for spec in configurations(settings):
        t0 = time.time()
        reps = []
        for _ in range(settings.reps):   # CPU time on a shared box is noisy: the lowest median of fresh processes
            if in_process:
                r = measure(spec)
                r["peak_rss_mb"] = float("nan")
            else:
                r = run_worker(spec, settings.threads)
            reps.append(r)
        res = min(reps, key=lambda r: r["s_per_step"])
        res["reps"] = [{k: r.get(k) for k in ("s_per_step", "cpu_s_per_step", "step_peak_rss_mb", "peak_rss_mb")}
                       for r in reps]
        res.update({k: spec[k] for k in ("family", "k", "checkpointing", "steps", "batch")})
        logger.info("%s K=%d ckpt=%s: %.3f s/step (lowest median of the repetitions), step peak RSS %.1f MB, "
                    "autograd saved %.1f MB, peak RSS %.0f MB (%.0f s)", spec["family"], spec["k"],
                    spec["checkpointing"], res["s_per_step"], res.get("step_peak_rss_mb", float("nan")),
                    res["saved_tensor_mb"], res["peak_rss_mb"], time.time() - t0)
        result["rows"].append(res)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    return result


def markdown(result: dict) -> str:
    """Rows for BENCHMARKS.md: per family, K = 1 / all with checkpointing on and off, and the ratio of the step peak
    to full backpropagation's (K = T, no checkpointing)."""
    lines = ["| family | network (LoRA params) | K | checkpointing | s / step (wall) | CPU s / step | step peak RSS"
             " (MB) | x full backprop | autograd saved (MB) | process peak RSS (MB) |", "|---" * 10 + "|"]
    rows = result["rows"]
    for r in rows:
        ref = next((x for x in rows if x["family"] == r["family"] and x["k"] == x["steps"] and not x["checkpointing"]),
                   None)
        peak, ref_peak = r.get("step_peak_rss_mb"), (ref or {}).get("step_peak_rss_mb")
        ratio = f"{peak / ref_peak:.2f}" if peak is not None and ref_peak else "-"
        k = f"{r['k']}{' (all)' if r['k'] == r['steps'] else ''}"
        lines.append(f"| {r['family']} | {r['network']} {r['network_parameters'] / 1e6:.2f} M ({r['lora_parameters']}) "
                     f"| {k} | {'on' if r['checkpointing'] else 'off'} | {r['s_per_step']:.3f} | "
                     f"{r.get('cpu_s_per_step', float('nan')):.3f} | "
                     f"{peak if peak is not None else float('nan'):.1f} | {ratio} | {r['saved_tensor_mb']:.1f} | "
                     f"{r['peak_rss_mb']:.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":   # the worker: python -m gen.evaluation.alignprop_families SPEC_JSON THREADS
    import resource

    torch.set_num_threads(int(sys.argv[2]))
    out = measure(json.loads(sys.argv[1]))
    out["_maxrss_kb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print("RESULT " + json.dumps(out), flush=True)
