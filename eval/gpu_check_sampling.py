"""GPU check of the sampling core and the family pipelines (one CUDA device; about a minute). Not run in CI.

    python eval/gpu_check_sampling.py --out outputs/gpu_check_sampling.json

What it checks, each printed as PASS/FAIL with its numbers (exit status 1 if any fails):

1. Every family pipeline (SDXL, SD3-style, DiT on random components of ``gen.models.tiny_families``, ``medium``
   size) on CUDA in float32 equals Diffusers' own pipeline with plain CFG (max abs difference of the latents <= 1e-4,
   GPU kernels are not bit-reproducible across batch layouts), and APG runs.
2. The same in bfloat16: ours against Diffusers' in bfloat16 (<= 5e-2 on the latents) and ours in bfloat16 against
   ours in float32 (finite, correlation > 0.99).
3. The shipped digits teacher on CUDA with CFG, APG and AG gives the outputs recorded on the CPU in
   ``tests/regression`` (max abs difference <= 1e-3 on images in [0, 1]).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    a, b = a - a.mean(), b - b.mean()
    return float((a @ b) / (a.norm() * b.norm()).clamp_min(1e-30))


def check_families(device, results: list) -> None:
    import gen.evaluation.bench_sampling as bs
    from gen.guidance import APG

    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 5e-2)):
        bs.DEVICE["device"], bs.DEVICE["dtype"] = device, dtype
        for name in ("sdxl", "sd3", "dit"):
            ours, ref, _, kw = bs.family_pipelines(name, "medium")
            kw = dict(kw, num_inference_steps=8)
            if name != "dit":
                kw["output_type"] = "latent"
            with torch.no_grad():
                a = torch.as_tensor(ours(**kw, generator=torch.Generator().manual_seed(0)).images).float().cpu()
                b = torch.as_tensor(ref(**kw, generator=torch.Generator().manual_seed(0)).images).float().cpu()
                c = torch.as_tensor(ours(**{k: v for k, v in kw.items() if k != "guidance_scale"},
                                         guider=APG(guidance_scale=5.0, eta=0.0, momentum=-0.5),
                                         generator=torch.Generator().manual_seed(0)).images).float().cpu()
            diff = float((a - b).abs().max())
            row = {"check": f"{name} {str(dtype).split('.')[-1]} vs Diffusers", "max_abs_diff": diff, "tol": tol,
                   "apg_finite": bool(torch.isfinite(c).all()), "ok": diff <= tol and bool(torch.isfinite(c).all())}
            if dtype == torch.bfloat16:
                bs.DEVICE["dtype"] = torch.float32
                ours32, _, _, _ = bs.family_pipelines(name, "medium")
                with torch.no_grad():
                    a32 = torch.as_tensor(ours32(**kw, generator=torch.Generator().manual_seed(0)).images).float().cpu()
                row["corr_bf16_vs_fp32"] = _corr(a, a32)
                row["ok"] = row["ok"] and bool(torch.isfinite(a).all()) and row["corr_bf16_vs_fp32"] > 0.99
                bs.DEVICE["dtype"] = dtype
            results.append(row)


def check_teacher(device, results: list) -> None:
    from safetensors.torch import load_file

    from tests.regression.cases import CASES, EXPECTED

    expected = load_file(str(EXPECTED))
    import tests.regression.cases as cases

    original = cases._quiet

    def on_device(pipe):  # the recorded cases build their pipelines through _quiet: move them to the GPU there
        return original(pipe).to(device)

    cases._quiet = on_device
    try:
        for name in ("teacher_cfg_scale", "teacher_apg", "teacher_ag", "interpolant_ode_w2", "gbm_ddim"):
            torch.manual_seed(0)
            with torch.no_grad():
                got = torch.as_tensor(CASES[name]()).float().cpu()
            diff = float((got - expected[name]).abs().max())
            results.append({"check": f"{name} on {device} vs the CPU recording", "max_abs_diff": diff, "tol": 1e-3,
                            "ok": diff <= 1e-3})
    finally:
        cases._quiet = original


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="outputs/gpu_check_sampling.json")
    p.add_argument("--device", default="cuda")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type != "cuda" or not torch.cuda.is_available():
        raise ValueError(f"this check needs a CUDA device; got --device {args.device} "
                         f"(cuda available: {torch.cuda.is_available()})")
    t0 = time.time()
    results: list = []
    check_families(device, results)
    check_teacher(device, results)
    for r in results:
        print(("PASS" if r["ok"] else "FAIL") + ": " + json.dumps(r))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": torch.cuda.get_device_name(device), "torch": torch.__version__,
                               "date": time.strftime("%Y-%m-%d"), "wall_s": round(time.time() - t0, 1),
                               "results": results}, indent=2))
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
