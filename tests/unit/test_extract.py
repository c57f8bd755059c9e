import pytest
import torch

from vl_core import extract
from vl_core.types import VLEmbeds


def make_embeds(n=12, d=8, image=(3, 9), prompt=(9, 11), layers=(31, 35), num_layers=36):
    g = torch.Generator().manual_seed(0)
    hidden = {layer: torch.randn(1, n, d, generator=g) for layer in layers}
    return VLEmbeds(hidden=hidden, image_spans=(image,), prompt_span=prompt, num_layers=num_layers)


def test_find_runs_one_span_per_image():
    ids = [1, 2, 7, 7, 7, 3, 7, 7, 4]
    assert extract.find_runs(ids, 7) == [(2, 5), (6, 8)]
    assert extract.find_runs(torch.tensor(ids), 99) == []
    assert extract.find_runs([7, 7], 7) == [(0, 2)]


@pytest.mark.parametrize("layer,expected", [(-1, 36), (-2, 35), (-6, 31), (0, 0), (36, 36), (-37, 0)])
def test_resolve_layer_follows_hf_hidden_states_numbering(layer, expected):
    assert extract.resolve_layer(layer, 36) == expected
    states = list(range(37))  # hidden_states has num_layers + 1 entries
    assert states[layer] == expected


@pytest.mark.parametrize("layer", [37, -38, 100])
def test_resolve_layer_out_of_range_names_the_valid_range(layer):
    with pytest.raises(ValueError, match=r"out of range.*-37\.\.-1 or 0\.\.36"):
        extract.resolve_layer(layer, 36)


def test_parse_layers_accepts_lists_and_strings():
    assert extract.parse_layers("-6", 36) == [31]
    assert extract.parse_layers(" -2, -6 ,-6", 36) == [31, 35]
    assert extract.parse_layers([0, -1], 36) == [0, 36]
    for bad in ("", "six", "-6;x"):
        with pytest.raises(ValueError, match="layers"):
            extract.parse_layers(bad, 36)


def test_chat_pieces_place_prompt_after_or_before_the_image():
    before, prompt, after = extract.chat_pieces("a cat", 1, "after_image")
    assert before.endswith(extract.VISION_BLOCK) and prompt == "a cat"
    assert before + prompt + after == ("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>a cat"
                                       "<|im_end|>\n<|im_start|>assistant\n")
    before, _, after = extract.chat_pieces("a cat", 2, "before_image")
    assert extract.VISION_BLOCK not in before and after.count(extract.IMAGE_PAD) == 2
    with pytest.raises(ValueError, match="placement"):
        extract.chat_pieces("a", 1, "middle")


def test_select_tokens_image_and_text_partition_the_sequence():
    vl = make_embeds()
    image = extract.select_tokens(vl, "image")
    text = extract.select_tokens(vl, "text")
    assert image.num_tokens == 6 and text.num_tokens == 6
    assert image.image_spans == ((0, 6),) and text.image_spans == ()
    assert text.prompt_span == (3, 5)  # prompt tokens 9..11 follow the 3 template tokens kept before the image
    for layer in vl.layers:
        assert torch.equal(image.hidden[layer][0], vl.hidden[layer][0, 3:9])
        assert torch.equal(text.hidden[layer][0], torch.cat([vl.hidden[layer][0, :3], vl.hidden[layer][0, 9:]]))
    assert extract.select_tokens(vl, "full") is vl
    with pytest.raises(ValueError, match="token mode"):
        extract.select_tokens(vl, "pixels")


def test_select_tokens_refuses_to_keep_nothing():
    vl = make_embeds(image=(0, 12), prompt=(12, 12))
    with pytest.raises(ValueError, match="keeps no tokens"):
        extract.select_tokens(vl, "text")


def test_layer_mix_is_weighted_mean_and_checks_layers():
    vl = make_embeds()
    mixed = vl.tokens({31: 3.0, 35: 1.0})
    assert torch.allclose(mixed, (3 * vl.hidden[31] + vl.hidden[35]) / 4)
    assert torch.allclose(vl.tokens(), (vl.hidden[31] + vl.hidden[35]) / 2)
    with pytest.raises(ValueError, match="not encoded"):
        vl.tokens({2: 1.0})


def test_token_accounting_counts_roles():
    lines = extract.token_accounting(make_embeds())
    text = "\n".join(lines)
    assert "tokens: 12" in text and "image: 6" in text and "prompt: 2" in text and "template/other: 4" in text
    assert "-6 (#31)" in text and "-2 (#35)" in text


def test_build_embeds_finds_image_spans_from_ids():
    ids = torch.tensor([5, 6, 9, 9, 9, 9, 7, 8])
    states = [torch.full((1, 8, 4), float(i)) for i in range(5)]
    vl = extract.build_embeds(states, ids, 9, (6, 7), [1, 3], 4, source="x")
    assert vl.image_spans == ((2, 6),) and vl.layers == [1, 3] and torch.equal(vl.hidden[3], states[3])


def test_require_finite_states_names_the_image_and_the_likely_cause():
    good = make_embeds()
    assert extract.require_finite_states(good, "image") is good
    bad = make_embeds()
    bad.hidden[31][0, 4, 2] = float("nan")
    bad.hidden[35][0, 4] = float("inf")
    image = torch.full((64, 64, 3), 1e30)
    with pytest.raises(ValueError, match=r"input 'image', image 2 \(its pixels span 1e\+30\.\.1e\+30\): the Qwen3-VL "
                                         r"forward gave 9 NaN/Inf hidden-state values.*outside \[0, 1\].*produced the image"):
        extract.require_finite_states(bad, "image", 2, image)
    with pytest.raises(ValueError, match=r"^input 'reference', image 0: .*gave 9 NaN/Inf.*pixel values outside \[0, 1\]"):
        extract.require_finite_states(bad, "reference")


def test_choice_errors_list_the_valid_values():
    with pytest.raises(ValueError, match="unknown prompt placement 'middle': expected one of 'after_image', "
                                         "'before_image'"):
        extract.chat_pieces("p", 1, "middle")
    with pytest.raises(ValueError, match="unknown token mode 'all'"):
        extract.select_tokens(make_embeds(), "all")
