import pytest
import torch

from vl_core.references import REFERENCES_KEY, combine_references, reference_layout
from vl_core.types import VLEmbeds


def ref(n=10, d=16, seed=0, layers=(3,), spans=((2, 8),), scale=1.0, token_mode="full"):
    g = torch.Generator().manual_seed(seed)
    return VLEmbeds(hidden={layer: torch.randn(1, n, d, generator=g) * scale for layer in layers},
                    image_spans=spans, prompt_span=(8, 10), num_layers=8, token_mode=token_mode, source=f"r{seed}")


@pytest.mark.parametrize("mode", ["concat", "average", "norm_average"])
def test_one_reference_is_itself(mode):
    r = ref()
    out = combine_references([r], [1.0], mode)
    assert torch.equal(out.hidden[3], r.hidden[3])


@pytest.mark.parametrize("mode", ["average", "norm_average"])
def test_identical_references_average_to_themselves(mode):
    r = ref(layers=(3, 5))
    out = combine_references([r, r, r], [1.0, 2.0, 0.5], mode)
    for layer in (3, 5):
        assert torch.allclose(out.hidden[layer], r.hidden[layer], atol=1e-6)
    assert out.image_spans == r.image_spans          # same layout: token roles kept


@pytest.mark.parametrize("mode", ["concat", "average", "norm_average"])
def test_a_negative_with_weight_zero_changes_nothing(mode):
    a, b, neg = ref(seed=1), ref(seed=2, n=14), ref(seed=3, n=6)
    plain = combine_references([a, b], [1.0, 1.0], mode)
    pushed = combine_references([a, b], [1.0, 1.0], mode, negatives=[neg], negative_weight=0.0)
    assert torch.equal(plain.hidden[3], pushed.hidden[3])


def test_negatives_are_subtracted():
    a, neg = ref(seed=1), ref(seed=3)
    out = combine_references([a], [1.0], "average", negatives=[neg, neg], negative_weight=0.5)
    assert torch.allclose(out.hidden[3], a.hidden[3] - 0.5 * neg.hidden[3], atol=1e-6)


def test_weighted_average_after_pooling():
    a, b = ref(seed=1, n=8), ref(seed=2, n=8)
    out = combine_references([a, b], [3.0, 1.0], "average")
    assert torch.allclose(out.hidden[3], 0.75 * a.hidden[3] + 0.25 * b.hidden[3], atol=1e-6)
    c = ref(seed=3, n=16, spans=((0, 16),), token_mode="image")
    d = ref(seed=4, n=12, spans=((0, 12),), token_mode="image")
    pooled = combine_references([c, d], [1, 1], "average", num_tokens=4)
    assert pooled.num_tokens == 4 and pooled.image_spans == ((0, 4),)


def test_norm_average_gives_each_reference_an_equal_say():
    quiet, loud = ref(seed=1, n=8), ref(seed=1, n=8, scale=100.0)
    out = combine_references([quiet, loud], [1.0, 1.0], "norm_average")
    direction = torch.nn.functional.cosine_similarity(out.hidden[3].flatten(), quiet.hidden[3].flatten(), dim=0)
    assert direction > 0.9999   # the same pattern at two loudnesses averages to that pattern
    rms = float(out.hidden[3].square().mean().sqrt())
    assert rms == pytest.approx(50.5 * float(quiet.hidden[3].square().mean().sqrt()), rel=1e-4)


def test_concat_keeps_spans_and_weights():
    a, b = ref(seed=1, n=10, spans=((2, 8),)), ref(seed=2, n=6, spans=((1, 5),))
    out = combine_references([a, b], [1.0, 0.25], "concat")
    assert out.num_tokens == 16
    assert torch.equal(out.hidden[3][:, :10], a.hidden[3]) and torch.equal(out.hidden[3][:, 10:], b.hidden[3])
    assert out.image_spans == ((2, 8), (11, 15))
    assert out.extra[REFERENCES_KEY] == {"spans": [[0, 10], [10, 16]], "weights": [1.0, 0.25]}
    assert reference_layout(out) == [((0, 10), 1.0), ((10, 16), 0.25)]
    assert reference_layout(a) == [((0, 10), 1.0)]
    import json
    json.dumps(out.metadata())                       # saved like any VLEmbeds


def test_bad_references_are_refused():
    with pytest.raises(ValueError, match="at least one"):
        combine_references([], [], "average")
    with pytest.raises(ValueError, match="width"):
        combine_references([ref(), ref(d=24)], [1, 1], "average")
    with pytest.raises(ValueError, match="layers"):
        combine_references([ref(), ref(layers=(4,))], [1, 1], "average")
    with pytest.raises(ValueError, match="negative #1 holds layers"):
        combine_references([ref()], [1], "average", negatives=[ref(layers=(4,))])
    with pytest.raises(ValueError, match="one weight per reference"):
        combine_references([ref(), ref()], [1], "average")
    with pytest.raises(ValueError, match=">= 0"):
        combine_references([ref(), ref()], [1, -1], "average")
    with pytest.raises(ValueError, match="combine mode"):
        combine_references([ref()], [1], "sum")


def _mixed(r, weights):
    from vl_core.layer_mix import select_layers
    return select_layers(r, sorted(weights), weights)


@pytest.mark.parametrize("mode", ["concat", "average", "norm_average"])
def test_references_mixed_with_other_layer_weights_are_refused(mode):
    a, b = ref(seed=1, layers=(3, 5)), ref(seed=2, layers=(3, 5))
    with pytest.raises(ValueError, match=r"reference #2 mixes its layers as -6 ×0.80 \+ -4 ×0.20 but reference #1 "
                                         r"as -6 ×0.50 \+ -4 ×0.50"):
        combine_references([_mixed(a, {3: 0.5, 5: 0.5}), _mixed(b, {3: 0.8, 5: 0.2})], [1, 1], mode)
    with pytest.raises(ValueError, match="negative #1 mixes its layers"):
        combine_references([a], [1], mode, negatives=[_mixed(b, {3: 0.8, 5: 0.2})])
    # the same mix (an explicit equal weighting = none) combines, and the result reads that mix
    out = combine_references([_mixed(a, {3: 1.0, 5: 3.0}), _mixed(b, {3: 0.25, 5: 0.75})], [1, 1], mode)
    assert out.stored_layer_weights() == pytest.approx({3: 0.25, 5: 0.75})
    combine_references([a, _mixed(b, {3: 1.0, 5: 1.0})], [1, 1], mode)
