"""Fit LinearAG coefficients on recorded CFG trajectories and save the guider (coefficients in its config).

    python eval/calibrate_linear_ag.py --pipeline checkpoints/digits-teacher --steps 20 --guidance_scale 3 \
        --num_samples 200 --out checkpoints/digits-teacher/linear_ag

Records, for N seeded samples, the conditional and unconditional x0 predictions at every DDIM step of a CFG run,
then solves one least-squares problem per step (``gen.guidance.fit_linear_ag``). The saved folder loads with
``LinearAG.from_pretrained(out)``; it is tied to the step count it was fitted for.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

logger = logging.getLogger("calibrate_linear_ag")


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


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pipeline", default=str(ROOT / "checkpoints" / "digits-teacher"))
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance_scale", type=float, default=3.0)
    p.add_argument("--num_samples", type=int, default=200)
    p.add_argument("--num_exact_steps", type=int, default=2, help="leading steps that keep the real uncond pass")
    p.add_argument("--seed", type=int, default=1234, help="seed of the calibration noise (not the evaluation's)")
    p.add_argument("--out", default=str(ROOT / "checkpoints" / "digits-teacher" / "linear_ag"))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from gen.guidance import LinearAG
    from pipelines import ClassConditionalPipeline

    pipe = ClassConditionalPipeline.from_pretrained(args.pipeline)
    pipe.set_progress_bar_config(disable=True)
    t0 = time.time()
    traj = record_cfg_trajectories(pipe, args.num_samples, args.steps, args.guidance_scale, args.seed)
    guider = LinearAG.from_trajectories(traj, guidance_scale=args.guidance_scale, num_exact_steps=args.num_exact_steps)
    guider.save_pretrained(args.out)
    # relative residual of the fit per step, for the record
    from gen.guidance.linear_ag import regressors

    residuals = []
    for k, step in enumerate(traj):
        prev = None if k == 0 else (traj[k - 1]["cond"], traj[k - 1]["uncond"])
        h = regressors(step["cond"], prev)
        est = sum(b * x for b, x in zip(guider.config.coefficients[k], h))
        residuals.append(float((est - step["uncond"]).norm() / step["uncond"].norm()))
    meta = {"pipeline": args.pipeline, "steps": args.steps, "guidance_scale": args.guidance_scale,
            "num_samples": args.num_samples, "seed": args.seed, "num_exact_steps": args.num_exact_steps,
            "relative_residual_per_step": [round(r, 5) for r in residuals], "wall_time_s": round(time.time() - t0, 1),
            "date": time.strftime("%Y-%m-%d"), "command": " ".join(["python", *sys.argv])}
    Path(args.out, "calibration.json").write_text(json.dumps(meta, indent=2))
    logger.info("fitted %d steps in %.0f s; relative residuals %s -> %s", args.steps, meta["wall_time_s"],
                meta["relative_residual_per_step"], args.out)
    return guider


if __name__ == "__main__":
    main()
