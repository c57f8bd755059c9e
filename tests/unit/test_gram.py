import pytest
import torch

from vl_core.gram import GramSettings, gram, gram_loss, gram_match, gram_report


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_gram_is_the_token_second_moment_after_rms_normalisation():
    x = rand(2, 9, 6)
    scaled = x * torch.linspace(0.1, 30, 9)[None, :, None]       # per-token scale is normalised away
    assert torch.allclose(gram(x), gram(scaled), atol=1e-3)
    xhat = x / x.square().mean(-1, keepdim=True).sqrt()
    assert torch.allclose(gram(x)[0], xhat[0].T @ xhat[0] / 9, atol=1e-5)
    assert torch.allclose(torch.diagonal(gram(x), dim1=1, dim2=2).sum(-1), torch.full((2,), 6.0), atol=1e-4)


def test_gram_loss_decreases_and_is_deterministic():
    text, vl = rand(1, 12, 16, seed=1), rand(1, 40, 16, seed=2) * torch.linspace(0.2, 3, 16)
    s = GramSettings(steps=60, lr=0.05, content_weight=0.1, seed=3, init_noise=0.01, patience=100)
    calls = []
    a = gram_match(text, vl, s, progress=lambda i, n, loss: calls.append((i, n, loss)))
    b = gram_match(text, vl, s)
    assert torch.equal(a.conditioning, b.conditioning) and a.losses == b.losses
    assert a.losses[-1] < 0.5 * a.losses[0]
    assert len(calls) == 60 and calls[0][:2] == (0, 60) and calls[0][2] == a.losses[0]
    target = gram(vl)
    assert gram_loss(a.conditioning, text, target, 1.0, 0.1) < gram_loss(text, text, target, 1.0, 0.1)
    assert a.conditioning.shape == text.shape and a.conditioning.dtype == text.dtype
    assert "Adam steps" in gram_report(a, s)


def test_content_only_stays_at_the_text_and_stops_on_the_plateau():
    text, vl = rand(1, 5, 8, seed=1), rand(1, 7, 8, seed=2)
    out = gram_match(text, vl, GramSettings(steps=500, style_weight=0.0, content_weight=1.0, patience=5))
    assert torch.equal(out.conditioning, text)
    assert out.stopped_early and out.steps_run < 10


def test_bad_settings_and_inputs_are_refused():
    with pytest.raises(ValueError, match="steps"):
        GramSettings(steps=0)
    with pytest.raises(ValueError, match="lr"):
        GramSettings(lr=-1.0)
    with pytest.raises(ValueError, match="width"):
        gram_match(rand(1, 4, 8), rand(1, 4, 16))
    with pytest.raises(ValueError, match="batch"):
        gram_match(rand(2, 4, 8), rand(3, 4, 8))


def test_runs_under_the_hosts_inference_mode():
    text, vl = rand(1, 6, 8, seed=1), rand(1, 9, 8, seed=2)
    with torch.inference_mode():
        out = gram_match(text, vl, GramSettings(steps=5, patience=50))
    assert out.losses[-1] < out.losses[0]
