"""ComfyUI side: NativeQwen3VLEncoder over ComfyUI's own Qwen3-VL (nodes/native_clip.py), TransformersVLModel
(nodes/transformers_model.py), model folders (nodes/model_folders.py), backend selection (nodes/backends.py).

Collected only when a ComfyUI host is found (see conftest.py); comfy runs on CPU. The native encoder's
default path is the fast runner over ComfyUI's loaded modules; engine="host" is ComfyUI's own encode
(clip.tokenize + encode_from_tokens), the reference the fast path is checked against.
"""
from __future__ import annotations

import json
import os

import pytest
import torch

from tools import tiny_models

backends = tiny_models.import_pack("nodes.backends")
native_clip_mod = tiny_models.import_pack("nodes.native_clip")
native_fast = tiny_models.import_pack("nodes.native_fast")
model_folders = tiny_models.import_pack("nodes.model_folders")
transformers_model = tiny_models.import_pack("nodes.transformers_model")
extract = tiny_models.import_pack("vl_core.extract")
preprocess = tiny_models.import_pack("vl_core.preprocess")
weights_mod = tiny_models.import_pack("vl_core.encoders.weights")

import comfy.model_management as model_management  # noqa: E402  (after conftest's prepare_comfy)
import folder_paths  # noqa: E402

PROMPT = "a red cat on a blue sofa"


def picture(h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(h, w, 3, generator=torch.Generator().manual_seed(seed))


def packed_layers(lm) -> int:
    """Decoder layers whose q/k/v weights are one block and gate/up weights another (the runner's joint GEMMs)."""
    def joint(*ms):
        return weights_mod.joint_rows([m.weight for m in ms]) is not None
    return sum(joint(layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj)
               and joint(layer.mlp.gate_proj, layer.mlp.up_proj) for layer in lm.layers)


@pytest.fixture(scope="module")
def native_clip(hf_tiny_path):
    return tiny_models.make_native_tiny_qwen3vl_clip(hf_tiny_path, hidden_size=256)


@pytest.fixture(scope="module")
def native(native_clip):
    return native_clip_mod.NativeQwen3VLEncoder(native_clip)


def deepstack_features(hf_encoder, images) -> list[torch.Tensor]:
    pixel_values = torch.cat([preprocess.to_patches(im)[0] for im in images])
    grid = torch.cat([preprocess.to_patches(im)[1] for im in images])
    with torch.inference_mode():
        out = hf_encoder.model.model.get_image_features(pixel_values, grid, return_dict=True)
    return [torch.cat(feats).float() for feats in out.deepstack_features]


@pytest.mark.parametrize("placement", ["after_image", "before_image"])
def test_native_matches_transformers_on_same_weights(native, hf_encoder, placement):
    """Both backends on identical fp32 weights (HF checkpoint loaded into ComfyUI's class with ComfyUI's key
    renaming), two images of different sizes.

    Text tokens agree at every layer (≤ ~2e-6 here; atol 1e-4), and image tokens at layer 0 and at layers
    > K, where K = len(deepstack_visual_indexes) (2 here, 3 for Qwen3-VL-4B). At layers 1..K the image
    tokens differ by exactly the DeepStack vision feature of that layer: transformers records
    hidden_states[i] with a hook on decoder layer i-1's output, *before* Qwen3VLTextModel adds
    deepstack_visual_embeds[i-1] at the image positions; ComfyUI's Llama2_ records the input of layer i,
    *after* the addition. Everything else (vision tower, MRoPE positions, attention) matches to float
    rounding: ComfyUI computes in fp32 with its own ops/attention (CPU: attention_basic), transformers with SDPA.
    """
    images = [picture(64, 96, 1), picture(96, 64, 2)]
    layers = list(range(native.num_layers + 1))
    a = native.encode(images, PROMPT, layers, placement)
    b = hf_encoder.encode(images, PROMPT, layers, placement)
    assert (a.image_spans, a.prompt_span, a.num_tokens) == (b.image_spans, b.prompt_span, b.num_tokens)
    assert a.image_sizes == b.image_sizes == ((64, 96), (96, 64))
    mask = a.image_mask()
    deepstack = deepstack_features(hf_encoder, images)
    k = len(deepstack)
    assert k == len(hf_encoder.model.config.vision_config.deepstack_visual_indexes) == 2
    for layer in layers:
        na, hb = a.hidden[layer][0], b.hidden[layer][0]
        torch.testing.assert_close(na[~mask], hb[~mask], atol=1e-4, rtol=1e-4, msg=f"text, layer {layer}")
        expected = hb[mask] + deepstack[layer - 1] if 1 <= layer <= k else hb[mask]
        torch.testing.assert_close(na[mask], expected, atol=1e-4, rtol=1e-4, msg=f"image, layer {layer}")
    for layer in range(1, k + 1):   # the difference is real, not rounding
        assert (a.hidden[layer][0, mask] - b.hidden[layer][0, mask]).abs().max() > 1e-2


# ---------------------------------------------------------------------------- fast path vs ComfyUI's own encode

@pytest.fixture(scope="module")
def host(native_clip):
    return native_clip_mod.NativeQwen3VLEncoder(native_clip, engine="host")


def rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("placement", ["after_image", "before_image"])
def test_fast_path_matches_comfy_encode_fp32(native, host, placement):
    """fp32 weights: the fast runner and ComfyUI's encoder (both fp32) agree to float rounding at every layer,
    two images of different sizes."""
    images = [picture(64, 96, 5), picture(96, 64, 6)]
    layers = list(range(native.num_layers + 1))
    a = native.encode(images, PROMPT, layers, placement)
    assert native.last_path == "fast"
    b = host.encode(images, PROMPT, layers, placement)
    assert host.last_path == "host"
    assert (a.image_spans, a.prompt_span, a.image_sizes) == (b.image_spans, b.prompt_span, b.image_sizes)
    for layer in layers:
        torch.testing.assert_close(a.hidden[layer], b.hidden[layer], atol=5e-5, rtol=1e-4, msg=f"layer {layer}")


def test_fast_truncated_equals_fast_full(native):
    full = native.encode([picture(64, 96, 7)], PROMPT, list(range(native.num_layers + 1)), "after_image")
    for layers in ([0], [1], [2, 3], [4], [0, 4]):
        got = native.encode([picture(64, 96, 7)], PROMPT, layers, "after_image")
        for layer in layers:
            assert torch.equal(got.hidden[layer], full.hidden[layer]), (layers, layer)


@pytest.fixture(scope="module")
def native_bf16_clip(hf_tiny_path):
    return tiny_models.make_native_tiny_qwen3vl_clip(hf_tiny_path, hidden_size=256, dtype=torch.bfloat16)


def test_fast_path_matches_comfy_encode_bf16(native_bf16_clip, native_clip):
    """bf16 weights: ComfyUI upcasts everything to fp32, the fast path computes in bf16; both stay within bf16
    rounding of each other and of the fp32 model."""
    fast = native_clip_mod.NativeQwen3VLEncoder(native_bf16_clip)
    slow = native_clip_mod.NativeQwen3VLEncoder(native_bf16_clip, engine="host")
    fp32 = native_clip_mod.NativeQwen3VLEncoder(native_clip, engine="host")
    images, layers = [picture(64, 96, 8)], [0, 1, 2, 3, 4]
    a = fast.encode(images, PROMPT, layers, "after_image")
    assert fast.last_path == "fast" and fast._runner.dtype == torch.bfloat16
    b = slow.encode(images, PROMPT, layers, "after_image")
    r = fp32.encode(images, PROMPT, layers, "after_image")
    for layer in layers:
        assert rel(a.hidden[layer], b.hidden[layer]) < 2e-2, layer
        assert rel(a.hidden[layer], r.hidden[layer]) < 2e-2, layer
        assert rel(b.hidden[layer], r.hidden[layer]) < 2e-2, layer


def test_fast_path_through_comfy_weight_casting(native, host):
    """Modules ComfyUI manages in place (lowvram / dynamic VRAM / LoRA weight functions) are read through
    comfy.ops.cast_bias_weight: forcing that route for every ComfyUI op gives the same states."""

    class CastEverything(native_fast.ComfyWeights):
        calls = 0

        def _is_direct(self, m):
            return not hasattr(m, "comfy_cast_weights")

        def get(self, m):
            out = super().get(m)
            if out[2] is not None:
                CastEverything.calls += 1
            return out

    images, layers = [picture(64, 64, 9)], [1, 3, 4]
    want = native.encode(images, PROMPT, layers, "after_image")
    runner = native._runner
    original = native_clip_mod.ComfyWeights
    native_clip_mod.ComfyWeights = CastEverything
    try:
        got = native.encode(images, PROMPT, layers, "after_image")
    finally:
        native_clip_mod.ComfyWeights = original
    assert runner is native._runner and CastEverything.calls > 50
    for layer in layers:
        assert torch.equal(got.hidden[layer], want.hidden[layer])


def test_fast_path_resizes_like_comfy(native, host):
    """Images ComfyUI's Qwen-VL preprocessing resizes (under 3136 px here) are resized the same way on the device."""
    image = picture(32, 64, 10)      # 2048 px -> ComfyUI upsizes to 64x96
    a = native.encode([image], PROMPT, [1, 4], "after_image")
    b = host.encode([image], PROMPT, [1, 4], "after_image")
    assert a.image_sizes == b.image_sizes == ((64, 96),) and native.last_path == "fast"
    for layer in (1, 4):
        torch.testing.assert_close(a.hidden[layer], b.hidden[layer], atol=5e-5, rtol=1e-4)


def test_encode_many_matches_single_encodes(native):
    images = [picture(64, 96, 20), picture(64, 64, 21), picture(64, 96, 22), picture(64, 96, 23)]
    layers = [0, 2, 4]
    many = native.encode_many(images, PROMPT, layers, "before_image")
    for image, got in zip(images, many):
        alone = native.encode([image], PROMPT, layers, "before_image")
        assert (got.image_spans, got.prompt_span, got.image_sizes) == (alone.image_spans, alone.prompt_span,
                                                                       alone.image_sizes)
        for layer in layers:
            torch.testing.assert_close(got.hidden[layer], alone.hidden[layer], atol=1e-5, rtol=1e-5)


def test_fallback_to_comfy_encode_is_logged_once(hf_tiny_path, caplog):
    """A clip the fast path cannot run (object patches here) encodes through ComfyUI's own encoder, says why
    once; engine="fast" refuses instead."""
    clip = tiny_models.make_native_tiny_qwen3vl_clip(hf_tiny_path, hidden_size=256).clone()
    inner = clip.cond_stage_model.clip
    clip.patcher.add_object_patch(f"{inner}.transformer.dtype", torch.float32)     # harmless, but opaque to us
    enc = native_clip_mod.NativeQwen3VLEncoder(clip)
    with caplog.at_level("WARNING", logger="comfyui-zimage-vl"):
        a = enc.encode([picture(64, 64)], PROMPT, [2], "after_image")
        b = enc.encode([picture(64, 64)], PROMPT, [2], "after_image")
    assert enc.last_path == "host" and torch.equal(a.hidden[2], b.hidden[2])
    assert caplog.text.count("object patches") == 1
    with pytest.raises(RuntimeError, match="fast path does not apply.*object patches"):
        native_clip_mod.NativeQwen3VLEncoder(clip, engine="fast").encode([picture(64, 64)], PROMPT, [2], "after_image")


def test_unknown_layout_falls_back(monkeypatch, native_clip):
    enc = native_clip_mod.NativeQwen3VLEncoder(native_clip)
    monkeypatch.setattr(enc._transformer.model.config, "mlp_activation", "gelu_pytorch_tanh", raising=False)
    assert "unknown module layout" in enc._fast_blocker() and "mlp_activation" in enc._fast_blocker()


def test_offload_unloads_only_this_model(native_clip, hf_tiny_path):
    enc = native_clip_mod.NativeQwen3VLEncoder(native_clip)
    other = tiny_models.make_native_tiny_zimage_clip()
    model_management.load_models_gpu([other.patcher])
    enc.encode([picture(64, 64)], PROMPT, [1], "after_image")
    loaded = lambda: [m.model for m in model_management.current_loaded_models]  # noqa: E731
    assert any(m is native_clip.patcher for m in loaded()) and any(m is other.patcher for m in loaded())
    assert enc.offload() is True
    assert not any(m is not None and m.clone_base_uuid == native_clip.patcher.clone_base_uuid for m in loaded())
    assert any(m is other.patcher for m in loaded())
    assert enc.offload() is False
    again = enc.encode([picture(64, 64)], PROMPT, [1], "after_image")     # reloads on demand
    assert again.layers == [1] and any(m is native_clip.patcher for m in loaded())


def test_native_embeds_metadata_and_spans(native, hf_encoder):
    embeds = native.encode([picture(64, 64)], PROMPT, [0, 3], "after_image")
    assert (native.num_layers, native.width) == (4, 256)
    assert embeds.layers == [0, 3] and embeds.num_layers == 4 and embeds.width == 256
    assert embeds.placement == "after_image" and embeds.prompt == PROMPT
    assert embeds.image_spans == ((4, 8),) and embeds.image_sizes == ((64, 64),)
    assert "qwen3vl_tinytest_256x4" in embeds.source
    assert native.image_pad_id == hf_encoder.image_pad_id == hf_encoder.model.config.image_token_id
    for t in embeds.hidden.values():
        assert t.dtype == torch.float32 and t.shape == (1, embeds.num_tokens, 256) and not t.is_inference()
    ids, span = hf_encoder.tokenize(PROMPT, 1, "after_image", [4])
    assert embeds.prompt_span == span
    assert hf_encoder.tokenizer.decode(ids[span[0]:span[1]]) == PROMPT


def test_original_clip_settings_unchanged(native_clip):
    inner = getattr(native_clip.cond_stage_model, native_clip.cond_stage_model.clip)
    tokens = native_clip.tokenize("hello")
    native_clip.clip_layer(-2)
    reference = native_clip.encode_from_tokens(tokens)   # leaves the shared module set to layer -2
    before = (native_clip.layer_idx, inner.layer, inner.layer_idx, inner.execution_device)
    assert before[:3] == (-2, "hidden", -2)
    encoder = native_clip_mod.NativeQwen3VLEncoder(native_clip)
    encoder.encode([picture(64, 64)], PROMPT, [1, 2, 4], "before_image")
    assert (native_clip.layer_idx, inner.layer, inner.layer_idx, inner.execution_device) == before
    after = native_clip.encode_from_tokens(tokens)
    assert after.ndim == 3 and torch.equal(after, reference)
    native_clip.clip_layer(None)


def test_non_qwen3vl_clip_is_refused():
    zimage = tiny_models.make_native_tiny_zimage_clip()
    with pytest.raises(ValueError, match=r"clip is not a Qwen3-VL text encoder \(found comfy\.text_encoders\.z_image\.ZImageTEModel "
                                         r"with Qwen3_4B\).*"
                                         r"CLIPLoader type 'lumina2'.*Load Qwen3-VL \(transformers\)"):
        native_clip_mod.NativeQwen3VLEncoder(zimage)
    with pytest.raises(ValueError, match="not a Qwen3-VL text encoder"):
        native_clip_mod.NativeQwen3VLEncoder(object())


def test_native_refuses_bad_inputs(native):
    with pytest.raises(ValueError, match="not resolved"):
        native.encode([picture(64, 64)], PROMPT, [-2], "after_image")
    with pytest.raises(ValueError, match="image_pad"):
        native.encode([picture(64, 64)], "sneaky <|image_pad|> token", [1], "after_image")


# ---------------------------------------------------------------------------- transformers via ModelPatcher

def test_transformers_vl_model_runs_through_model_patcher(hf_tiny_path, hf_encoder):
    vl = transformers_model.load_transformers_vl(hf_tiny_path, "fp32")
    assert (vl.num_layers, vl.width, vl.source) == (4, 256, os.path.basename(hf_tiny_path))
    assert vl.patcher.model.hf is vl.encoder.model
    img = picture(64, 96)
    got = vl.encode([img], PROMPT, [0, 2, 4], "before_image")
    assert any(m.model is vl.patcher for m in model_management.current_loaded_models)
    ref = hf_encoder.encode([img], PROMPT, [0, 2, 4], "before_image")
    for layer in ref.layers:
        assert torch.equal(got.hidden[layer], ref.hidden[layer])
    assert vl.encoder.model.dtype == torch.float32


def test_transformers_vl_model_encode_many_and_offload(hf_tiny_path, hf_encoder):
    vl = transformers_model.load_transformers_vl(hf_tiny_path, "fp32")
    images = [picture(64, 96, 30), picture(64, 96, 31)]
    many = vl.encode_many(images, PROMPT, [1, 3], "after_image")
    for image, got in zip(images, many):
        ref = hf_encoder.encode([image], PROMPT, [1, 3], "after_image")
        for layer in (1, 3):
            torch.testing.assert_close(got.hidden[layer], ref.hidden[layer], atol=1e-5, rtol=1e-5)
    assert any(m.model is vl.patcher for m in model_management.current_loaded_models)
    assert vl.offload() is True
    assert not any(m.model is vl.patcher for m in model_management.current_loaded_models)
    assert vl.offload() is False


def test_dtype_choice():
    assert transformers_model.auto_dtype(torch.device("cpu")) == torch.float32
    with pytest.raises(ValueError, match="unknown dtype 'int8': expected one of 'auto', 'bf16', 'fp16', 'fp32'"):
        transformers_model.load_transformers_vl("/nonexistent", "int8")


# ---------------------------------------------------------------------------- model folders

@pytest.fixture
def model_dirs(tmp_path, monkeypatch):
    """Fresh text_encoders / LLM roots in folder_paths (restored afterwards)."""
    llm, te = tmp_path / "LLM", tmp_path / "text_encoders"
    llm.mkdir()
    te.mkdir()
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "LLM", ([str(llm)], set()))
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "text_encoders", ([str(te)], {".safetensors"}))
    return llm, te


def write_config(folder, model_type="qwen3_vl"):
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model_type": model_type}))


def test_list_and_resolve_vl_folders(model_dirs, tmp_path):
    llm, te = model_dirs
    write_config(llm / "Qwen3-VL-4B-Instruct")
    write_config(llm / "Qwen" / "Qwen3-VL-tiny")
    write_config(te / "qwen3-4b-hf", model_type="qwen3")
    (llm / "not-a-model").mkdir()
    (te / "some_file.safetensors").write_bytes(b"")
    write_config(tmp_path / "outside")
    assert model_folders.list_vl_folders() == ["Qwen/Qwen3-VL-tiny", "Qwen3-VL-4B-Instruct", "qwen3-4b-hf"]
    assert model_folders.resolve_vl_folder("Qwen3-VL-4B-Instruct") == str(llm / "Qwen3-VL-4B-Instruct")
    assert model_folders.resolve_vl_folder("Qwen/Qwen3-VL-tiny") == str(llm / "Qwen" / "Qwen3-VL-tiny")
    with pytest.raises(ValueError, match="not a Qwen3-VL model.*'qwen3'"):
        model_folders.resolve_vl_folder("qwen3-4b-hf")
    for bad in ["../outside", "Qwen/../../outside", str(tmp_path / "outside"), "", "not-a-model", "missing"]:
        with pytest.raises(ValueError):
            model_folders.resolve_vl_folder(bad)


def test_llm_folder_registered_on_demand(monkeypatch):
    monkeypatch.delitem(folder_paths.folder_names_and_paths, "LLM", raising=False)
    model_folders.register_folders()
    assert folder_paths.get_folder_paths("LLM") == [os.path.join(folder_paths.models_dir, "LLM")]
    model_folders.register_folders()   # idempotent
    assert folder_paths.get_folder_paths("LLM") == [os.path.join(folder_paths.models_dir, "LLM")]


@pytest.mark.parametrize("h,w", [(64, 96), (50, 70), (20, 20), (33, 1000), (3700, 3700)])
def test_resize_rule_is_the_hosts(h, w):
    """vl_core.preprocess.qwen_vl_resize gives the grid ComfyUI's own Qwen-VL preprocessing produces."""
    import comfy.text_encoders.qwen_vl as qwen_vl

    _, grid = qwen_vl.process_qwen2vl_images(torch.zeros(1, h, w, 3), patch_size=16)
    rh, rw = preprocess.qwen_vl_resize(h, w, 32)
    assert grid.flatten().tolist()[1:] == [rh // 16, rw // 16]


def test_backend_selection_needs_exactly_one(native_clip):
    for clip, vl_model in ((None, None), (native_clip, object())):
        with pytest.raises(ValueError, match="connect exactly one backend"):
            backends.vl_encoder(clip, vl_model)
    with pytest.raises(ValueError, match="vl_model must come from 'Load Qwen3-VL \\(transformers\\)', got str"):
        backends.vl_encoder(None, "a string")
    assert isinstance(backends.vl_encoder(native_clip), native_clip_mod.NativeQwen3VLEncoder)


def test_nodes_share_one_encoder_per_clip_held_weakly(hf_tiny_path):
    """Node runs get the clip's long-lived encoder (its runner and CUDA graphs carry over), a clone its own;
    neither the cache nor the encoder keeps the clip alive."""
    import gc
    import weakref

    clip = tiny_models.make_native_tiny_qwen3vl_clip(hf_tiny_path, hidden_size=256)
    before = len(native_clip_mod._SHARED)
    enc = backends.vl_encoder(clip)
    image = picture(64, 64, 44)
    first = enc.encode([image], PROMPT, [2], "after_image")
    runner = enc._runner
    again = backends.vl_encoder(clip)
    assert again is enc and again._runner is runner
    assert torch.equal(again.encode([image], PROMPT, [2], "after_image").hidden[2], first.hidden[2])
    clone = clip.clone()
    assert backends.vl_encoder(clone) is not enc and backends.vl_encoder(clone) is backends.vl_encoder(clone)
    alive = weakref.ref(clip)
    del clip, clone, again
    gc.collect()
    assert alive() is None and len(native_clip_mod._SHARED) == before
    with pytest.raises(RuntimeError, match="clip no longer exists"):
        enc.encode([image], PROMPT, [2], "after_image")


def test_graph_key_follows_the_tensors_the_modules_hold_now(hf_tiny_path):
    """ComfyUI's weight patching puts new Parameter objects into the modules (set_attr_param): the CUDA-graph key of
    the part holding them (vision tower or language model) changes with them, the other part's stays (a stale key
    would replay a graph over the replaced weights), and the runner holds no reference to the replaced Parameter."""
    import gc
    import weakref

    import comfy.utils

    clip = tiny_models.make_native_tiny_qwen3vl_clip(hf_tiny_path, hidden_size=256)
    enc = native_clip_mod.NativeQwen3VLEncoder(clip)
    enc.encode([picture(64, 64, 45)], PROMPT, [2], "after_image")
    runner, wires = enc._runner, [((1, 64, 64, 3), torch.float32)]       # each image's (shape, dtype) on the device

    def keys():
        return runner._vision_key(wires, False), runner._lm_key([1, 2, 3], wires, [2], False)

    before = keys()
    assert None not in before and keys() == before
    vision = next(n for n, p in enc._transformer.named_parameters() if n.startswith("visual.blocks.0.") and p.dim() == 2)
    for name, part in (("model.layers.1.mlp.up_proj.weight", 1), (vision, 0)):
        old = comfy.utils.get_attr(enc._transformer, name)
        replaced = weakref.ref(old)
        comfy.utils.set_attr_param(enc._transformer, name, old.detach().clone())
        del old
        gc.collect()
        assert replaced() is None
        after = keys()
        assert after[part] != before[part] and after[part][:-1] == before[part][:-1]     # only the addresses moved
        assert after[1 - part] == before[1 - part]
        before = after
    half = [((1, 64, 64, 3), torch.float16)]                     # a graph's input buffers keep a dtype
    assert runner._vision_key(half, False) != before[0] and runner._lm_key([1, 2, 3], half, [2], False) != before[1]
    other = [((1, 96, 64, 3), torch.float32)]                    # same ids, other image size: other MRoPE positions
    assert runner._lm_key([1, 2, 3], other, [2], False) != before[1]


def test_only_single_sequences_get_a_graph_key(native, monkeypatch):
    """A batched forward (encode_many's same-size chunk) never captures a CUDA graph, whose pool would hold the
    batch's activations for the encoder's lifetime; single encodes do. (Graph keys are asked for as if on a GPU.)"""
    runner_cls = tiny_models.import_pack("vl_core.encoders.qwen3vl_runner").Qwen3VLRunner
    asked = []
    monkeypatch.setattr(runner_cls, "_graphs_possible", lambda self: True)
    monkeypatch.setattr(runner_cls, "_vision_key", lambda self, wires, fused: asked.append(
        int(wires[0][0][0]) if wires else 1))
    images = [picture(64, 64, 46), picture(64, 64, 47)]
    many = native.encode_many(images, PROMPT, [2], "after_image")
    assert native.last_path == "fast" and asked == []
    single = native.encode([images[1]], PROMPT, [2], "after_image")
    assert asked == [1]
    torch.testing.assert_close(many[1].hidden[2], single.hidden[2], atol=1e-5, rtol=1e-4)


@pytest.fixture
def load_calls(monkeypatch):
    """Counts of ComfyUI's load_models_gpu and the fast path's weight check (both still run for real)."""
    calls = {"load": 0, "check": 0}
    real_load, real_check = model_management.load_models_gpu, native_clip_mod.unsupported_weights

    def load(*args, **kwargs):
        calls["load"] += 1
        return real_load(*args, **kwargs)

    def check(*args, **kwargs):
        calls["check"] += 1
        return real_check(*args, **kwargs)

    monkeypatch.setattr(model_management, "load_models_gpu", load)
    monkeypatch.setattr(native_clip_mod, "unsupported_weights", check)
    return calls


def test_resident_model_is_not_reloaded_until_comfy_touches_it(native_clip, load_calls):
    """A fully loaded, unchanged model skips load_models_gpu and the weight check; a weight patch (LoRA-like
    clone), an unload or another clone of it taking its place loads it again, with the patched weights used."""
    image, layers = picture(64, 64, 40), [2, 4]
    enc = native_clip_mod.NativeQwen3VLEncoder(native_clip)
    first = enc.encode([image], PROMPT, layers, "after_image")
    load_calls.update(load=0, check=0)
    again = enc.encode([image], PROMPT, layers, "after_image")
    assert load_calls == {"load": 0, "check": 0} and enc.last_path == "fast"
    assert all(torch.equal(again.hidden[k], first.hidden[k]) for k in layers)

    patched_clip = native_clip.clone()
    key = next(k for k in patched_clip.patcher.model_state_dict() if k.endswith("layers.0.mlp.down_proj.weight"))
    weight = patched_clip.patcher.model_state_dict()[key]
    assert patched_clip.patcher.add_patches({key: (torch.randn_like(weight),)}, 1.0) == [key]
    patched = native_clip_mod.NativeQwen3VLEncoder(patched_clip)
    got = patched.encode([image], PROMPT, layers, "after_image")
    assert load_calls["load"] == 1 and load_calls["check"] == 1 and patched.last_path == "fast"
    assert not torch.allclose(got.hidden[4], first.hidden[4])       # the patched weight is what ran
    load_calls.update(load=0, check=0)
    assert torch.equal(patched.encode([image], PROMPT, layers, "after_image").hidden[4], got.hidden[4])
    assert load_calls == {"load": 0, "check": 0}
    patched_clip.patcher.add_patches({key: (torch.randn_like(weight),)}, 1.0)   # a second patch on the loaded one
    twice = patched.encode([image], PROMPT, layers, "after_image")
    assert load_calls["load"] == 1 and not torch.allclose(twice.hidden[4], got.hidden[4])
    load_calls.update(load=0)

    back = enc.encode([image], PROMPT, layers, "after_image")      # the clone replaced it: load the original
    assert load_calls["load"] == 1 and all(torch.equal(back.hidden[k], first.hidden[k]) for k in layers)
    assert enc.offload() is True
    load_calls.update(load=0)
    assert torch.equal(enc.encode([image], PROMPT, layers, "after_image").hidden[4], first.hidden[4])
    assert load_calls["load"] == 1


def test_a_freed_clones_object_patch_is_undone_before_the_fast_path(native_clip, load_calls):
    """Another node's clone with an object patch (no weight patch: same patches_uuid) is loaded, then freed:
    ComfyUI hands its loaded record to the original, whose module still holds the patch until a load undoes it."""
    import gc

    image, layers = picture(64, 64, 42), [2, 4]
    enc = native_clip_mod.NativeQwen3VLEncoder(native_clip)
    first = enc.encode([image], PROMPT, layers, "after_image")
    other = native_clip.clone()
    key = next(k for k in other.patcher.model_state_dict() if k.endswith("layers.0.mlp.down_proj.weight"))
    weight = other.patcher.model_state_dict()[key]
    other.patcher.add_object_patch(key, torch.nn.Parameter(torch.randn_like(weight), requires_grad=False))
    model_management.load_models_gpu([other.patcher])
    del other
    gc.collect()
    load_calls.update(load=0)
    again = enc.encode([image], PROMPT, layers, "after_image")
    assert load_calls["load"] == 1 and enc.last_path == "fast"
    assert all(torch.equal(again.hidden[k], first.hidden[k]) for k in layers)


def test_transformers_vl_model_skips_reload_while_resident(hf_tiny_path, hf_encoder, load_calls):
    vl = transformers_model.load_transformers_vl(hf_tiny_path, "fp32")
    image = picture(64, 96, 41)
    first = vl.encode([image], PROMPT, [2], "after_image")
    lm = vl.encoder.model.model.language_model
    assert packed_layers(lm) == len(lm.layers)          # q/k/v packed after the load: one GEMM, same numbers
    assert packed_layers(hf_encoder.model.model.language_model) == 0
    assert torch.equal(first.hidden[2], hf_encoder.encode([image], PROMPT, [2], "after_image").hidden[2])
    load_calls.update(load=0)
    assert torch.equal(vl.encode([image], PROMPT, [2], "after_image").hidden[2], first.hidden[2])
    assert load_calls["load"] == 0
    assert vl.offload() is True
    assert torch.equal(vl.encode([image], PROMPT, [2], "after_image").hidden[2], first.hidden[2])
    assert load_calls["load"] == 1 and any(m.model is vl.patcher for m in model_management.current_loaded_models)


def test_projections_are_packed_after_every_load_and_patches_still_run(native_clip, host, load_calls, monkeypatch):
    """The fast path stores each layer's q/k/v weights as one block after ComfyUI loads them (same values, same
    bytes); a LoRA-like patch of a packed q_proj on a clone, the original loading back, and weights reloaded under
    an equal residency token all end packed again with the right weights used (ComfyUI's encode as reference)."""
    image, layers = picture(64, 64, 43), [1, 4]
    enc = native_clip_mod.NativeQwen3VLEncoder(native_clip)
    lm = enc._transformer.model          # ComfyUI's decoder modules
    nbytes = sum(p.nbytes for p in lm.parameters())
    runner_cls, joint_gemms = tiny_models.import_pack("vl_core.encoders.qwen3vl_runner").Qwen3VLRunner, []
    real_joint = runner_cls._joint_linear
    monkeypatch.setattr(runner_cls, "_joint_linear",
                        lambda self, ms, x: joint_gemms.append(real_joint(self, ms, x)) or joint_gemms[-1])
    first = enc.encode([image], PROMPT, layers, "after_image")
    assert enc.last_path == "fast" and packed_layers(lm) == len(lm.layers)
    assert len(joint_gemms) == 8 and all(y is not None for y in joint_gemms)   # layers 1..4: q/k/v, gate/up
    assert sum(p.nbytes for p in lm.parameters()) == nbytes
    want = host.encode([image], PROMPT, layers, "after_image")
    for layer in layers:
        torch.testing.assert_close(first.hidden[layer], want.hidden[layer], atol=5e-5, rtol=1e-4)

    patched_clip = native_clip.clone()
    key = next(k for k in patched_clip.patcher.model_state_dict() if k.endswith("layers.1.self_attn.q_proj.weight"))
    weight = patched_clip.patcher.model_state_dict()[key]
    patched_clip.patcher.add_patches({key: (0.5 * torch.randn_like(weight),)}, 1.0)
    patched = native_clip_mod.NativeQwen3VLEncoder(patched_clip)
    got = patched.encode([image], PROMPT, layers, "after_image")
    assert patched.last_path == "fast" and packed_layers(lm) == len(lm.layers)
    ref = native_clip_mod.NativeQwen3VLEncoder(patched_clip, engine="host").encode([image], PROMPT, layers,
                                                                                   "after_image")
    assert not torch.allclose(got.hidden[4], first.hidden[4], atol=1e-3)      # the patched q_proj ran
    torch.testing.assert_close(got.hidden[4], ref.hidden[4], atol=5e-5, rtol=1e-4)

    back = enc.encode([image], PROMPT, layers, "after_image")        # the original loads back: unpatched, packed
    assert packed_layers(lm) == len(lm.layers)
    assert all(torch.equal(back.hidden[k], first.hidden[k]) for k in layers)

    att = lm.layers[0].self_attn               # what a reload does to the tensors, with the residency unchanged
    with torch.no_grad():
        for proj in (att.q_proj, att.k_proj, att.v_proj):
            proj.weight.data = proj.weight.data.clone()
    assert packed_layers(lm) == len(lm.layers) - 1
    load_calls.update(load=0)
    enc.graphs._seen["a graph key over the old addresses"] = 1
    again = enc.encode([image], PROMPT, layers, "after_image")
    assert load_calls["load"] == 0 and packed_layers(lm) == len(lm.layers)
    assert not enc.graphs._seen                 # weights moved: graphs over the old addresses released
    assert all(torch.equal(again.hidden[k], first.hidden[k]) for k in layers)

    mlp = lm.layers[2].mlp                     # a middle layer's weights swapped under the same token
    with torch.no_grad():
        for proj in (mlp.gate_proj, mlp.up_proj):
            proj.weight.data = proj.weight.data.clone()
    middle = enc.encode([image], PROMPT, layers, "after_image")
    assert packed_layers(lm) == len(lm.layers)
    assert all(torch.equal(middle.hidden[k], first.hidden[k]) for k in layers)



def test_a_residency_token_from_before_an_unload_packs_nothing(native):
    """offload() forgets the residency token forward packs under; a token left anyway (the model unloaded behind
    the encoder's back) packs nothing while the weights are not on the runner's device."""
    native.encode([picture(64, 64, 48)], PROMPT, [2], "after_image")
    runner = native._runner
    token = runner.residency
    assert token is not None
    native.offload()
    assert runner.residency is None
    device, runner.device = runner.device, torch.device("cuda", 0)      # the weights are elsewhere now
    try:
        assert runner.pack_projections(token) == 0
    finally:
        runner.device = device
