import pytest
import torch

from vl_core.steer import (VLDirection, apply_directions, combine_directions, direction_report,
                           steering_direction, token_rms)
from vl_core.types import VLEmbeds


def embeds(x: torch.Tensor, layers=(3,), num_layers=8, spans=()) -> VLEmbeds:
    return VLEmbeds(hidden={layer: x[None].clone() for layer in layers}, image_spans=spans, prompt_span=(0, 0),
                    num_layers=num_layers)


def planted_sets(direction, pairs=12, n=20, noise=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    d = direction.shape[-1]
    pos, neg = [], []
    for _ in range(pairs):
        base = torch.randn(n, d, generator=g)
        amount = 1.0 + torch.rand(1, generator=g)           # every pair moves along the direction, by 1..2
        pos.append(embeds(base + amount * direction + noise * torch.randn(n, d, generator=g)))
        neg.append(embeds(base + noise * torch.randn(n, d, generator=g)))
    return pos, neg


def unit(d, seed):
    v = torch.randn(d, generator=torch.Generator().manual_seed(seed))
    return v / v.norm()


@pytest.mark.parametrize("method", ["mean_diff", "pca"])
def test_a_planted_direction_is_recovered_and_a_random_one_is_not(method):
    planted, other = unit(64, 1) * 3.0, unit(64, 2)
    pos, neg = planted_sets(planted)
    got = steering_direction(pos, neg, method)
    v = got.vector[0]
    assert got.vector.shape == (1, 64)
    assert torch.nn.functional.cosine_similarity(v, planted, dim=0) > 0.99
    assert abs(torch.nn.functional.cosine_similarity(v, other, dim=0)) < 0.3
    assert v.norm() == pytest.approx(1.0, abs=1e-5)
    assert got.scale > 1.0 and got.pairs == 12 and got.layers == (3,)
    assert got.explained_variance > 0.5 and min(got.agreement) > 0.5


def test_without_a_planted_direction_pairs_disagree():
    g = torch.Generator().manual_seed(5)
    pos = [embeds(torch.randn(20, 64, generator=g)) for _ in range(8)]
    neg = [embeds(torch.randn(20, 64, generator=g)) for _ in range(8)]
    got = steering_direction(pos, neg, "pca")
    assert got.explained_variance < 0.5
    assert "disagree" in direction_report(got)


def test_per_token_directions_keep_positions():
    d = 32
    rows = torch.stack([unit(d, 10), unit(d, 11)]) * 2
    g = torch.Generator().manual_seed(0)
    pos, neg = [], []
    for _ in range(6):
        base = torch.randn(8, d, generator=g)
        pos.append(embeds(base + rows.repeat_interleave(4, 0)))
        neg.append(embeds(base))
    got = steering_direction(pos, neg, "mean_diff", num_tokens=2)
    assert got.vector.shape == (2, d)
    for k in range(2):
        assert torch.nn.functional.cosine_similarity(got.vector[k], rows[k], dim=0) > 0.999


@pytest.mark.parametrize("pos_n, neg_n, match", [(2, 3, "same number"), (0, 0, "at least one"), (2, 0, "both sets")])
def test_bad_set_sizes_are_refused(pos_n, neg_n, match):
    x = torch.randn(5, 16)
    with pytest.raises(ValueError, match=match):
        steering_direction([embeds(x)] * pos_n, [embeds(x + 1)] * neg_n)


def test_sets_of_different_width_or_layers_are_refused():
    with pytest.raises(ValueError, match="width"):
        steering_direction([embeds(torch.randn(5, 16))], [embeds(torch.randn(5, 24))])
    with pytest.raises(ValueError, match="layers"):
        steering_direction([embeds(torch.randn(5, 16))], [embeds(torch.randn(5, 16), layers=(4,))])
    with pytest.raises(ValueError, match="identically"):
        x = embeds(torch.randn(5, 16))
        steering_direction([x], [x])
    from vl_core.layer_mix import select_layers
    two = [embeds(torch.randn(5, 16), layers=(3, 5)) for _ in range(2)]
    with pytest.raises(ValueError, match=r"negative #1 mixes its layers as -6 ×0.90 \+ -4 ×0.10 but positive #1 as "
                                         "-6, -4: both sets must use the same layer weights"):
        steering_direction([two[0]], [select_layers(two[1], [3, 5], {3: 0.9, 5: 0.1})])


def test_a_weighted_direction_is_the_direction_of_the_mix_and_records_it():
    from vl_core.layer_mix import select_layers
    planted = unit(32, 4) * 2.0
    g = torch.Generator().manual_seed(5)
    pos, neg = [], []
    for _ in range(6):    # the difference lives in layer 3 only: a 0.25 share of it in the mix
        base = torch.randn(6, 32, generator=g)
        pos.append(select_layers(VLEmbeds(hidden={3: (base + planted)[None], 5: base[None].clone()},
                                          image_spans=(), prompt_span=(0, 0), num_layers=8), [3, 5], {3: 1, 5: 3}))
        neg.append(select_layers(VLEmbeds(hidden={3: base[None].clone(), 5: base[None].clone()}, image_spans=(),
                                          prompt_span=(0, 0), num_layers=8), [3, 5], {3: 1, 5: 3}))
    got = steering_direction(pos, neg)
    assert got.layer_weights == pytest.approx({3: 0.25, 5: 0.75})
    assert got.scale == pytest.approx(0.25 * 2.0, rel=1e-4)
    assert "layers -6 ×0.25 + -4 ×0.75" in direction_report(got)


def direction(v, layers=(3,), layer_weights=None):
    v = v.reshape(1, -1) if v.ndim == 1 else v
    return VLDirection(vector=v / v.square().sum(-1).mean().sqrt(), scale=1.0, layers=layers, num_layers=8,
                       method="mean_diff", pairs=1, layer_weights=layer_weights)


def test_apply_adds_relative_to_each_tokens_rms():
    cond = torch.randn(2, 7, 32) * torch.linspace(0.5, 10, 7)[None, :, None]
    d = direction(unit(32, 3))
    out = apply_directions(cond, [(d, 0.5)])
    step = out - cond
    assert torch.allclose(token_rms(step), 0.5 * token_rms(cond), rtol=1e-3)
    assert torch.allclose(torch.nn.functional.cosine_similarity(step, d.vector[0].expand_as(step), dim=-1),
                          torch.ones(2, 7), atol=1e-5)
    assert torch.equal(apply_directions(cond, [(d, 0.0)]), cond)
    both = apply_directions(cond, [(d, 0.25), (d, 0.25)])
    assert torch.allclose(both, out, atol=1e-5)


def test_apply_refuses_a_direction_for_another_width():
    with pytest.raises(ValueError, match="width 16 does not match conditioning width 32"):
        apply_directions(torch.randn(1, 4, 32), [(direction(unit(16, 0)), 1.0)])


def test_combine_weighted_sum_and_gram_schmidt():
    a, b = unit(32, 1), unit(32, 2)
    b_close = (a + 0.5 * b) / (a + 0.5 * b).norm()
    da, db = direction(a), direction(b_close)
    same, _ = combine_directions([da], [1.0])
    assert torch.allclose(same.vector, da.vector, atol=1e-6)
    ortho, report = combine_directions([da, db], [0.0, 1.0], orthogonalize=True)
    assert abs(float(ortho.vector[0] @ a)) < 1e-5
    assert "pairwise cosine" in report and "explained variance" in report
    summed, _ = combine_directions([da, db], [1.0, 1.0])
    expect = a + b_close
    assert torch.nn.functional.cosine_similarity(summed.vector[0], expect, dim=0) > 0.9999


def test_combine_refuses_mismatches():
    with pytest.raises(ValueError, match="layers"):
        combine_directions([direction(unit(8, 0)), direction(unit(8, 1), layers=(4,))], [1, 1])
    with pytest.raises(ValueError, match=r"direction #2 is for layers -6 ×0.20 \+ -4 ×0.80 with 1 token\(s\) but #1 "
                                         "is for layers -6, -4"):
        combine_directions([direction(unit(8, 0), layers=(3, 5)),
                            direction(unit(8, 1), layers=(3, 5), layer_weights={3: 0.2, 5: 0.8})], [1, 1])
    same, _ = combine_directions([direction(unit(8, 0), layers=(3, 5)),
                                  direction(unit(8, 1), layers=(3, 5), layer_weights={3: 0.5, 5: 0.5})], [1, 1])
    assert same.layers == (3, 5)
    with pytest.raises(ValueError, match="2 weights for 1"):
        combine_directions([direction(unit(8, 0))], [1, 1])
    with pytest.raises(ValueError, match="cancel"):
        d = direction(unit(8, 0))
        combine_directions([d, d], [1, -1])
    with pytest.raises(ValueError, match="at least one"):
        combine_directions([], [])
