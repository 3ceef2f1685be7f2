"""AlignProp benchmark pieces (``eval/alignprop.py``): the reward curve of a training run, the report (rows.md and
the plot), the ``make demo`` section, and the memory helpers the measuring workers share (RSS high-water mark
reset, autograd-saved bytes, timed steps; also used by :mod:`gen.evaluation.alignprop_families`). The memory and
TRL parts of ``eval/alignprop.py`` run the trainer's step in subprocesses of that script.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch

from gen.evaluation import REPO_ROOT

logger = logging.getLogger("gen.evaluation.alignprop")


def part_curve(settings) -> dict:
    run = Path(settings.run)
    evals = [json.loads(ln) for ln in (run / "eval.jsonl").read_text().splitlines() if ln.strip()]
    logs = [json.loads(ln) for ln in (run / "logs.jsonl").read_text().splitlines() if ln.strip()]
    import yaml

    cfg = yaml.safe_load((run / "config.yaml").read_text())
    return {"run": str(run), "config": cfg, "evals": evals, "train_logs": logs}


# ---------------------------------------------------------------------------------------------------------------
# memory helpers (run inside a worker subprocess: eval/alignprop.py, gen.evaluation.alignprop_families)
# ---------------------------------------------------------------------------------------------------------------
def status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return -1


def reset_hwm() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class SavedBytes:
    """Sum of the bytes of tensors autograd saves for backward while active (distinct storages; the storages of
    ``modules``' parameters and buffers, which exist anyway, are not counted)."""

    def __init__(self, modules=()):
        self.seen, self.total = set(), 0
        for m in modules:
            for t in [*m.parameters(), *m.buffers()]:
                self.seen.add((t.untyped_storage().data_ptr(), t.device))
        self.ctx = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda x: x)

    def pack(self, t):
        try:
            key = (t.untyped_storage().data_ptr(), t.device)
            if key not in self.seen:
                self.seen.add(key)
                self.total += t.untyped_storage().nbytes()
        except (RuntimeError, NotImplementedError):
            pass
        return t

    def __enter__(self):
        self.ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self.ctx.__exit__(*exc)


def measure_steps(step_fn, n_steps: int, device, modules=()) -> dict:
    """One warm-up step, then ``n_steps`` timed steps with the RSS high-water reset before them."""
    step_fn(None)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    rss0 = status_kb("VmRSS")
    hwm_before = status_kb("VmHWM")
    reset = reset_hwm()
    saved = SavedBytes(modules)
    times, cpu = [], []
    for i in range(n_steps):
        t0, c0 = time.perf_counter(), time.process_time()
        step_fn(saved if i == 0 else None)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    # wall time and the process's CPU time (less sensitive to other jobs on a shared box when it runs one thread)
    out = {"s_per_step": sorted(times)[len(times) // 2], "mean_s_per_step": sum(times) / len(times),
           "step_times": [round(t, 4) for t in times], "cpu_s_per_step": sorted(cpu)[len(cpu) // 2],
           "rss_before_mb": rss0 / 1024, "hwm_before_mb": hwm_before / 1024, "hwm_reset": reset,
           "saved_tensor_mb": saved.total / 2 ** 20}
    if reset:
        out["step_peak_rss_mb"] = (status_kb("VmHWM") - rss0) / 1024
    if device.type == "cuda":
        out["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
    return out


# ---------------------------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------------------------
def report(results: dict, out: Path) -> str:
    lines = []
    curve = results.get("curve")
    if curve:
        ev = curve["evals"]
        base = ev[0]
        lines += ["| step | held-out reward (log p(label)) | FID-digits vs test | FID-digits vs base model |"
                  " class accuracy |", "|---|---|---|---|---|"]
        for e in ev:
            lines.append(f"| {e['step']} | {e['eval_reward']:.4f} | {e.get('fid_digits', float('nan')):.2f} | "
                         f"{e.get('fid_vs_base', float('nan')):.2f} | {100 * e.get('class_accuracy', 0):.1f} % |")
        lines.append(f"\nheld-out reward {base['eval_reward']:.4f} -> {ev[-1]['eval_reward']:.4f} "
                     f"(step {ev[-1]['step']}); FID-digits {base.get('fid_digits', 0):.2f} -> "
                     f"{ev[-1].get('fid_digits', 0):.2f}\n")
    mem = results.get("memory")
    if mem:
        full = {r["checkpointing"]: r for r in mem if r["k"] == r["steps"]}
        ref = full.get(False)
        lines += ["| K | checkpointing | s / step | step peak RSS (MB) | x full backprop | autograd saved (MB) |"
                  " process peak RSS (MB) |", "|---|---|---|---|---|---|---|"]
        for r in mem:
            ratio = r.get("step_peak_rss_mb", 0) / ref["step_peak_rss_mb"] if ref and ref.get("step_peak_rss_mb") \
                else float("nan")
            name = f"{r['k']}{' (all)' if r['k'] == r['steps'] else ''}"
            lines.append(f"| {name} | {'on' if r['checkpointing'] else 'off'}"
                         f" | {r['s_per_step']:.3f} | {r.get('step_peak_rss_mb', float('nan')):.1f} | {ratio:.2f} | "
                         f"{r['saved_tensor_mb']:.1f} | {r['peak_rss_mb']:.0f} |")
        lines.append("")
    trl_rows = results.get("trl")
    if trl_rows:
        lines += ["| impl | K | T | batch | s / step | step peak RSS (MB) | autograd saved (MB) |"
                  " process peak RSS (MB) |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in trl_rows:
            impl = {"trl": "TRL 0.23.1 AlignPropTrainer", "ours": "gen train/alignprop.py",
                    "ours_nodec": "gen, decoder not checkpointed"}[r["impl"]]
            lines.append(f"| {impl} | "
                         f"{r['k']} | {r['steps']} | {r['batch']} | {r['s_per_step']:.3f} | "
                         f"{r.get('step_peak_rss_mb', float('nan')):.1f} | {r['saved_tensor_mb']:.1f} | "
                         f"{r['peak_rss_mb']:.0f} |")
    md = "\n".join(lines) + "\n"
    (out / "rows.md").write_text(md)
    if curve:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return md
        ev = curve["evals"]
        fig, ax = plt.subplots(figsize=(6.5, 4))
        steps = [e["step"] for e in ev]
        held = ", ".join(map(str, curve["config"].get("eval_prompts", [])))
        ax.plot(steps, [e["eval_reward"] for e in ev], "o-", color="C0", label=f"held-out reward (labels {held})")
        logs = curve["train_logs"]
        ax.set_xlabel("training step")
        ax.set_ylabel("mean log p(label | x)  (higher is better)", color="C0")
        ax2 = ax.twinx()
        ax2.plot(steps, [e.get("fid_digits", float("nan")) for e in ev], "s--", color="C1", label="FID-digits vs test")
        ax2.plot(steps, [e.get("fid_vs_base", float("nan")) for e in ev], "^:", color="C2",
                 label="FID-digits vs base model")
        ax2.set_ylabel("FID-digits", color="C1")
        h1, l1 = ax.get_legend_handles_labels()
        h2, l2 = ax2.get_legend_handles_labels()
        ax.legend(h1 + h2, l1 + l2, loc="center right", fontsize=8)
        ax.set_title(f"AlignProp on the digits teacher ({len(logs) and logs[-1]['step']} steps): held-out reward "
                     "and FID drift", fontsize=10)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / "reward_curve.png", dpi=120)
        plt.close(fig)
    return md


def demo_section(out: Path, settings) -> dict:
    """`make demo`: held-out digits (labels 1, 2, 5) before and after the shipped AlignProp LoRA, same noise.

    64 samples per label (10 DDIM steps, seed ``settings.seed``); the mean digits-classifier log-probability of each
    set; a grid of the 8 samples per label that the teacher does worst on (rows 1-3) next to the LoRA's samples
    of the same noise (rows 4-6).
    """
    from gen.data.images import save_labelled_grid
    from gen.reward import build_reward
    from pipelines.lora import ClassConditionalLoraPipeline

    t0 = time.time()
    lora = REPO_ROOT / "checkpoints" / "digits-alignprop-lora"
    pipe = ClassConditionalLoraPipeline.from_pretrained(REPO_ROOT / "checkpoints" / "digits-teacher")
    pipe.set_progress_bar_config(disable=True)
    from gen.evaluation.demo import size

    held, per, steps = [1, 2, 5], size(settings, 64, 8), size(settings, 10, 2)
    labels = torch.tensor(held).repeat_interleave(per)
    seed = getattr(settings, "seed", 0)
    reward = build_reward("digits_classifier:1.0")

    def run():
        img = pipe(class_labels=labels, num_inference_steps=steps, output_type="pt",
                   generator=torch.Generator().manual_seed(seed)).images
        with torch.no_grad():
            return img, reward(img, labels.tolist())

    before, r_before = run()
    pipe.load_lora_weights(lora)
    after, r_after = run()
    worst = torch.cat([i * per + r_before[i * per:(i + 1) * per].argsort()[:8] for i in range(len(held))])
    grid = torch.cat([before[worst], after[worst]]) * 2 - 1
    path = save_labelled_grid(grid, out / "alignprop_before_after.png", nrow=8, upscale=4,
                              title="AlignProp on held-out labels 1, 2, 5: the teacher's 8 lowest-reward samples "
                                    "per label\n(top) and the AlignProp LoRA from the same noise (bottom); "
                                    f"{steps} DDIM steps",
                              row_labels=[f"teacher, {c}" for c in held] + [f"LoRA, {c}" for c in held])
    res = {"grid": str(path), "labels": held, "samples_per_label": per,
           "reward_before": float(r_before.mean()), "reward_after": float(r_after.mean()),
           "p_label_below_0.5_before": float((r_before.exp() < 0.5).float().mean()),
           "p_label_below_0.5_after": float((r_after.exp() < 0.5).float().mean()), "lora": str(lora),
           "wall_time_s": round(time.time() - t0, 1)}
    logger.info("wrote %s (rows 1-3: the teacher's 8 lowest-reward samples per label 1, 2, 5; rows 4-6: the same noise "
                "with the AlignProp LoRA; %d DDIM steps). Mean log p(label) over %d samples: %.4f -> %.4f; "
                "share with p(label) < 0.5: %.3f -> %.3f (%.1f s)", path, steps, len(labels), res["reward_before"],
                res["reward_after"], res["p_label_below_0.5_before"], res["p_label_below_0.5_after"],
                res["wall_time_s"])
    return res


