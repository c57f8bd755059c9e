"""Batched text-only encodes (VL Fit Calibration's path) against one prompt at a time, on the tiny models:

- both VL backends' encode_texts equals encode([], prompt, ...) per prompt (prompts of different lengths
  right-padded in one forward; chunked by max_batch_tokens);
- Z-Image's text encoder CLIP, several prompts' rows in one encode_from_tokens, equals one encode per prompt;
- the Fit Calibration node's aligned pairs (both encoders batched) equal the pairs made one prompt at a time.

Collected only with a ComfyUI host (tests/backends/conftest.py); comfy runs on CPU.
"""
from __future__ import annotations

import pytest
import torch

from tools import tiny_models

native_clip_mod = tiny_models.import_pack("nodes.native_clip")
transformers_model = tiny_models.import_pack("nodes.transformers_model")
calibrate_node = tiny_models.import_pack("nodes.calibrate")
batching = tiny_models.import_pack("vl_core.encoders.batching")
layer_mix = tiny_models.import_pack("vl_core.layer_mix")

PROMPTS = ["a red cat", "two old boats drifting on a grey sea at dawn, seen from a high cliff", "snow",
           "a bowl of fruit on a wooden table", "a city street at night with neon signs reflected in puddles",
           "an owl", "three green bottles"]
LAYERS = [1, 3, 4]


@pytest.fixture(scope="module")
def native(hf_tiny_path):
    return native_clip_mod.NativeQwen3VLEncoder(tiny_models.make_native_tiny_qwen3vl_clip(hf_tiny_path,
                                                                                           hidden_size=256))


@pytest.fixture(scope="module")
def transformers_vl(hf_tiny_path):
    if int(__import__("transformers").__version__.split(".")[0]) < 5:
        pytest.skip("transformers 4.x: the transformers backend refuses it")
    return transformers_model.load_transformers_vl(hf_tiny_path, "fp32")


@pytest.fixture(scope="module")
def text_clip():
    return tiny_models.make_native_tiny_zimage_clip(hidden_size=256)


def _same_embeds(got, alone, atol=1e-5):
    assert (got.image_spans, got.prompt_span, got.num_tokens, got.layers, got.prompt) == \
           (alone.image_spans, alone.prompt_span, alone.num_tokens, alone.layers, alone.prompt)
    for layer in alone.layers:
        torch.testing.assert_close(got.hidden[layer], alone.hidden[layer], atol=atol, rtol=1e-5)


@pytest.mark.parametrize("backend", ["native", "transformers"])
def test_encode_texts_equals_one_prompt_at_a_time(request, backend):
    enc = request.getfixturevalue("native" if backend == "native" else "transformers_vl")
    batched = enc.encode_texts(PROMPTS, LAYERS, "after_image")
    lengths = [e.num_tokens for e in batched]
    assert len(set(lengths)) > 3          # really different lengths in one padded batch
    for prompt, got in zip(PROMPTS, batched):
        alone = enc.encode([], prompt, LAYERS, "after_image")
        _same_embeds(got, alone)
        assert len(enc.text_ids(prompt)) == got.num_tokens
    chunked = enc.encode_texts(PROMPTS, LAYERS, "after_image", max_batch_tokens=max(lengths))   # ~1 per batch
    for a, b in zip(chunked, batched):
        _same_embeds(a, b)


def test_padding_never_reaches_the_prompt_tokens(transformers_vl):
    """The padded rows' states past a prompt's length differ from nothing the caller keeps: the same prompt
    batched with a long one or a short one gives the same states."""
    enc = transformers_vl
    short = enc.encode_texts(["an owl", "an owl"], [2])[0]
    with_long = enc.encode_texts(["an owl", PROMPTS[4]], [2])[0]
    torch.testing.assert_close(short.hidden[2], with_long.hidden[2], atol=1e-5, rtol=1e-5)


def test_length_batches_bound_the_padded_size():
    lengths = [5, 30, 7, 30, 12, 1]
    batches = batching.length_batches(lengths, 60)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        assert len(b) == 1 or len(b) * max(lengths[i] for i in b) <= 60
        assert lengths[b[0]] == max(lengths[i] for i in b)
    assert batching.length_batches(lengths, 1) == [[1], [3], [4], [2], [0], [5]]


def test_text_clip_rows_batched_equal_one_encode_per_prompt(text_clip):
    rows, key = [], None
    for i, p in enumerate(PROMPTS):
        key, row = calibrate_node.text_row(text_clip, p, i)
        rows.append(row)
    ticks = []
    batched = calibrate_node.text_states(text_clip, key, rows, tick=ticks.append)
    assert sum(ticks) == len(PROMPTS) and len(ticks) == 1                 # one encode call for all
    for p, got in zip(PROMPTS, batched):
        alone = text_clip.encode_from_tokens(text_clip.tokenize(p))[0].float()
        assert got.shape == alone.shape
        torch.testing.assert_close(got, alone, atol=1e-5, rtol=1e-5)
    small = calibrate_node.text_states(text_clip, key, rows, max_tokens=1)   # one prompt per call
    for a, b in zip(small, batched):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["native", "transformers"])
def test_fit_calibration_pairs_equal_the_one_at_a_time_path(request, backend, text_clip):
    enc = request.getfixturevalue("native" if backend == "native" else "transformers_vl")
    prompts = PROMPTS + ["a \\(bracketed\\) word"]
    resolved, weights = layer_mix.parse_layer_spec("-2:0.25, -4:0.75", enc.num_layers)
    pairs, dropped = calibrate_node.aligned_pairs(enc, text_clip, prompts, resolved, weights)
    # ComfyUI's tokenizers unescape '\(' on both native sides; the transformers tokenizer keeps the backslash
    assert dropped == ([] if backend == "native" else [prompts[-1]])
    kept = [p for p in prompts if p not in dropped]
    assert len(pairs) == len(kept)
    for prompt, (x, y) in zip(kept, pairs):
        vl = enc.encode([], prompt, resolved, "after_image")
        x_alone = (0.25 * vl.hidden[resolved[1]] + 0.75 * vl.hidden[resolved[0]])[0]
        y_alone = text_clip.encode_from_tokens(text_clip.tokenize(prompt))[0].float()
        torch.testing.assert_close(x, x_alone, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(y, y_alone, atol=1e-5, rtol=1e-5)
