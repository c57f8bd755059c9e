"""The fused (torch.compile) elementwise steps of the fast runner against their eager twins, on the CPU.

Compilation is forced with fusion mode "sync" (the default is eager on the CPU); inductor's CPU backend
compiles each step once (≈ 30 s for the first one in a fresh process). Tolerance: fp32, relative Frobenius
difference ≤ 1e-5 per state (the compiled steps keep intermediates in fp32 registers and reduce in another
order; they are not bit-identical).
"""
from __future__ import annotations

import pytest
import torch

from tools import tiny_models

fusion = tiny_models.import_pack("vl_core.encoders.fusion")
steps = tiny_models.import_pack("vl_core.encoders.fused_steps")
tq = tiny_models.import_pack("vl_core.encoders.transformers_qwen3vl")

PROMPT = "a red cat on a blue sofa"
TOL = 1e-5


def picture(h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(h, w, 3, generator=torch.Generator().manual_seed(seed))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def unique_graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def encode(enc, image, layers):
    return enc.encode([image], PROMPT, layers, "after_image").hidden


@pytest.fixture(scope="module")
def fused_encoder(hf_encoder):
    """A second transformers encoder over the session's tiny fp32 model, its runner in fusion mode "sync"."""
    enc = tq.TransformersQwen3VL(hf_encoder.model, hf_encoder.tokenizer, source=hf_encoder.source)
    enc.fast_runner().fusion = fusion.Fusion("sync")
    return enc


def test_fused_encode_matches_eager_and_compiles_once_for_every_size(fused_encoder):
    enc = fused_encoder
    runner = enc.fast_runner()
    layers = list(range(enc.num_layers + 1))
    key = runner._fusion_key()
    image = picture(64, 96)

    eager = encode(enc, image, layers)      # eager steps; compiles them afterwards (mode sync: inline)
    assert fusion.Fusion.status()["failed"] is None
    assert runner.fusion.ops(key, runner.device).fused

    # every step against its eager twin on random inputs of the widths the model uses
    with torch.inference_mode():
        g = torch.Generator().manual_seed(3)
        examples = steps.step_examples(runner, 37, 96)
        compiled = runner.fusion.ops(key, runner.device)
        def randomized(a):      # same dtype and layout (a recompile would hide behind a new graph), random values
            if not torch.is_tensor(a) or a.ndim < 2:
                return a
            values = (torch.randn(a.shape, generator=g) if a.is_floating_point()
                      else torch.randint(0, 4, a.shape, generator=g))     # taps into the table's first rows
            return a.clone().copy_(values)

        for name, args in [(n, a) for n, v in examples.items() for a in (v if isinstance(v, list) else [v])]:
            args = tuple(map(randomized, args))
            got, want = getattr(compiled, name)(*args), steps.STEPS[name](*args)
            for x, y in zip(got, want) if isinstance(want, tuple) else [(got, want)]:
                assert x.shape == y.shape
                assert rel(x, y) <= TOL, name

    graphs = unique_graphs()
    fused = encode(enc, image, layers)
    for layer in layers:
        assert rel(fused[layer], eager[layer]) <= TOL, layer
        assert not torch.equal(fused[layer], eager[layer]) or layer == 0   # the compiled steps did run

    # another image size and a batch: the same compiled graphs (rows are dynamic), same numbers as eager
    other = picture(96, 64, seed=1)
    fused_other = encode(enc, other, layers)
    many = enc.encode_many([other, picture(96, 64, seed=2)], PROMPT, [2, enc.num_layers], "after_image")
    assert unique_graphs() == graphs
    runner.fusion = fusion.Fusion("off")
    try:
        eager_other = encode(enc, other, layers)
        eager_many = enc.encode_many([other, picture(96, 64, seed=2)], PROMPT, [2, enc.num_layers], "after_image")
    finally:
        runner.fusion = fusion.Fusion("sync")
    for layer in layers:
        assert rel(fused_other[layer], eager_other[layer]) <= TOL, layer
    for a, b in zip(many, eager_many):
        for layer in (2, enc.num_layers):
            assert rel(a.hidden[layer], b.hidden[layer]) <= TOL


def test_fallback_is_eager_when_compile_is_off(hf_encoder, monkeypatch):
    enc = tq.TransformersQwen3VL(hf_encoder.model, hf_encoder.tokenizer, source=hf_encoder.source)
    runner = enc.fast_runner()
    cpu = torch.device("cpu")
    assert runner.fusion.mode == "off" and not runner.fusion.wanted(torch.device("cuda"))  # opt-in (see fusion.py)
    assert not fusion.Fusion("auto").wanted(cpu)                                 # auto on the CPU: eager
    assert not fusion.Fusion("auto").uncaptured and fusion.Fusion("sync").uncaptured  # auto: only in CUDA graphs
    monkeypatch.setenv(fusion.ENV_MODE, "0")
    off = fusion.Fusion()
    assert off.mode == "off" and not off.wanted(cpu) and not off.wanted(torch.device("cuda"))
    runner.fusion = off
    key = runner._fusion_key()
    calls = []
    monkeypatch.setattr(fusion._COMPILER, "warm", lambda *a: calls.append(a))
    out = encode(enc, picture(64, 64), [2])
    assert calls == [] and runner.fusion.ops(key, cpu) is fusion.EAGER
    monkeypatch.undo()
    # eager = the transformers-exact reference path of this backend
    assert torch.equal(out[2], encode(hf_encoder, picture(64, 64), [2])[2])
    with pytest.raises(ValueError, match="ZIMAGE_VL_COMPILE"):
        fusion.Fusion("fast")


def test_failed_compile_falls_back_for_good(monkeypatch):
    monkeypatch.setattr(fusion._COMPILER, "failed", None)

    def broken():
        raise RuntimeError("no compiler")

    monkeypatch.setattr(fusion._COMPILER, "compiled", broken)
    f = fusion.Fusion("sync")
    cpu = torch.device("cpu")
    f.after_encode(("test-key",), cpu, lambda: {})
    assert fusion._COMPILER.failed and "no compiler" in fusion._COMPILER.failed
    assert not f.wanted(cpu) and f.ops(("test-key",), cpu) is fusion.EAGER and not fusion.Fusion.busy()


def test_compile_cache_dir_is_outside_the_repo(monkeypatch, tmp_path):
    monkeypatch.delenv(fusion.ENV_CACHE, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert fusion.compile_cache_dir() == str(tmp_path / "comfyui-zimage-vl" / "inductor")
    monkeypatch.setenv(fusion.ENV_CACHE, str(tmp_path / "mine"))
    assert fusion.compile_cache_dir() == str(tmp_path / "mine")


def test_compile_workers_only_until_the_pack_compiled_into_the_cache(tmp_path, monkeypatch):
    import torch._inductor.config as inductor_config

    (tmp_path / "fxgraph" / "ab").mkdir(parents=True)          # another compile's graphs do not count
    assert fusion.compile_threads(str(tmp_path), 16) == 16
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("TORCHINDUCTOR_COMPILE_THREADS", raising=False)
    before = inductor_config.compile_threads
    fusion._Compiler().warm(("threads-test",), {}, torch.device("cpu"))   # a warm-up that succeeds
    assert inductor_config.compile_threads == before               # the process's setting is back
    assert fusion.compile_threads(str(tmp_path), 16) == 1
    with fusion._warm_up_compile_threads(str(tmp_path)):
        assert inductor_config.compile_threads == 1
    monkeypatch.setenv("TORCHINDUCTOR_COMPILE_THREADS", "3")
    with fusion._warm_up_compile_threads(str(tmp_path)):
        assert inductor_config.compile_threads == before           # the env var wins (inductor reads it)
    assert inductor_config.compile_threads == before


@pytest.mark.skipif(tiny_models.comfy_path() is None, reason="needs a ComfyUI host (COMFYUI_PATH)")
def test_native_fused_encode_matches_eager(hf_tiny_path, fused_encoder, monkeypatch):
    native_clip = tiny_models.import_pack("nodes.native_clip")
    clip = tiny_models.make_native_tiny_qwen3vl_clip(hf_tiny_path, hidden_size=256)
    monkeypatch.setenv(fusion.ENV_MODE, "sync")
    native = native_clip.NativeQwen3VLEncoder(clip)
    layers = [1, 3, native.num_layers]
    image = picture(64, 96)
    eager = encode(native, image, layers)
    runner = native._runner
    assert native.last_path == "fast" and runner.fusion.mode == "sync"
    assert runner.fusion.ops(runner._fusion_key(), runner.device).fused
    fused = encode(native, image, layers)
    for layer in layers:
        assert rel(fused[layer], eager[layer]) <= TOL, layer
        assert not torch.equal(fused[layer], eager[layer])


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_gelu_epilogue_is_the_gelu_of_the_linear(device):
    """The fused vision fc1: torch._addmm_activation(use_gelu=True) is a GELU of x Wᵀ + b (cuBLASLt's tanh
    GELU_BIAS epilogue on CUDA; its CPU kernel uses the erf GELU, 3e-5 away, so the CPU keeps the eager twin)."""
    g = torch.Generator().manual_seed(4)
    x, w, b = (torch.randn(*s, generator=g).to(device) for s in ((2, 37, 48), (80, 48), (80,)))
    want = steps.linear_gelu_tanh(x, w, b)
    op = torch._addmm_activation(b, x.reshape(-1, 48), w.t(), use_gelu=True).view(2, 37, 80)
    assert rel(op, want) <= 1e-4 and rel(op, torch.relu(torch.nn.functional.linear(x, w, b))) > 1e-2
    fused = steps.linear_gelu_tanh_epilogue(x, w, b)
    assert torch.equal(fused, want) if device == "cpu" else rel(fused, want) <= 1e-4
    assert fusion.EAGER.linear_gelu_tanh is steps.linear_gelu_tanh
