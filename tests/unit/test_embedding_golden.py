"""The embedding-level techniques reproduce their recorded outputs (to float rounding: same dtype and shape,
values within a few ulps — CPU kernel paths differ between machines, e.g. AVX2 vs AVX-512 reductions, so the
bits recorded on one machine are not the bits of another; measured on an AVX-512 EPYC: ≤ 1 ulp-scale).

tests/data/embedding_golden.safetensors holds fixed inputs, the settings of 158 node runs (Embedding Blend
over every mode × length × normalize, Style Delta, AdaIN) and their outputs, plus VL Inspect's reports.
They were written by the nodes as they stood BEFORE the one-recipe-per-technique refactor (commit bd52693,
"Golden outputs of the embedding-level nodes ..."), so these tests pin those numbers. Regenerate only for a
deliberate change of a technique's numbers, never to make a failing test pass:

    ~/.cache/comfyui-zimage-vl/venv/bin/python -m tests.unit.test_embedding_golden --write
"""
from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from safetensors import safe_open

from tools.tiny_models import comfy_path, import_pack, prepare_comfy
from vl_core import techniques

FIXTURE = Path(__file__).resolve().parents[1] / "data" / "embedding_golden.safetensors"
WIDTH = 12


def inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(20261201)
    vl = torch.randn(1, 17, WIDTH, generator=g) * 3 + 0.5
    vl[:, 3:13, 5] *= 40  # a loud image dim, and a quiet one: Inspect's report lists both
    vl[:, 3:13, 8] /= 40
    return {
        "text_a": torch.randn(2, 6, WIDTH, generator=g) * 2,            # float32, batch 2, with attention mask
        "text_b": (torch.randn(1, 3, WIDTH, generator=g)).to(torch.bfloat16),  # bf16, batch 1, no mask
        "vl": vl,
        "vl_style": torch.randn(1, 17, WIDTH, generator=g) * 2 + 1,
        "vl_neutral": torch.randn(1, 17, WIDTH, generator=g) * 2,
    }


def cases() -> list[tuple[str, dict]]:
    out = []
    for mode, length, norm, alpha in itertools.product(("linear", "slerp", "graduated"),
                                                       ("pool", "attention_pool", "truncate", "concat"),
                                                       ("none", "global", "per_dim", "hybrid"), (0.3, 1.0)):
        for budget in ((0, 5) if length == "concat" else (0,)):
            out.append(("blend", dict(alpha=alpha, mode=mode, length=length, normalize=norm, token_budget=budget)))
    out.append(("blend", dict(alpha=0.0, mode="slerp", length="concat", normalize="global", token_budget=0)))
    out.append(("blend", dict(alpha=0.0, mode="graduated", length="pool", normalize="per_dim", token_budget=0)))
    for strength, norm, length in itertools.product((0.3, -1.0, 0.0), (True, False),
                                                    ("pool", "attention_pool", "truncate")):
        out.append(("style_delta", dict(strength=strength, normalize=norm, length=length)))
    for mode, weight, length in itertools.product(("per_token", "per_dim"), (0.5, 1.0, 0.0),
                                                  ("pool", "attention_pool", "truncate")):
        out.append(("adain", dict(mode=mode, weight=weight, length=length)))
    return out


def embeds(hidden: torch.Tensor, vl_embeds_cls, prompt: str = "describe the style"):
    return vl_embeds_cls(hidden={34: hidden}, image_spans=((3, 13),), prompt_span=(13, 15), num_layers=36,
                         prompt=prompt, source="golden", image_sizes=((96, 128),))


def conditioning(t: dict[str, torch.Tensor]) -> list:
    mask = torch.ones(2, 6, dtype=torch.int64)
    return [[t["text_a"], {"attention_mask": mask, "pooled_output": None}], [t["text_b"], {}]]


def run_node(nodes, kind: str, settings: dict, t: dict[str, torch.Tensor], vl_embeds_cls) -> list:
    cond = conditioning(t)
    if kind == "blend":
        return nodes.EmbeddingBlend.execute(cond, embeds(t["vl"], vl_embeds_cls), **settings).args[0]
    if kind == "style_delta":
        return nodes.StyleDelta.execute(cond, embeds(t["vl_style"], vl_embeds_cls),
                                        embeds(t["vl_neutral"], vl_embeds_cls), **settings).args[0]
    return nodes.AdaIN.execute(cond, embeds(t["vl"], vl_embeds_cls), **settings).args[0]


def inspect_reports(inspect_node, t, vl_embeds_cls) -> list[str]:
    vl = embeds(t["vl"], vl_embeds_cls)
    return [inspect_node.execute(vl, 10.0).args[1],
            inspect_node.execute(vl, 4.0, conditioning=conditioning(t)).args[1]]


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and raw bits (so -0.0 and +0.0 differ, NaN payloads count)."""
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    return (a.dtype == b.dtype and a.shape == b.shape
            and torch.equal(a.contiguous().view(ints[a.element_size()]), b.contiguous().view(ints[b.element_size()])))


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype and shape, and |a − b| ≤ 4 ulps of the dtype at the tensor's scale (NaN/Inf where the other has)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    eps = torch.finfo(a.dtype).eps
    scale = max(1.0, float(b.float().abs().max())) if b.numel() else 1.0
    return torch.allclose(a.float(), b.float(), rtol=4 * eps, atol=4 * eps * scale, equal_nan=True)


def recorded():
    with safe_open(str(FIXTURE), "pt") as f:
        meta = f.metadata()
    tensors = load_file(str(FIXTURE))
    t = {k[3:]: v for k, v in tensors.items() if k.startswith("in.")}
    return t, json.loads(meta["cases"]), json.loads(meta["inspect_reports"]), tensors


def assert_outputs_match(i: int, kind: str, settings: dict, out: list, tensors: dict) -> None:
    assert len(out) == 2, (kind, settings)
    for j, (tensor, options) in enumerate(out):
        want = tensors[f"out.{i}.{j}"]
        assert close(tensor, want), (f"{kind} {settings} entry {j}: max |diff| "
                                          f"{(tensor.float() - want.float()).abs().max() if tensor.shape == want.shape else tensor.shape}")
        assert (f"mask.{i}.{j}" in tensors) == ("attention_mask" in options)
        if "attention_mask" in options:
            assert torch.equal(options["attention_mask"], tensors[f"mask.{i}.{j}"])


def like(vl: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """nodes.common.vl_tokens_like on a bare tensor: float32, a batch-1 encoding expanded to the text batch."""
    return vl.float().expand(text.shape[0], -1, -1)


RECIPES = {  # node kind → (text, recorded inputs, settings) → the recipe's output, called as the node calls it
    "blend": lambda text, t, s: techniques.embedding_blend(text, like(t["vl"], text), s["alpha"], s["mode"],
                                                            s["length"], s["normalize"], s["token_budget"]),
    "style_delta": lambda text, t, s: techniques.embedding_style_delta(
        text, like(t["vl_style"], text), like(t["vl_neutral"], text), s["strength"], s["normalize"], s["length"]),
    "adain": lambda text, t, s: techniques.embedding_adain(text, like(t["vl"], text), s["mode"], s["weight"],
                                                           s["length"]),
}


def test_recipes_reproduce_the_recorded_outputs():
    t, cases_, _, tensors = recorded()
    for i, (kind, settings) in enumerate(cases_):
        for j, (text, _) in enumerate(conditioning(t)):
            got, want = RECIPES[kind](text, t, settings), tensors[f"out.{i}.{j}"]
            assert close(got, want), (kind, settings, j)


def test_recorded_outputs_are_not_trivial():
    """The fixture would pin nothing if the outputs were the inputs: most cases must change the text."""
    t, cases_, _, tensors = recorded()
    kept = {i for i, (_, s) in enumerate(cases_) if 0.0 in (s.get("alpha"), s.get("strength"), s.get("weight"))}
    assert len(kept) == 14  # the alpha/strength/weight-0 cases return the text exactly ...
    for i in range(len(cases_)):  # ... and only they
        assert bits_equal(tensors[f"out.{i}.0"], t["text_a"]) == (i in kept)
        assert bits_equal(tensors[f"out.{i}.1"], t["text_b"]) == (i in kept)


@pytest.fixture(scope="module")
def pack():
    if comfy_path() is None:
        pytest.skip("no ComfyUI host: the nodes' recorded outputs were not checked (vl_core's were)")
    prepare_comfy()
    return import_pack("nodes.blend"), import_pack("nodes.inspector").VLInspect, import_pack("vl_core.types").VLEmbeds


def test_embedding_nodes_reproduce_the_recorded_outputs(pack):
    blend_nodes, _, vl_embeds_cls = pack
    t, cases_, _, tensors = recorded()
    assert cases_ == [[kind, settings] for kind, settings in cases()]  # the fixture is what cases() describes
    for i, (kind, settings) in enumerate(cases_):
        assert_outputs_match(i, kind, settings, run_node(blend_nodes, kind, settings, t, vl_embeds_cls), tensors)


def test_inspect_node_reproduces_the_recorded_reports_and_draws_an_image(pack, tmp_path):
    import folder_paths

    _, inspect_node, vl_embeds_cls = pack
    t, _, reports, _ = recorded()
    previous = folder_paths.get_temp_directory()
    folder_paths.set_temp_directory(str(tmp_path))   # the node's preview goes to the host's temp folder
    try:
        assert inspect_reports(inspect_node, t, vl_embeds_cls) == reports
        out = inspect_node.execute(embeds(t["vl"], vl_embeds_cls), 10.0)
    finally:
        folder_paths.set_temp_directory(previous)
    assert out.args[0].ndim == 4 and out.args[0].shape[0] == 1 and out.args[0].shape[-1] == 3
    assert out.ui["text"] == (reports[0],)
    (preview,) = out.ui["images"]   # the plot shown on the node itself
    assert preview["type"] == "temp" and (tmp_path / preview["subfolder"] / preview["filename"]).is_file()


def main() -> None:
    prepare_comfy()
    blend_nodes = import_pack("nodes.blend")
    inspect_node = import_pack("nodes.inspector").VLInspect
    vl_embeds_cls = import_pack("vl_core.types").VLEmbeds
    t = inputs()
    tensors = {f"in.{k}": v for k, v in t.items()}
    meta_cases = []
    for i, (kind, settings) in enumerate(cases()):
        out = run_node(blend_nodes, kind, settings, t, vl_embeds_cls)
        for j, (tensor, options) in enumerate(out):
            tensors[f"out.{i}.{j}"] = tensor.clone().contiguous()
            if "attention_mask" in options:
                tensors[f"mask.{i}.{j}"] = options["attention_mask"].clone().contiguous()
        meta_cases.append([kind, settings])
    meta = {"cases": json.dumps(meta_cases), "inspect_reports": json.dumps(inspect_reports(inspect_node, t,
                                                                                           vl_embeds_cls))}
    save_file(tensors, str(FIXTURE), metadata=meta)
    print(f"wrote {FIXTURE}: {len(meta_cases)} cases")


if __name__ == "__main__" and sys.argv[1:] == ["--write"]:
    main()
