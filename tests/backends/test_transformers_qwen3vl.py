"""TransformersQwen3VL on a tiny random Qwen3-VL (no ComfyUI needed)."""
from __future__ import annotations

import json
import os

import pytest
import torch

from vl_core import extract, preprocess
from vl_core.encoders.transformers_qwen3vl import TransformersQwen3VL, check_qwen3vl_folder, tokenize_chat
from vl_core.types import VLEmbeds

PROMPT = "a red cat on a blue sofa"


def picture(h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(h, w, 3, generator=torch.Generator().manual_seed(seed))


def full_forward(enc: TransformersQwen3VL, images, prompt: str, placement: str):
    """Reference: the complete HF forward (logits included) with output_hidden_states=True."""
    grids = [preprocess.to_patches(im)[1] for im in images]
    pixel_values = torch.cat([preprocess.to_patches(im)[0] for im in images])
    counts = [int(g.prod()) // 4 for g in grids]
    ids, span = enc.tokenize(prompt, len(images), placement, counts)
    with torch.inference_mode():
        out = enc.model(input_ids=ids[None], pixel_values=pixel_values, image_grid_thw=torch.cat(grids),
                        mm_token_type_ids=(ids == enc.image_pad_id)[None].int(), output_hidden_states=True,
                        use_cache=False)
    return out.hidden_states, ids, span


@pytest.fixture(scope="module")
def reference(hf_encoder):
    images = [picture(64, 96)]
    return {placement: full_forward(hf_encoder, images, PROMPT, placement) for placement in extract.PLACEMENTS}


@pytest.mark.parametrize("placement", extract.PLACEMENTS)
@pytest.mark.parametrize("spec", [[0], [1], [2], [-1], [-2], [0, -2, -1], [1, 3], [0, 1, 2, 3, 4]])
def test_truncated_forward_is_bit_exact(hf_encoder, reference, placement, spec):
    hidden_ref, _, _ = reference[placement]
    assert len(hidden_ref) == hf_encoder.num_layers + 1
    layers = extract.parse_layers(spec, hf_encoder.num_layers)
    embeds = hf_encoder.encode([picture(64, 96)], PROMPT, layers, placement)
    assert embeds.layers == layers
    for layer in layers:
        assert torch.equal(embeds.hidden[layer], hidden_ref[layer].float()), f"layer {layer}"


def test_forward_stops_at_deepest_layer_and_never_computes_logits(hf_encoder):
    lm = hf_encoder.language_model
    hook_counts = [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in lm.layers]
    calls: list[str] = []
    handles = [layer.register_forward_hook(lambda m, a, o, i=i: calls.append(f"layer{i}"))
               for i, layer in enumerate(lm.layers)]
    handles.append(lm.norm.register_forward_hook(lambda m, a, o: calls.append("norm")))
    handles.append(hf_encoder.model.lm_head.register_forward_hook(lambda m, a, o: calls.append("lm_head")))
    try:
        for layers, expected in [([0], []), ([1], ["layer0"]), ([0, 2], ["layer0", "layer1"]),
                                 ([3], ["layer0", "layer1", "layer2"]),
                                 ([4], ["layer0", "layer1", "layer2", "layer3", "norm"])]:
            calls.clear()
            hf_encoder.encode([picture(64, 64)], PROMPT, layers, "after_image")
            assert calls == expected, layers
    finally:
        for h in handles:
            h.remove()
    assert [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in lm.layers] == hook_counts


def test_image_spans_have_one_pad_id_per_token(hf_encoder):
    images = [picture(64, 96, 1), picture(32, 64, 2), picture(96, 32, 3)]
    embeds = hf_encoder.encode(images, PROMPT, [2], "after_image")
    pad = hf_encoder.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert pad == hf_encoder.model.config.image_token_id
    expected = [(h // 16) * (w // 16) // 4 for h, w in [(64, 96), (32, 64), (96, 32)]]
    assert [e - s for s, e in embeds.image_spans] == expected == [6, 2, 3]
    assert embeds.image_sizes == ((64, 96), (32, 64), (96, 32))
    _, ids, _ = full_forward(hf_encoder, images, PROMPT, "after_image")
    assert len(ids) == embeds.num_tokens
    assert int((ids == pad).sum()) == sum(expected)
    for s, e in embeds.image_spans:
        assert bool((ids[s:e] == pad).all())
        assert ids[s - 1] == hf_encoder.tokenizer.convert_tokens_to_ids("<|vision_start|>")
        assert ids[e] == hf_encoder.tokenizer.convert_tokens_to_ids("<|vision_end|>")


@pytest.mark.parametrize("placement", extract.PLACEMENTS)
@pytest.mark.parametrize("prompt", [PROMPT, " leading space", "Ünïcödé — 漢字 ok", "x", "two\nlines"])
def test_prompt_span_decodes_to_prompt(hf_encoder, placement, prompt):
    embeds = hf_encoder.encode([picture(64, 64)], prompt, [1], placement)
    _, ids, span = full_forward(hf_encoder, [picture(64, 64)], prompt, placement)
    assert embeds.prompt_span == span
    s, e = span
    assert hf_encoder.tokenizer.decode(ids[s:e]) == prompt
    # tokenizing the pieces separately gives the same span (special tokens bound the pieces)
    before, text, after = extract.chat_pieces(prompt, 1, placement)
    tok = lambda x: hf_encoder.tokenizer(x, add_special_tokens=False)["input_ids"]  # noqa: E731
    n_img = embeds.num_image_tokens - 1
    shift = n_img if placement == "after_image" else 0
    assert (len(tok(before)) + shift, len(tok(before)) + len(tok(text)) + shift) == span
    assert len(tok(before)) + len(tok(text)) + len(tok(after)) + n_img == embeds.num_tokens


def test_prompt_starting_with_newline_before_image(hf_encoder):
    """Edge case that piecewise tokenization gets wrong: after "user\\n" a prompt starting with "\\n" merges
    into one "\\n\\n" token (real vocabulary); the whole-text span includes that token."""
    prompt = "\nA cat"
    pieces = extract.chat_pieces(prompt, 1, "before_image")
    ids, (s, e) = tokenize_chat(hf_encoder.tokenizer, *pieces)
    assert prompt in hf_encoder.tokenizer.decode(ids[s:e])
    tok = lambda x: hf_encoder.tokenizer(x, add_special_tokens=False)["input_ids"]  # noqa: E731
    if len(tok("\n\n")) == 1:   # real vocabulary (the synthetic stand-in has no merges)
        assert len(ids) == sum(len(tok(p)) for p in pieces) - 1
    embeds = hf_encoder.encode([picture(64, 64)], prompt, [1], "before_image")
    assert embeds.prompt_span == (s, e)


def test_placement_and_causality(hf_encoder):
    """after_image: image tokens precede the prompt, so their states cannot depend on it; before_image: they can."""
    img = picture(64, 96)
    layers = list(range(hf_encoder.num_layers + 1))
    for placement, same in [("after_image", True), ("before_image", False)]:
        a = hf_encoder.encode([img], "a red cat", layers, placement)
        b = hf_encoder.encode([img], "a completely different prompt, longer", layers, placement)
        (sa, ea), (sb, eb) = a.image_spans[0], b.image_spans[0]
        assert ea - sa == eb - sb == 6
        for layer in layers:
            equal = torch.equal(a.hidden[layer][:, sa:ea], b.hidden[layer][:, sb:eb])
            if layer == 0:   # embeddings: the vision features alone
                assert equal
            else:
                assert equal == same, (placement, layer)
    after = hf_encoder.encode([img], "a red cat", [0], "after_image")
    before = hf_encoder.encode([img], "a red cat", [0], "before_image")
    assert after.image_spans[0][0] < after.prompt_span[0]
    assert before.prompt_span[1] < before.image_spans[0][0]


def test_embeds_metadata(hf_encoder, hf_tiny_path):
    embeds = hf_encoder.encode([picture(64, 64)], PROMPT, [1, 4], "after_image")
    assert isinstance(embeds, VLEmbeds)
    assert hf_encoder.source == os.path.basename(hf_tiny_path) == embeds.source
    assert (hf_encoder.num_layers, hf_encoder.width) == (4, 256)
    assert embeds.num_layers == 4 and embeds.width == 256
    assert embeds.placement == "after_image" and embeds.prompt == PROMPT and embeds.token_mode == "full"
    assert embeds.image_sizes == ((64, 64),)
    for t in embeds.hidden.values():
        assert t.dtype == torch.float32 and t.device.type == "cpu" and not t.is_inference()
        t.mul_(1.0)   # plain tensors: downstream code may modify them in place


def test_text_only_encode(hf_encoder):
    embeds = hf_encoder.encode([], PROMPT, [2], "after_image")
    assert embeds.image_spans == ()
    ids, span = tokenize_chat(hf_encoder.tokenizer, *extract.chat_pieces(PROMPT, 0, "after_image"))
    assert embeds.num_tokens == len(ids) and embeds.prompt_span == span


def test_bad_inputs_are_refused(hf_encoder):
    with pytest.raises(ValueError, match="out of range|not resolved"):
        hf_encoder.encode([picture(64, 64)], PROMPT, [5], "after_image")
    with pytest.raises(ValueError, match="not resolved"):
        hf_encoder.encode([picture(64, 64)], PROMPT, [-1], "after_image")
    with pytest.raises(ValueError, match="placement"):
        hf_encoder.encode([picture(64, 64)], PROMPT, [1], "middle")
    with pytest.raises(ValueError, match="image_pad"):
        hf_encoder.encode([picture(64, 64)], "sneaky <|image_pad|> token", [1], "after_image")
    with pytest.raises(ValueError, match="multiple of 32"):
        hf_encoder.encode([picture(48, 64)], PROMPT, [1], "after_image")


def test_non_qwen3vl_and_missing_folders_are_refused(tmp_path):
    other = tmp_path / "Qwen3-4B"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"]}))
    with pytest.raises(ValueError, match=r"'Qwen3-4B' is not a Qwen3-VL model.*'qwen3'.*Qwen3ForCausalLM"):
        TransformersQwen3VL.from_pretrained(str(other))
    with pytest.raises(ValueError, match=r"'nothing-here' not found"):
        TransformersQwen3VL.from_pretrained(str(tmp_path / "nothing-here"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=r"'empty'.*no config.json"):
        check_qwen3vl_folder(str(empty))
