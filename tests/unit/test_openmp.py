"""openmp.team_size: the OpenMP team of torch's CPU ops narrowed for the calling thread only, restored after."""
import sys
import threading

import pytest
import torch

from vl_core.encoders import openmp

needs_runtime = pytest.mark.skipif(
    not sys.platform.startswith("linux") or openmp._runtime() is None or torch.get_num_threads() < 2,
    reason="needs torch's OpenMP runtime in /proc/self/maps (Linux) and ≥ 2 threads")


@needs_runtime
def test_team_size_narrows_this_thread_only_and_restores_it():
    own = torch.get_num_threads()
    seen = {}

    def other():
        seen["other"] = torch.get_num_threads()

    with openmp.team_size(1):
        seen["inside"] = torch.get_num_threads()
        t = threading.Thread(target=other)
        t.start()
        t.join()
        a = torch.arange(100_000, dtype=torch.float32)
        b = torch.empty(100_000, dtype=torch.float16)
        b.copy_(a)                                   # a parallel copy still right on a narrowed team
    assert seen == {"inside": 1, "other": own}
    assert torch.equal(b.float(), a.half().float())
    assert torch.get_num_threads() == own
    with pytest.raises(RuntimeError, match="boom"):
        with openmp.team_size(1):
            raise RuntimeError("boom")
    assert torch.get_num_threads() == own           # restored on an error too


@needs_runtime
def test_a_thread_new_to_torch_keeps_torchs_count_after_the_block():
    """ComfyUI runs nodes on a worker thread: its first torch op inside the block must not leave it on a count
    other than torch's own."""
    seen = {}

    def plain():
        seen["plain"] = torch.get_num_threads()

    def narrowed():
        with openmp.team_size(1):
            torch.empty(200_000, dtype=torch.float16).copy_(torch.ones(200_000))
            seen["inside"] = torch.get_num_threads()
        seen["after"] = torch.get_num_threads()

    own = torch.get_num_threads()
    torch.set_num_threads(own + 1)      # torch's count ≠ OpenMP's default: what a new thread starts with
    try:
        for fn in (plain, narrowed):
            t = threading.Thread(target=fn)
            t.start()
            t.join()
    finally:
        torch.set_num_threads(own)
    assert seen["plain"] == own + 1
    assert seen["inside"] == 1 and seen["after"] == seen["plain"]


def test_team_size_leaves_the_count_alone_where_it_would_not_narrow():
    own = torch.get_num_threads()
    for n in (None, 0, own, own + 8):
        with openmp.team_size(n):
            assert torch.get_num_threads() == own
    assert torch.get_num_threads() == own


@needs_runtime
def test_the_staging_copy_runs_on_the_narrowed_team(monkeypatch):
    from vl_core.encoders import staging as staging_mod

    seen = []
    real = staging_mod.team_size

    def spy(n):
        seen.append(n)
        return real(n)

    monkeypatch.setattr(staging_mod, "team_size", spy)
    if not torch.cuda.is_available():
        pytest.skip("the staging copy is the CUDA upload's")
    staging = staging_mod.HostStaging()
    image = torch.rand(1, 64, 64, 3)
    out = staging.upload(image, "cuda", torch.float16)
    assert seen == [staging_mod.HostStaging.copy_threads]
    torch.testing.assert_close(out.cpu().float(), image, atol=2 ** -11, rtol=0)
