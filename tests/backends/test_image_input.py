"""The runner's image input and CUDA graphs: pinned staging uploads, the vision tower's input steps (patch rows,
interpolated position embedding) against the reference preprocessing, and graph replays of new images.

The CUDA tests need a GPU (pinned memory, DMA, graphs): they run on the GPU machine (bench/README.md) and skip here.
"""
from __future__ import annotations

import pytest
import torch

from tools import tiny_models

staging_mod = tiny_models.import_pack("vl_core.encoders.staging")
steps = tiny_models.import_pack("vl_core.encoders.fused_steps")
preprocess = tiny_models.import_pack("vl_core.preprocess")

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned staging uploads need CUDA")


def picture(*shape, seed=0):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("layout", ["contiguous", "permuted"])
def test_patch_rows_are_to_patches_of_each_image(layout):
    """B images of one non-square size → the rows preprocess.to_patches gives each, image after image, exactly
    (also for images that are views in another memory layout, e.g. a channels-first tensor permuted)."""
    images = picture(2, 64, 96, 3, seed=1)
    if layout == "permuted":
        images = images.permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1)
        assert not images.is_contiguous()
    got = steps.patch_rows(steps.image_windows(images, 16, 2), 0.5, 0.5, 2, torch.float32)
    want = torch.cat([preprocess.to_patches(im, 16, 2, 2, 0.5, 0.5)[0] for im in images])
    assert torch.equal(got, want)
    assert steps.patch_rows(steps.image_windows(images, 16, 2), 0.5, 0.5, 2, torch.bfloat16).dtype == torch.bfloat16


def test_position_rows_repeat_per_image():
    """add_position over B images' rows adds the same interpolated embedding to each image; its compiled form
    (row i reads patch i mod P) is the same sum."""
    g = torch.Generator().manual_seed(2)
    p, d = 24, 8
    table, x = torch.randn(16, d, generator=g), torch.randn(3 * p, d, generator=g)
    taps, w = torch.randint(0, 16, (p, 4), generator=g), torch.rand(p, 4, generator=g)
    pos = (table[taps] * w[:, :, None]).sum(1)
    got = steps.add_position(x, table, taps, w)
    for b in range(3):
        torch.testing.assert_close(got[b * p:(b + 1) * p], x[b * p:(b + 1) * p] + pos)
    assert torch.equal(steps.add_position_rows(x, table, taps, w), got)


def test_cpu_targets_are_not_staged():
    staging, image = staging_mod.HostStaging(), picture(1, 32, 32, 3)
    assert staging.upload(image, "cpu", torch.float16) is image          # no wire dtype on the CPU
    assert staging._buffers == {}


@cuda
def test_staged_uploads_reuse_their_buffer_and_keep_each_image():
    """Same-shape uploads share one pinned buffer, rewritten only after its DMA: each upload holds its own image
    (float16 on the wire); a tensor already on the GPU is only converted (one dtype for the forward)."""
    staging = staging_mod.HostStaging()
    images = [picture(1, 64, 96, 3, seed=s) for s in range(4)]
    got = [staging.upload(image, "cuda", torch.float16) for image in images]
    assert len(staging._buffers) == 1
    for g, image in zip(got, images):
        assert g.dtype == torch.float16 and torch.equal(g.cpu(), image.half())
    on_gpu = images[1].cuda()
    assert staging.upload(on_gpu, "cuda", torch.float16).dtype == torch.float16


@cuda
@pytest.mark.parametrize("fusion_mode", ["off", "sync"])
def test_cuda_encodes_replay_with_each_new_image(hf_tiny_path, fusion_mode):
    """On a GPU: a first encode runs eagerly, the second identical one is captured (vision tower and language model
    as two graphs), later ones replay them; a new prompt over the same image size replays the vision graph and runs
    (then captures) the language model; text-only prompts capture the language model alone. The staging uploads
    feed each encode its own pixels (a stale buffer or a missed DMA would repeat an earlier image's states),
    with the fused steps compiled (sync) or not, within fp32 rounding of the CPU encode."""
    tq = tiny_models.import_pack("vl_core.encoders.transformers_qwen3vl")
    fusion = tiny_models.import_pack("vl_core.encoders.fusion")
    gpu = tq.TransformersQwen3VL.from_pretrained(hf_tiny_path, dtype=torch.float32, device="cuda")
    cpu = tq.TransformersQwen3VL.from_pretrained(hf_tiny_path, dtype=torch.float32, device="cpu")
    gpu.fast_runner().fusion = fusion.Fusion(fusion_mode)
    layers = [2, gpu.num_layers]
    plan = [("a cat", True)] * 4 + [("a dog on a sofa", True)] * 3 + [("only text", False)] * 3
    for step, (prompt, with_image) in enumerate(plan):
        images = [picture(64, 96, 3, seed=10 + step)] if with_image else []
        got = gpu.encode(images, prompt, layers, "after_image").hidden
        want = cpu.encode([im.half().float() for im in images], prompt, layers, "after_image").hidden   # fp16 wire
        for layer in layers:
            err = float((got[layer] - want[layer]).norm() / want[layer].norm())
            assert err <= 1e-4, (step, prompt, layer, err)
        if step == 3:
            assert len(gpu.graphs) == 2         # vision + language model of the first prompt
    assert len(gpu.graphs) == 4 and not gpu.graphs.broken    # + the second prompt's LM + the text-only LM


@cuda
def test_a_kept_language_model_graph_replays_after_its_vision_graph_went(hf_tiny_path):
    """Graphs leave the cache one by one (least recently used): where only the vision graph went, the next encode
    captures it again and replays the language model's (no second capture of a graph still there)."""
    tq = tiny_models.import_pack("vl_core.encoders.transformers_qwen3vl")
    gpu = tq.TransformersQwen3VL.from_pretrained(hf_tiny_path, dtype=torch.float32, device="cuda")
    cpu = tq.TransformersQwen3VL.from_pretrained(hf_tiny_path, dtype=torch.float32, device="cpu")
    for seed in range(2):
        gpu.encode([picture(64, 64, 3, seed=seed)], "a cat", [2], "after_image")
    vision = [k for k in gpu.graphs._graphs if k[0] == "vision"]
    assert len(vision) == 1 and len(gpu.graphs) == 2
    del gpu.graphs._graphs[vision[0]]
    captured = []
    real = gpu.graphs.capture
    gpu.graphs.capture = lambda key, *a, **kw: captured.append(key[0]) or real(key, *a, **kw)
    image = picture(64, 64, 3, seed=7)
    got = gpu.encode([image], "a cat", [2], "after_image").hidden[2]
    want = cpu.encode([image.half().float()], "a cat", [2], "after_image").hidden[2]
    assert captured == ["vision"] and len(gpu.graphs) == 2
    assert float((got - want).norm() / want.norm()) <= 1e-4


def test_same_elements_sees_views_of_the_same_pixels_only():
    """Prefetched copies are matched to uploads by memory: image and image[None] are the same elements; a copy,
    another crop of the same storage or a permuted view are not."""
    image = picture(8, 12, 3)
    assert staging_mod.same_elements(image, image[None])
    assert not staging_mod.same_elements(image, image.clone())
    assert not staging_mod.same_elements(image, image[:4])
    assert not staging_mod.same_elements(image, image.permute(1, 0, 2))
    assert not staging_mod.same_elements(image, image.half())


@cuda
def test_prefetched_copies_feed_their_own_uploads_and_are_dropped_after_the_block():
    """Copies started by a prefetch block give each upload its own pixels (through a view, into a given device
    buffer too); one not uploaded inside the block is gone after it; a tensor not prefetched is staged as before."""
    staging = staging_mod.HostStaging()
    a, b, c = (picture(64, 96, 3, seed=s) for s in range(3))
    def pending(t, dtype=torch.float16):
        return any(staging_mod.same_elements(p.source, t) and p.dtype == dtype for p in staging._pending)

    with staging.prefetched([a, b, c], [torch.float16] * 3):
        assert pending(a[None]) and not pending(a, torch.float32)
        got_a = staging.upload(a[None], "cuda", torch.float16)
        into = torch.empty(64, 96, 3, dtype=torch.float16, device="cuda")
        got_b = staging.upload(b, "cuda", torch.float16, out=into)
        other = picture(64, 96, 3, seed=9)
        got_other = staging.upload(other, "cuda", torch.float16)
        assert pending(c)
        with staging.prefetched([c], [torch.float16]):      # nested: shares the open block's copy
            assert len(staging._pending) == 1
        assert pending(c)
    assert staging._pending == []
    assert got_b is into
    for got, want in ((got_a, a[None]), (got_b, b), (got_other, other)):
        assert torch.equal(got.cpu(), want.half())


@cuda
def test_a_failed_prefetched_copy_raises_at_its_upload(monkeypatch):
    staging = staging_mod.HostStaging()
    image = picture(32, 32, 3)

    def broken(buf, t):
        raise RuntimeError("copy failed")

    monkeypatch.setattr(staging, "_fill", broken)
    with staging.prefetched([image], [torch.float16]):
        with pytest.raises(RuntimeError, match="copy failed"):
            staging.upload(image, "cuda", torch.float16)
    assert staging._pending == []


@cuda
def test_no_staging_thread_at_shutdown_leaves_the_upload_to_copy(monkeypatch):
    """Where the staging thread takes no more work (the interpreter shutting down), a prefetch starts nothing and
    keeps its buffer; the upload copies for itself."""
    staging, image = staging_mod.HostStaging(), picture(32, 32, 3)
    staging.upload(image, "cuda", torch.float16)             # one buffer in the pool

    class Closed:
        def submit(self, job):
            raise RuntimeError("cannot schedule new futures after interpreter shutdown")

    monkeypatch.setattr(staging_mod, "_staging_thread", lambda: Closed())
    with staging.prefetched([image], [torch.float16]):
        assert staging._pending == [] and len(staging._buffers) == 1
        assert torch.equal(staging.upload(image, "cuda", torch.float16).cpu(), image.half())


@cuda
def test_replayed_encodes_dma_into_the_vision_graphs_own_input(hf_tiny_path):
    """Once the vision graph exists, an encode's prefetched image goes by DMA straight into that graph's input
    buffer (no second device copy), each encode with its own pixels; an encode that raises leaves nothing
    pending."""
    tq = tiny_models.import_pack("vl_core.encoders.transformers_qwen3vl")
    gpu = tq.TransformersQwen3VL.from_pretrained(hf_tiny_path, dtype=torch.float32, device="cuda")
    cpu = tq.TransformersQwen3VL.from_pretrained(hf_tiny_path, dtype=torch.float32, device="cpu")
    for seed in range(2):
        gpu.encode([picture(64, 64, 3, seed=seed)], "a cat", [2], "after_image")
    staging = gpu.fast_runner().staging
    real, into = staging.upload, []

    def spy(t, device, dtype=None, out=None):
        into.append(out)
        return real(t, device, dtype, out=out)

    staging.upload = spy
    vision_inputs = [g["images"][0] for k, g in gpu.graphs._graphs.items() if k[0] == "vision"]
    for seed in (5, 6):
        image = picture(64, 64, 3, seed=seed)
        got = gpu.encode([image], "a cat", [2], "after_image").hidden[2]
        want = cpu.encode([image.half().float()], "a cat", [2], "after_image").hidden[2]
        assert float((got - want).norm() / want.norm()) <= 1e-4
    assert len(into) == 2 and all(o is vision_inputs[0] for o in into)
    with pytest.raises(ValueError):
        gpu.encode([picture(64, 64, 3)], "a cat", [999], "after_image")
    assert staging._pending == []


@pytest.mark.parametrize("copy_running", [True, False])
def test_graphed_inputs_scan_the_key_beside_whichever_host_wait_is_left(copy_running):
    """The graphed input step (no GPU needed for the order): each image's DMA goes into the graph cache's buffer
    for its wire; the vision key is built after the uploads are issued (beside their DMA), except while a
    prefetched copy still runs, when it is built first (beside the copy's end, before the upload waits for it)."""
    graphs_mod = tiny_models.import_pack("vl_core.encoders.qwen3vl_graphs")
    calls, image = [], picture(1, 32, 32, 3)

    class Stub:
        device = torch.device("cpu")
        staging = type("S", (), {"copying": staticmethod(lambda t, dtype: copy_running)})()
        graphs = type("G", (), {"input_buffer": staticmethod(lambda shape, dtype, device: ("buffer", shape, dtype))})()

        def _wire_dtype(self, t):
            return torch.float16

        def upload(self, t, out=None):
            calls.append(("upload", out))
            return t

        def _vision_key(self, wires, fused):
            calls.append(("key", tuple(wires)))
            return "vkey"

    images, wires, vkey = graphs_mod.GraphedForward._inputs(Stub(), [image], True, False)
    wire = ((1, 32, 32, 3), torch.float16)
    upload, key = ("upload", ("buffer",) + wire), ("key", (wire,))
    assert calls == ([key, upload] if copy_running else [upload, key])
    assert vkey == "vkey" and wires == [wire] and images == [image]
