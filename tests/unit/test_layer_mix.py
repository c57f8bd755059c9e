"""Weighted layer mixes: the spec syntax, the stored mix every consumer reads, selection, save/load."""
import pytest
import torch

from vl_core.extract import parse_layers
from vl_core.layer_mix import layer_mix_label, parse_layer_spec, select_layers
from vl_core.types import VLEmbeds

NUM_LAYERS = 36


def embeds(layers=(31, 22, 17)) -> VLEmbeds:
    g = torch.Generator().manual_seed(0)
    return VLEmbeds(hidden={layer: torch.randn(1, 5, 8, generator=g) for layer in layers}, image_spans=((0, 3),),
                    prompt_span=(3, 5), num_layers=NUM_LAYERS)


@pytest.mark.parametrize("spec", ["-6", "-6,-2", "-2;-6", " -6 , 31 ", "3"])
def test_the_old_syntax_parses_exactly_as_before_and_carries_no_weights(spec):
    assert parse_layer_spec(spec, NUM_LAYERS) == (parse_layers(spec, NUM_LAYERS), None)


def test_weights_are_resolved_and_normalised():
    layers, weights = parse_layer_spec("-6:0.7, -15:0.3", NUM_LAYERS)
    assert layers == [22, 31] and weights == pytest.approx({31: 0.7, 22: 0.3})
    _, weights = parse_layer_spec("-6:2; -15:6", NUM_LAYERS)
    assert weights == pytest.approx({31: 0.25, 22: 0.75})


@pytest.mark.parametrize("spec,needle", [
    ("-6:0.7, -15", "a weight to every layer or to none"),
    ("-6:x", "is not 'layer:weight'"),
    ("a:1", "is not 'layer:weight'"),
    ("-6:0", "must be a finite number > 0"),
    ("-6:-1, -2:1", "must be a finite number > 0"),
    ("-6:nan", "must be a finite number > 0"),
    ("-6:1, 31:1", "listed twice"),
    ("-99:1", "out of range"),
])
def test_bad_weighted_specs_are_refused_saying_what_to_write(spec, needle):
    with pytest.raises(ValueError, match=None) as ei:
        parse_layer_spec(spec, NUM_LAYERS)
    assert needle in str(ei.value)


def test_a_weighted_selection_is_what_every_consumer_reads_from_tokens():
    vl = embeds()
    out = select_layers(vl, *parse_layer_spec("-6:0.7, -15:0.3", NUM_LAYERS))
    assert out.layers == [22, 31]
    assert torch.allclose(out.tokens(), 0.7 * vl.hidden[31] + 0.3 * vl.hidden[22], atol=1e-6)
    assert layer_mix_label(out) == "-15 ×0.30 + -6 ×0.70"
    # an unweighted re-selection mixes equally again (the stored weights are dropped), one layer is itself
    again = select_layers(out, *parse_layer_spec("-6,-15", NUM_LAYERS))
    assert torch.allclose(again.tokens(), (vl.hidden[31] + vl.hidden[22]) / 2, atol=1e-6)
    assert torch.equal(select_layers(out, *parse_layer_spec("-15", NUM_LAYERS)).tokens(), vl.hidden[22])
    assert torch.equal(select_layers(vl, *parse_layer_spec("-6:5", NUM_LAYERS)).tokens(), vl.hidden[31])


def test_selecting_a_layer_that_was_not_encoded_is_refused_naming_the_stored_layers():
    with pytest.raises(ValueError, match=r"layer\(s\) -10 \(#27\) are not in vl_embeds, which holds -20"):
        select_layers(embeds(), *parse_layer_spec("-10:1, -6:1", NUM_LAYERS))


def test_a_weighted_mix_survives_save_and_load_and_broken_weights_are_refused(tmp_path):
    import json

    from safetensors.torch import load_file, save_file

    out = select_layers(embeds(), *parse_layer_spec("-6:0.7, -15:0.3", NUM_LAYERS))
    path = str(tmp_path / "e.safetensors")
    out.to_safetensors(path)
    back = VLEmbeds.from_safetensors(path)
    assert back.stored_layer_weights() == out.stored_layer_weights()
    assert torch.equal(back.tokens(), out.tokens())
    meta = out.metadata()
    for bad in ({"31": 0.7}, {"31": 0.7, "22": -0.3}, {"31": 0.7, "22": "x"}, [0.7, 0.3]):
        meta["extra"]["layer_weights"] = bad
        save_file(load_file(path), str(tmp_path / "bad.safetensors"), metadata={"vl_embeds": json.dumps(meta)})
        with pytest.raises(ValueError, match="field 'extra.layer_weights'"):
            VLEmbeds.from_safetensors(str(tmp_path / "bad.safetensors"))


def test_an_explicit_equal_weighting_is_the_same_mix_as_none_and_other_weights_are_not():
    from vl_core.layer_mix import apply_mix, require_same_mix, same_mix

    assert same_mix([22, 31], None, [22, 31], {22: 2.0, 31: 2.0})
    assert not same_mix([22, 31], None, [22, 31], {22: 0.3, 31: 0.7})
    assert not same_mix([22, 31], None, [22], None)
    vl = embeds((31, 22))
    weighted = apply_mix(vl, *parse_layer_spec("-6:0.7, -15:0.3", NUM_LAYERS))
    assert apply_mix(vl, *parse_layer_spec("-6,-15", NUM_LAYERS)) is vl            # unweighted: unchanged
    require_same_mix("a", weighted, "b", select_layers(vl, [22, 31], {22: 3.0, 31: 7.0}), what="both")
    with pytest.raises(ValueError, match=r"a mixes its layers as -15 ×0.30 \+ -6 ×0.70 but b as -15, -6: both "
                                         "must use the same layer weights"):
        require_same_mix("a", weighted, "b", vl, what="both")
