"""TransformersQwen3VL on a tiny random Qwen3-VL (no ComfyUI needed).

Two engines over the same weights: "hf" (the transformers forward stopped by hooks: bit-exact with the
full forward) and the default fast runner (vl_core.encoders.qwen3vl_runner: its truncated forward is
bit-exact with its own full forward, and matches the transformers full forward to fp32 rounding).
"""
from __future__ import annotations

import json
import os

import pytest
import torch
import transformers

from vl_core import extract, preprocess
from vl_core.encoders.hf_folder import check_qwen3vl_folder
from vl_core.encoders.transformers_qwen3vl import TransformersQwen3VL
from vl_core.layout import tokenize_chat
from vl_core.types import VLEmbeds

PROMPT = "a red cat on a blue sofa"


def picture(h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(h, w, 3, generator=torch.Generator().manual_seed(seed))


def full_forward(enc: TransformersQwen3VL, images, prompt: str, placement: str):
    """Reference: the complete HF forward (logits included) with output_hidden_states=True.

    The layer numbering the pack defines (transformers 5.x's hidden_states): [0] the input embeddings,
    [i] decoder layer i-1's output before DeepStack adds its features, [L] the final norm's output.
    transformers 4.x reports other tensors under the same names: layer outputs that DeepStack then
    modifies in place, and the last layer un-normed. So the reference is recorded with hooks (a copy of
    each layer's output), and on 5.x it must also equal hidden_states itself.
    """
    grids = [preprocess.to_patches(im)[1] for im in images]
    pixel_values = torch.cat([preprocess.to_patches(im)[0] for im in images])
    counts = [int(g.prod()) // 4 for g in grids]
    ids, span = enc.tokenize(prompt, len(images), placement, counts)
    lm = enc.language_model
    outputs: dict[int, torch.Tensor] = {}

    def record(index):
        def hook(module, args, output):
            outputs[index] = (output[0] if isinstance(output, tuple) else output).clone()
        return hook

    handles = [layer.register_forward_hook(record(i + 1)) for i, layer in enumerate(lm.layers)]
    try:
        with torch.inference_mode():
            out = enc.model(input_ids=ids[None], pixel_values=pixel_values, image_grid_thw=torch.cat(grids),
                            mm_token_type_ids=(ids == enc.image_pad_id)[None].int(), output_hidden_states=True,
                            use_cache=False)
            last = len(lm.layers)
            hidden = [out.hidden_states[0]] + [outputs[i] for i in range(1, last)] + [lm.norm(outputs[last])]
    finally:
        for h in handles:
            h.remove()
    if int(transformers.__version__.split(".")[0]) >= 5:
        assert all(torch.equal(a, b) for a, b in zip(hidden, out.hidden_states, strict=True))
    return tuple(hidden), ids, span


@pytest.fixture(scope="module")
def reference(hf_encoder):
    images = [picture(64, 96)]
    return {placement: full_forward(hf_encoder, images, PROMPT, placement) for placement in extract.PLACEMENTS}


SPECS = [[0], [1], [2], [-1], [-2], [0, -2, -1], [1, 3], [0, 1, 2, 3, 4]]


@pytest.mark.parametrize("placement", extract.PLACEMENTS)
@pytest.mark.parametrize("spec", SPECS)
def test_truncated_forward_is_bit_exact(hf_exact, reference, placement, spec):
    """engine "hf": the truncated transformers forward returns the full forward's tensors bit for bit."""
    hidden_ref, _, _ = reference[placement]
    assert len(hidden_ref) == hf_exact.num_layers + 1
    layers = extract.parse_layers(spec, hf_exact.num_layers)
    embeds = hf_exact.encode([picture(64, 96)], PROMPT, layers, placement)
    assert embeds.layers == layers
    for layer in layers:
        assert torch.equal(embeds.hidden[layer], hidden_ref[layer].float()), f"layer {layer}"


@pytest.fixture(scope="module")
def fast_full(hf_encoder):
    """The fast runner's own full forward (every layer requested) per placement."""
    layers = list(range(hf_encoder.num_layers + 1))
    return {p: hf_encoder.encode([picture(64, 96)], PROMPT, layers, p) for p in extract.PLACEMENTS}


@pytest.mark.parametrize("placement", extract.PLACEMENTS)
@pytest.mark.parametrize("spec", SPECS)
def test_fast_truncated_forward_is_bit_exact_and_matches_transformers(hf_encoder, reference, fast_full, placement,
                                                                       spec):
    """Fast engine: truncated == its full forward bit for bit; == the transformers full forward to fp32 rounding."""
    hidden_ref, _, _ = reference[placement]
    layers = extract.parse_layers(spec, hf_encoder.num_layers)
    embeds = hf_encoder.encode([picture(64, 96)], PROMPT, layers, placement)
    assert embeds.layers == layers
    for layer in layers:
        assert torch.equal(embeds.hidden[layer], fast_full[placement].hidden[layer]), f"layer {layer}"
        torch.testing.assert_close(embeds.hidden[layer], hidden_ref[layer].float(), atol=2e-5, rtol=1e-5,
                                   msg=f"layer {layer}")


def test_fast_forward_stops_at_deepest_layer_and_never_touches_lm_head(hf_encoder):
    """The fast runner reads a module's weights only when it computes with it: record which ones it reads."""
    runner = hf_encoder.fast_runner()
    lm = hf_encoder.language_model
    names = {id(m): n for n, m in hf_encoder.model.named_modules()}
    seen: list[str] = []
    inner = runner.weights

    class Recorder:
        def __getattr__(self, name):
            return getattr(inner, name)

        def get(self, m):
            seen.append(names[id(m)])
            return inner.get(m)

        def release(self, *a):
            return inner.release(*a)

    runner.weights = Recorder()
    try:
        for layers, ran in [([0], []), ([1], [0]), ([0, 2], [0, 1]), ([3], [0, 1, 2]), ([4], [0, 1, 2, 3])]:
            seen.clear()
            hf_encoder.encode([picture(64, 64)], PROMPT, layers, "after_image")
            decoder = sorted({int(n.split(".layers.")[1].split(".")[0]) for n in seen
                              if "language_model.layers." in n})
            assert decoder == ran, layers
            assert any(n.endswith("language_model.norm") for n in seen) == (layers == [4])
            assert not any("lm_head" in n for n in seen)
            assert any("visual.blocks.1." in n for n in seen)      # the vision tower always runs
    finally:
        runner.weights = inner
    assert runner.weights is inner and lm is hf_encoder.language_model


def test_forward_stops_at_deepest_layer_and_never_computes_logits(hf_exact):
    hf_encoder = hf_exact
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


def test_float16_image_wire_keeps_the_states(hf_encoder):
    """On CUDA the runner uploads pixels as IMAGE_WIRE_DTYPE (float16): what the forward then receives is the
    image rounded to float16, which must change the states far less than the compute dtype's own rounding
    (fp32 tiny model: ≤ 1e-3 relative), while a bfloat16 wire, 8 bits coarser, would show."""
    from vl_core.encoders.qwen3vl_runner import Qwen3VLRunner

    assert Qwen3VLRunner.IMAGE_WIRE_DTYPE == torch.float16
    image, layers = picture(64, 96, 5), [1, 3]
    exact = hf_encoder.encode([image], PROMPT, layers, "after_image").hidden
    wire = hf_encoder.encode([image.half()], PROMPT, layers, "after_image").hidden
    coarse = hf_encoder.encode([image.bfloat16()], PROMPT, layers, "after_image").hidden
    for layer in layers:
        rel = lambda x, y: float((x - y).norm() / y.norm())  # noqa: E731
        assert rel(wire[layer], exact[layer]) <= 1e-3, layer
        assert rel(coarse[layer], exact[layer]) > 2 * rel(wire[layer], exact[layer]), layer


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fast_engine_in_half_precision_matches_transformers(hf_tiny_path, dtype):
    """Weights in bf16/fp16: the fast runner computes in the weights' dtype like transformers does; both
    stay within half-precision rounding of the fp32 reference."""
    if int(transformers.__version__.split(".")[0]) < 5:
        pytest.skip("transformers 4.x: the transformers backend refuses it (test_backend_refuses_transformers_4)")
    enc = TransformersQwen3VL.from_pretrained(hf_tiny_path, dtype=dtype, device="cpu")
    hf = TransformersQwen3VL(enc.model, enc.tokenizer, engine="hf")
    ref = TransformersQwen3VL.from_pretrained(hf_tiny_path, dtype=torch.float32, device="cpu", engine="hf")
    images, layers = [picture(64, 96, 4)], [0, 2, 3, 4]
    a = enc.encode(images, PROMPT, layers, "after_image")
    b = hf.encode(images, PROMPT, layers, "after_image")
    r = ref.encode(images, PROMPT, layers, "after_image")
    for layer in layers:
        rel = lambda x, y: float((x - y).norm() / y.norm())  # noqa: E731
        assert rel(a.hidden[layer], r.hidden[layer]) < 2e-2, layer
        assert rel(b.hidden[layer], r.hidden[layer]) < 2e-2, layer
        assert rel(a.hidden[layer], b.hidden[layer]) < 2e-2, layer


def test_encode_many_matches_single_encodes(hf_encoder, hf_exact):
    """Same-size images run as one batch; each result equals encoding that image alone."""
    images = [picture(64, 96, 11), picture(96, 64, 12), picture(64, 96, 13), picture(64, 96, 14), picture(32, 32, 15)]
    layers = [0, 1, 3, 4]
    batch = hf_encoder.encode_many(images, PROMPT, layers, "after_image")
    assert len(batch) == len(images)
    for im, got in zip(images, batch):
        alone = hf_encoder.encode([im], PROMPT, layers, "after_image")
        exact = hf_exact.encode([im], PROMPT, layers, "after_image")
        assert (got.image_spans, got.prompt_span, got.image_sizes) == (alone.image_spans, alone.prompt_span,
                                                                       alone.image_sizes)
        for layer in layers:
            torch.testing.assert_close(got.hidden[layer], alone.hidden[layer], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(got.hidden[layer], exact.hidden[layer], atol=2e-5, rtol=1e-5)
    chunked = hf_encoder.encode_many(images[:4], PROMPT, layers, "after_image", max_batch_tokens=24)  # 1 per chunk
    for a, b in zip(chunked, batch):
        for layer in layers:
            torch.testing.assert_close(a.hidden[layer], b.hidden[layer], atol=1e-5, rtol=1e-5)
    hf_many = hf_exact.encode_many(images[:2], PROMPT, [2], "before_image")
    assert [e.num_tokens for e in hf_many] == [hf_exact.encode([im], PROMPT, [2], "before_image").num_tokens
                                               for im in images[:2]]


def test_engine_selection(hf_tiny_path, hf_encoder, caplog):
    """A config the runner does not implement falls back to the transformers forward (logged), or raises
    with engine="fast"; engine "hf" never builds a runner."""
    assert TransformersQwen3VL(hf_encoder.model, hf_encoder.tokenizer, engine="hf").fast_runner() is None
    with pytest.raises(ValueError, match="unknown engine 'turbo': expected one of 'auto', 'fast', 'hf'"):
        TransformersQwen3VL(hf_encoder.model, hf_encoder.tokenizer, engine="turbo")
    odd = TransformersQwen3VL.from_pretrained(hf_tiny_path, dtype=torch.float32, device="cpu")
    odd.model.config.text_config.hidden_act = "gelu"
    with caplog.at_level("WARNING", logger="comfyui-zimage-vl"):
        assert odd.fast_runner() is None
    assert "fast encode does not apply" in caplog.text and "hidden_act" in caplog.text
    embeds = odd.encode([picture(64, 64)], PROMPT, [1], "after_image")   # still encodes (transformers forward)
    assert embeds.layers == [1]
    strict = TransformersQwen3VL(odd.model, odd.tokenizer, engine="fast")
    with pytest.raises(RuntimeError, match="engine 'fast' does not apply"):
        strict.encode([picture(64, 64)], PROMPT, [1], "after_image")


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


def test_runner_outputs_are_owned_and_graphs_stay_off_the_cpu(hf_encoder):
    """Results are plain float32 tensors the caller owns; CUDA-graph capture never engages on the CPU; the
    runner uses its encoder's own graph cache, which offload releases."""
    from vl_core.encoders import weights

    runner = hf_encoder.fast_runner()
    assert runner.graphs is hf_encoder.graphs is not None
    assert runner.device.type == "cpu" and not runner._graphs_possible()
    with torch.inference_mode():
        t = torch.ones(1, 3, 4, dtype=torch.bfloat16)
    out = weights.to_outputs({3: t}, "cpu")[3]
    assert out.dtype == torch.float32 and not out.is_inference() and out.data_ptr() != t.data_ptr()
    f32 = torch.ones(2, 2)
    with torch.inference_mode():      # as ComfyUI runs nodes: still plain tensors of their own
        got = weights.to_outputs({0: f32, 1: t}, "cpu")
    assert all(not o.is_inference() and o.dtype == torch.float32 for o in got.values())
    assert got[0].data_ptr() != f32.data_ptr() and torch.equal(got[1], t.float())
    assert weights.normalize_device("cpu") == torch.device("cpu")
    eager = TransformersQwen3VL(hf_encoder.model, hf_encoder.tokenizer, graphs=False)
    assert eager.graphs is None and eager.fast_runner().graphs is None
    eager.release_graphs()       # nothing to release: no error


def test_graph_cache_counts_eager_runs_and_releases():
    """The cache captures on the second identical encode: ran_before is False once per key, then True;
    release() forgets everything (a failed capture too); it never engages off the GPU."""
    from vl_core.encoders.graph_cache import GraphCache

    cache = GraphCache(capacity=2, seen_capacity=2)
    assert not cache.usable(torch.device("cpu")) and len(cache) == 0
    assert cache.ran_before("a") is False and cache.ran_before("a") is True
    assert cache.ran_before("b") is False and cache.ran_before("c") is False     # "a" evicted (seen_capacity 2)
    assert cache.ran_before("a") is False
    assert cache.replay("a", []) is None
    cache.broken = True                          # a failed capture: off until the next release
    cache.release()
    assert cache.ran_before("b") is False and cache.broken is False
    other = GraphCache()
    assert other.ran_before("b") is False        # each cache owns its state


def test_flops_and_mrope_tables():
    """encode_flops (bench/) counts what the runner computes; MRoPE positions follow the Qwen-VL rule."""
    import importlib.util

    from vl_core.encoders.batching import batch_chunks, same_size_batches
    from vl_core.encoders.qwen3vl_spec import Qwen3VLSpec
    from vl_core.encoders.qwen3vl_tables import mrope_positions

    bench_flops = os.path.join(os.path.dirname(__file__), "..", "..", "bench", "flops.py")
    spec_ = importlib.util.spec_from_file_location("zimage_vl_bench_flops", bench_flops)
    flops = importlib.util.module_from_spec(spec_)
    spec_.loader.exec_module(flops)

    pos = mrope_positions([1, 2, 9, 9, 9, 9, 9, 9, 3], 9, [(2, 3)])
    assert pos[:, :2].tolist() == [[0, 1], [0, 1], [0, 1]]
    assert pos[0, 2:8].tolist() == [2] * 6
    assert pos[1, 2:8].tolist() == [2, 2, 2, 3, 3, 3] and pos[2, 2:8].tolist() == [2, 3, 4, 2, 3, 4]
    assert pos[:, 8].tolist() == [5, 5, 5]                # resumes at 2 + max(2, 3)
    spec = Qwen3VLSpec(patch_size=16, temporal_patch_size=2, merge_size=2, vision_hidden=1024, vision_heads=16,
                       vision_depth=24, num_grid_per_side=48, deepstack_indexes=(5, 11, 17), num_layers=36,
                       hidden=2560, heads=32, kv_heads=8, head_dim=128, rope_theta=5e6, mrope_section=(24, 20, 20),
                       mrope_interleaved=True, rms_eps=1e-6, deepstack_after_record=True)
    f31 = flops.encode_flops(spec, [(64, 64)], 1047, 31, vision_ffn=4096, text_ffn=9728)
    f36 = flops.encode_flops(spec, [(64, 64)], 1047, 36, vision_ffn=4096, text_ffn=9728)
    assert 10.5e12 < f31["total"] < 11.5e12 and f36["text"] / f31["text"] == pytest.approx(36 / 31)
    assert batch_chunks(5, 4096, 8192) == [(0, 2), (2, 4), (4, 5)]
    images = [torch.zeros(64, 64, 3), torch.zeros(32, 64, 3), torch.zeros(64, 64, 3), torch.zeros(64, 64, 3)]
    groups = same_size_batches(images, lambda h, w: h * w // 256, max_batch_tokens=32)
    assert groups == [([0, 2, 3], [[0, 2], [3]]), ([1], [[1]])]


def test_loader_reads_safetensors_only(hf_tiny_path, tmp_path, monkeypatch):
    """A folder whose weights are a pickled pytorch_model.bin is refused before anything is unpickled."""
    import shutil

    pickled = tmp_path / "Qwen3-VL-bin"
    shutil.copytree(hf_tiny_path, pickled)
    for f in os.listdir(pickled):
        if f.endswith(".safetensors") or f.endswith(".safetensors.index.json"):
            os.remove(pickled / f)
    (pickled / "pytorch_model.bin").write_bytes(b"not unpickled")

    def no_unpickling(*a, **k):
        raise AssertionError("torch.load was called on a pickled checkpoint")

    monkeypatch.setattr(torch, "load", no_unpickling)
    with pytest.raises(ValueError, match=r"'Qwen3-VL-bin' has no \.safetensors weights \(it has pytorch_model\.bin\)"
                                         r": this loader reads safetensors only"):
        TransformersQwen3VL.from_pretrained(str(pickled))


def test_backend_refuses_transformers_4(hf_tiny_path):
    """Below transformers 5 the backend is refused with the fix, before any model is built."""
    from vl_core.encoders.hf_folder import require_transformers_for_backend

    for old in ("4.57.1", "4.50.3"):
        with pytest.raises(ValueError, match=r"needs transformers >= 5\.0, this environment has 4\.5.*CLIPLoader"):
            require_transformers_for_backend(old)
    require_transformers_for_backend("5.0.0")
    if int(transformers.__version__.split(".")[0]) < 5:
        with pytest.raises(ValueError, match="needs transformers >= 5.0"):
            TransformersQwen3VL.from_pretrained(hf_tiny_path, dtype=None, device="cpu")
