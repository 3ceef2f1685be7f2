"""Fit LinearAG coefficients on recorded CFG trajectories and save the guider (``eval/calibrate_linear_ag.py``).

Records, for N seeded samples, the conditional and unconditional x0 predictions at every DDIM step of a CFG run,
then solves one least-squares problem per step (``gen.guidance.fit_linear_ag``). The saved folder loads with
``LinearAG.from_pretrained(out)``; it is tied to the step count it was fitted for.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path

import torch

from gen.evaluation import REPO_ROOT, option, output_path, refresh_manifest, repo_path

logger = logging.getLogger("gen.evaluation.linear_ag")
SHIPPED_LINEAR_AG = REPO_ROOT / "checkpoints" / "digits-teacher" / "linear_ag"


@dataclasses.dataclass
class CalibrationSettings:
    pipeline: str = option("checkpoints/digits-teacher", "ClassConditionalPipeline folder or hub id")
    steps: int = option(20, "DDIM steps the coefficients are fitted for")
    guidance_scale: float = option(3.0, "CFG weight w of the recorded runs")
    num_samples: int = option(200, "recorded trajectories")
    num_exact_steps: int = option(2, "leading steps that keep the real unconditional pass")
    seed: int = option(1234, "seed of the calibration noise (not the evaluation's)")
    out: str = option("outputs/linear_ag", "folder for the guider")
    update_shipped: bool = option(False, "write the shipped checkpoints/digits-teacher/linear_ag (and its manifest) "
                                         "instead of --out")

    def __post_init__(self):
        for name in ("steps", "num_samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1; got {getattr(self, name)}")


def record_cfg_trajectories(pipe, num_samples: int, steps: int, guidance_scale: float, seed: int,
                            batch_size: int = 250) -> list[dict]:
    """Run CFG and return one ``{"cond", "uncond"}`` dict of x0 predictions ``[N, ...]`` per step."""
    from gen.guidance import CFG

    class RecordingCFG(CFG):
        def needs_predictions(self, info):
            return True  # CFG alone is mixed on raw outputs; recording needs the x0 of both branches

        def __call__(self, cond, uncond, info):
            self.record[info.step_index] = (cond.x0.detach().cpu(), uncond.x0.detach().cpu())
            return super().__call__(cond, uncond, info)

    labels = torch.arange(num_samples) % pipe.num_classes
    generator = torch.Generator().manual_seed(seed)
    per_step: list[list[tuple]] = [[] for _ in range(steps)]
    for start in range(0, num_samples, batch_size):
        guider = RecordingCFG(guidance_scale=guidance_scale)
        guider.record = {}
        pipe(class_labels=labels[start:start + batch_size], num_inference_steps=steps, guider=guider,
             generator=generator, output_type="pt")
        for k in range(steps):
            per_step[k].append(guider.record[k])
    return [{"cond": torch.cat([c for c, _ in s]), "uncond": torch.cat([u for _, u in s])} for s in per_step]


def relative_residuals(guider, traj) -> list[float]:
    """``||Du_hat - Du|| / ||Du||`` per step of the fit."""
    from gen.guidance.linear_ag import regressors

    out = []
    for k, step in enumerate(traj):
        prev = None if k == 0 else (traj[k - 1]["cond"], traj[k - 1]["uncond"])
        est = sum(b * x for b, x in zip(guider.config.coefficients[k], regressors(step["cond"], prev)))
        out.append(float((est - step["uncond"]).norm() / step["uncond"].norm()))
    return out


def run(settings: CalibrationSettings, command: str = ""):
    """Fit, save the guider and ``calibration.json`` (residuals, settings, date); returns the guider."""
    from gen.guidance import LinearAG
    from pipelines import ClassConditionalPipeline

    out = SHIPPED_LINEAR_AG if settings.update_shipped else output_path(settings.out)
    pipe = ClassConditionalPipeline.from_pretrained(repo_path(settings.pipeline))
    pipe.set_progress_bar_config(disable=True)
    t0 = time.time()
    traj = record_cfg_trajectories(pipe, settings.num_samples, settings.steps, settings.guidance_scale, settings.seed)
    guider = LinearAG.from_trajectories(traj, guidance_scale=settings.guidance_scale,
                                        num_exact_steps=settings.num_exact_steps)
    guider.save_pretrained(out)
    meta = {"pipeline": settings.pipeline, "steps": settings.steps, "guidance_scale": settings.guidance_scale,
            "num_samples": settings.num_samples, "seed": settings.seed, "num_exact_steps": settings.num_exact_steps,
            "relative_residual_per_step": [round(r, 5) for r in relative_residuals(guider, traj)],
            "wall_time_s": round(time.time() - t0, 1), "date": time.strftime("%Y-%m-%d"), "command": command}
    Path(out, "calibration.json").write_text(json.dumps(meta, indent=2))
    if settings.update_shipped:
        refresh_manifest(out)
    logger.info("fitted %d steps in %.0f s; relative residuals %s -> %s", settings.steps, meta["wall_time_s"],
                meta["relative_residual_per_step"], out)
    return guider
