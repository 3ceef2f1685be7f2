"""DiffusersAdaptiveGuidance driven the way Diffusers' modular pipelines drive guiders."""

import torch
from diffusers.guiders import ClassifierFreeGuidance

from gen.guidance.diffusers_compat import DiffusersAdaptiveGuidance


def _preds_factory(aligned_from: int):
    g = torch.Generator().manual_seed(0)
    base = [torch.randn(3, 4, 8, 8, generator=g) for _ in range(8)]
    noise = [torch.randn(3, 4, 8, 8, generator=g) for _ in range(8)]

    def preds(step):
        # uncond equals cond (cosine 1) from `aligned_from` on, unrelated before
        return base[step], base[step] if step >= aligned_from else noise[step]

    return preds


def _call(guider, cond, uncond):
    return guider.forward(cond, uncond).pred


def test_gamma_above_one_equals_cfg():
    preds = _preds_factory(aligned_from=1)
    ag, cfg = DiffusersAdaptiveGuidance(guidance_scale=5.0, gamma_bar=1.01), ClassifierFreeGuidance(guidance_scale=5.0)
    for step in range(4):
        for g in (ag, cfg):
            g.set_state(step, 4, torch.tensor(999 - step))
        assert ag.num_conditions == cfg.num_conditions == 2
        c, u = preds(step)
        assert torch.equal(_call(ag, c, u), _call(cfg, c, u))


def test_switches_off_after_alignment_and_resets_on_new_run():
    preds = _preds_factory(aligned_from=1)
    ag = DiffusersAdaptiveGuidance(guidance_scale=5.0, gamma_bar=0.99)
    conds = []
    for step in range(4):
        ag.set_state(step, 4, torch.tensor(999 - step))
        conds.append(ag.num_conditions)
        c, u = preds(step)
        out = _call(ag, c, u if ag.num_conditions == 2 else None)
        if ag.num_conditions == 1:
            assert torch.equal(out, c)
    assert conds == [2, 2, 1, 1] and ag.switched_at == 1
    ag.set_state(0, 4, torch.tensor(999))   # a new run guides again
    assert ag.num_conditions == 2 and ag.switched_at is None


def test_one_unaligned_sample_keeps_the_batch_guided():
    ag = DiffusersAdaptiveGuidance(guidance_scale=5.0, gamma_bar=0.99)
    c = torch.randn(2, 4, 8, 8)
    u = c.clone()
    u[1] = -u[1]
    ag.set_state(0, 4, torch.tensor(999))
    _call(ag, c, u)
    assert ag.switched_at is None and ag.last_gamma[0] > 0.99 > ag.last_gamma[1]


def test_config_round_trip(tmp_path):
    ag = DiffusersAdaptiveGuidance(guidance_scale=3.0, gamma_bar=0.995)
    ag.save_config(tmp_path)
    back = DiffusersAdaptiveGuidance.from_config(DiffusersAdaptiveGuidance.load_config(tmp_path))
    assert back.gamma_bar == 0.995 and back.guidance_scale == 3.0
