"""The recipes' own contract (their numbers are pinned by test_embedding_golden.py)."""
import pytest
import torch

from vl_core import blend, normalize, pooling, techniques


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_tables_are_the_nodes_options_in_order():
    assert tuple(techniques.BLEND_MODES) == ("linear", "slerp", "graduated")
    assert tuple(techniques.BLEND_LENGTHS) == ("pool", "attention_pool", "truncate", "concat")
    assert tuple(techniques.ADAIN_STYLE_TOKENS) == blend.ADAIN_MODES == ("per_token", "per_dim")
    assert normalize.NORMALIZE_METHODS == ("none", "global", "per_dim", "hybrid")
    assert {m.ramp for m in techniques.BLEND_MODES.values()} <= set(blend.RAMP_SHAPES)
    assert {m.mix for m in techniques.BLEND_MODES.values()} <= set(blend.BLEND_MODES)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_recipes_keep_the_text_dtype_and_shape(dtype):
    text, vl = rand(2, 5, 8).to(dtype), rand(1, 11, 8, seed=1)
    assert techniques.embedding_blend(text, vl, 0.5, "slerp", "attention_pool", "hybrid", 0).shape == (2, 5, 8)
    out = techniques.embedding_blend(text, vl, 0.5, "linear", "concat", "global", 4)
    assert out.dtype == dtype and out.shape == (2, 5 + 2, 8) and torch.equal(out[:, :5], text)
    assert techniques.embedding_style_delta(text, vl, rand(1, 11, 8, seed=2), 0.3, True, "pool").dtype == dtype
    assert techniques.embedding_adain(text, vl, "per_dim", 0.5, "pool").dtype == dtype


def test_graduated_takes_more_vl_towards_the_end_and_linear_is_constant():
    text, vl = torch.zeros(1, 4, 3), torch.ones(1, 4, 3)
    graduated = techniques.embedding_blend(text, vl, 0.8, "graduated", "truncate", "none", 0)
    assert torch.allclose(graduated[0, :, 0], torch.tensor([0.2, 0.4, 0.6, 0.8]))
    linear = techniques.embedding_blend(text, vl, 0.8, "linear", "truncate", "none", 0)
    assert torch.allclose(linear, torch.full_like(linear, 0.8))


def test_concat_appends_alpha_share_of_the_budget_or_nothing():
    text, vl = rand(1, 3, 4), rand(1, 20, 4, seed=1)
    assert techniques.embedding_blend(text, vl, 0.5, "linear", "concat", "none", 0).shape[1] == 3 + 10
    assert techniques.embedding_blend(text, vl, 0.5, "linear", "concat", "none", 6).shape[1] == 3 + 3
    assert techniques.embedding_blend(text, vl, 0.01, "linear", "concat", "none", 6) is text
    assert torch.equal(techniques.embedding_blend(text, vl, 1.0, "slerp", "concat", "none", 0)[:, 3:], vl)


def test_per_token_adain_matches_the_style_length_and_per_dim_takes_any_count():
    text, vl = rand(1, 6, 8), rand(1, 23, 8, seed=1)
    want = blend.adain(text, pooling.match_length(vl, 6, "truncate"), "per_token", 1.0)
    assert torch.equal(techniques.embedding_adain(text, vl, "per_token", 1.0, "truncate"), want)
    assert torch.equal(techniques.embedding_adain(text, vl, "per_dim", 1.0, "truncate"),
                       blend.adain(text, vl, "per_dim", 1.0))


@pytest.mark.parametrize("call, message", [
    (lambda t, v: techniques.embedding_blend(t, v, 0.3, "cubic", "pool", "none", 0),
     r"unknown mode 'cubic': expected one of 'linear', 'slerp', 'graduated'"),
    (lambda t, v: techniques.embedding_blend(t, v, 0.3, "linear", "squeeze", "none", 0),
     r"unknown length 'squeeze': expected one of 'pool', 'attention_pool', 'truncate', 'concat'"),
    (lambda t, v: techniques.embedding_blend(t, v, 0.3, "linear", "pool", "loud", 0),
     r"unknown normalize method 'loud'"),
    (lambda t, v: techniques.embedding_adain(t, v, "per_pixel", 0.5, "pool"), r"unknown adain mode 'per_pixel'"),
    (lambda t, v: techniques.embedding_style_delta(t, v, v, 0.3, True, "concat"), r"unknown length method 'concat'"),
])
def test_bad_choices_name_the_input_and_the_options(call, message):
    with pytest.raises(ValueError, match=message):
        call(rand(1, 4, 8), rand(1, 9, 8, seed=1))
