"""The runner's image input: pinned staging uploads with their copies prefetched on a worker thread, and the vision
tower's input steps (patch rows, interpolated position embedding) against the reference preprocessing.

The staging tests need CUDA (pinned memory, DMA): they run on the GPU machine (bench/README.md) and skip here.
"""
from __future__ import annotations

import pytest
import torch

from tools import tiny_models

weights = tiny_models.import_pack("vl_core.encoders.weights")
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
    staging, image = weights.HostStaging(), picture(1, 32, 32, 3)
    staging.prefetch(image, "cpu", torch.float16)
    assert staging._early == {}
    assert staging.upload(image, "cpu", torch.float16) is image          # no wire dtype on the CPU
    assert staging.wire_dtype(image, "cpu", torch.float16) == torch.float32


@cuda
def test_prefetched_upload_is_the_plain_upload():
    staging = weights.HostStaging()
    images = [picture(1, 64, 96, 3, seed=s) for s in range(3)]
    for image in images:                 # same shape: one pinned buffer, reused once its DMA is done
        staging.prefetch(image, "cuda", torch.float16)
        got = staging.upload(image, "cuda", torch.float16)
        assert staging._early == {}
        assert got.dtype == torch.float16 and torch.equal(got.cpu(), image.half())
    plain = staging.upload(images[0], "cuda", torch.float16)
    assert torch.equal(plain.cpu(), images[0].half())
    on_gpu = images[1].cuda()           # not staged, still on the wire dtype (one dtype for the graph key)
    assert staging.upload(on_gpu, "cuda", torch.float16).dtype == torch.float16
    assert staging.wire_dtype(on_gpu, "cuda", torch.float16) == torch.float16


@cuda
def test_a_prefetch_nobody_took_never_serves_old_pixels():
    """A prefetched copy is dropped at the end of the block that made it: the same tensor changed in place later
    uploads its new values."""
    runner_mod = tiny_models.import_pack("vl_core.encoders.qwen3vl_runner")
    staging = weights.HostStaging()
    image = picture(1, 64, 64, 3, seed=4)
    stub = type("R", (), {"staging": staging, "device": torch.device("cuda", torch.cuda.current_device()),
                          "IMAGE_WIRE_DTYPE": torch.float16})()
    for name in ("_wire", "_prefetch", "prefetching"):
        setattr(type(stub), name, getattr(runner_mod.Qwen3VLRunner, name))
    with stub.prefetching([image]):
        assert len(staging._early) == 1          # started, but this block never uploads it
    assert staging._early == {}
    image.mul_(0.25)
    assert torch.equal(staging.upload(image, "cuda", torch.float16).cpu(), image.half())


def test_switch_interval_requests_restore_the_process_interval_in_any_order():
    """The compile thread and the staging thread each lower the GIL switch interval for a while; however their
    windows overlap, the shortest request applies meanwhile and the process's own interval comes back at the end."""
    import sys

    si = tiny_models.import_pack("vl_core.encoders.switch_interval")
    own = sys.getswitchinterval()
    try:
        sys.setswitchinterval(0.005)
        a = si.lower(0.0005)
        b = si.lower(0.0001)
        assert sys.getswitchinterval() == pytest.approx(0.0001)
        si.restore(b)
        assert sys.getswitchinterval() == pytest.approx(0.0005)
        b = si.lower(0.0001)
        si.restore(a)                               # the first one out first
        assert sys.getswitchinterval() == pytest.approx(0.0001)
        si.restore(b)
        si.restore(b)                               # twice: nothing
        assert sys.getswitchinterval() == pytest.approx(0.005)
        with si.lowered(0.001):
            assert sys.getswitchinterval() == pytest.approx(0.001)
        assert sys.getswitchinterval() == pytest.approx(0.005)
    finally:
        sys.setswitchinterval(own)


@cuda
@pytest.mark.parametrize("fusion_mode", ["off", "sync"])
def test_cuda_encodes_replay_with_each_new_image(hf_tiny_path, fusion_mode):
    """On a GPU: a first encode runs eagerly, the second identical one is captured (vision tower and language model
    as two graphs), later ones replay them; a new prompt over the same image size replays the vision graph and runs
    (then captures) the language model; text-only prompts capture the language model alone. The prefetched staging
    uploads feed each encode its own pixels (a stale buffer or a missed DMA would repeat an earlier image's states),
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
    assert gpu.fast_runner().staging._early == {}
