import pytest
import torch

from vl_core.calibrate import (SKIP_FIRST_TOKENS, VLCalibration, apply_calibration, calibration_report,
                               fit_calibration, load_prompts, map_metrics)
from vl_core.types import VLEmbeds

D = 16


def prompts(count=30, seed=0, d=D):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(int(torch.randint(4, 12, (1,), generator=g)), d, generator=g) * 2 + 1 for _ in range(count)]


def test_recovers_a_planted_per_dim_affine():
    a, b = torch.linspace(0.5, 3, D), torch.linspace(-1, 1, D)
    pairs = [(x, x * a + b) for x in prompts()]
    cal = fit_calibration(pairs, "affine", (3,), 8)
    assert torch.allclose(cal.weight, a, atol=1e-4) and torch.allclose(cal.bias, b, atol=1e-4)
    assert cal.held_out["map"]["rel_error"] < 1e-4 and cal.held_out["map"]["cosine"] > 0.9999
    assert cal.held_out["identity"]["rel_error"] > 0.1


def test_recovers_a_planted_linear_map():
    g = torch.Generator().manual_seed(1)
    w, b = torch.randn(D, D, generator=g) / 4, torch.randn(D, generator=g)
    pairs = [(x, x @ w + b) for x in prompts()]
    cal = fit_calibration(pairs, "linear", (3,), 8)
    assert cal.lam == 0.0                         # enough tokens: plain least squares wins on held-out prompts
    assert torch.allclose(cal.weight, w, atol=1e-4) and torch.allclose(cal.bias, b, atol=1e-4)
    assert cal.held_out["map"]["rel_error"] < 1e-4
    x = torch.randn(2, 5, D)
    assert torch.allclose(cal.map(x), x @ w + b, atol=1e-4)


def test_ridge_lambda_is_chosen_on_held_out_prompts():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(D, D, generator=g) / 4
    pairs = [(x, x @ w + 3.0 * torch.randn(x.shape, generator=g)) for x in prompts(12)]
    cal = fit_calibration(pairs, "linear", (3,), 8)
    scores = {float(k): v for k, v in cal.held_out["lambda_scores"].items()}
    assert cal.lam == min(scores, key=scores.get) and cal.lam > 0     # noisy and few tokens: ridge helps


def test_unrelated_data_reports_a_large_error():
    pairs = [(x, torch.randn(x.shape, generator=torch.Generator().manual_seed(i))) for i, x in enumerate(prompts())]
    for kind in ("affine", "linear"):
        cal = fit_calibration(pairs, kind, (3,), 8)
        assert cal.held_out["map"]["rel_error"] > 0.9
        assert "held-out relative error" in calibration_report(cal)


def test_fewer_tokens_than_dims_regularises_and_warns():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(64, 64, generator=g)
    pairs = [(x, x @ w) for x in prompts(5, d=64)]
    cal = fit_calibration(pairs, "linear", (3,), 8)
    assert cal.lam > 0 and cal.warnings and "under-determined" in cal.warnings[0]
    assert torch.isfinite(cal.weight).all()
    assert "warning" in calibration_report(cal, dropped=2)


def test_bad_pairs_are_refused():
    x = torch.randn(5, D)
    with pytest.raises(ValueError, match="at least 2"):
        fit_calibration([(x, x)], "affine", (3,), 8)
    with pytest.raises(ValueError, match="aligned"):
        fit_calibration([(x, x), (x, x[:4])], "affine", (3,), 8)
    with pytest.raises(ValueError, match="width"):
        fit_calibration([(x, x), (x, torch.randn(5, 8))], "affine", (3,), 8)
    with pytest.raises(ValueError, match="calibration kind"):
        fit_calibration([(x, x), (x, x)], "cubic", (3,), 8)


def embeds(n=10, d=D, layers=(3,), spans=((2, 6),)):
    return VLEmbeds(hidden={layer: torch.randn(1, n, d) for layer in layers}, image_spans=spans, prompt_span=(6, 10),
                    num_layers=8)


def identity_map(d=D, layers=(3,), scale=2.0):
    return VLCalibration(kind="affine", weight=torch.full((d,), scale), bias=torch.zeros(d), vl_layers=layers,
                         num_layers=8, text_layer="-2", lam=0.0)


def test_apply_maps_image_tokens_only_or_all():
    vl = embeds()
    out = apply_calibration(identity_map(), vl)
    assert torch.allclose(out.hidden[3][:, 2:6], 2 * vl.hidden[3][:, 2:6])
    assert torch.equal(out.hidden[3][:, :2], vl.hidden[3][:, :2]) and torch.equal(out.hidden[3][:, 6:],
                                                                                    vl.hidden[3][:, 6:])
    every = apply_calibration(identity_map(), vl, image_only=False)
    assert torch.allclose(every.hidden[3], 2 * vl.hidden[3])


def test_apply_refuses_a_map_for_another_width_or_layer():
    with pytest.raises(ValueError, match="width"):
        apply_calibration(identity_map(d=8), embeds())
    with pytest.raises(ValueError, match="layer"):
        apply_calibration(identity_map(layers=(4,)), embeds())
    with pytest.raises(ValueError, match="no image tokens"):
        apply_calibration(identity_map(), embeds(spans=()))


def test_the_shipped_prompt_list_is_long_and_varied():
    from pathlib import Path
    path = Path(__file__).resolve().parents[2] / "vl_core" / "data" / "calibration_prompts.txt"
    items = load_prompts(str(path))
    assert len(items) >= 200 and len(set(items)) == len(items)
    assert len({p.split()[0].lower() for p in items}) > 40          # not one template repeated
    assert SKIP_FIRST_TOKENS == 1
    assert map_metrics(torch.ones(2, 3), torch.ones(2, 3))["rel_error"] == 0


def test_a_map_fitted_on_a_layer_mix_maps_the_mix_and_refuses_another():
    from vl_core.calibrate import check_calibration_for
    from vl_core.layer_mix import select_layers
    g = torch.Generator().manual_seed(7)
    cal = VLCalibration(kind="linear", weight=torch.randn(D, D, generator=g), bias=torch.randn(D, generator=g),
                        vl_layers=(3, 5), num_layers=8, text_layer="-2", lam=0.0, vl_layer_weights={3: 0.3, 5: 0.7})
    vl = select_layers(embeds(layers=(3, 5)), [3, 5], {3: 3.0, 5: 7.0})
    out = apply_calibration(cal, vl, image_only=False)
    assert torch.allclose(out.tokens(), cal.map(vl.tokens()), atol=1e-5)     # map of each layer = map of the mix
    assert "VL layer(s) -6 ×0.30 + -4 ×0.70" in calibration_report(cal)
    with pytest.raises(ValueError, match=r"fitted at the layer mix -6 ×0.30 \+ -4 ×0.70 but vl_embeds mixes -6, -4"):
        check_calibration_for(cal, embeds(layers=(3, 5)))
    fitted = fit_calibration([(x, x) for x in prompts(10)], "affine", (3, 5), 8, vl_layer_weights={5: 0.7, 3: 0.3})
    assert fitted.vl_layer_weights == {3: 0.3, 5: 0.7}
