"""Direction / calibration files: exact round trips, and every broken field refused naming the file and field."""
import json
import math

import pytest
import torch
from safetensors.torch import save_file

from vl_core.calibrate import VLCalibration, apply_calibration, check_calibration_for
from vl_core.research_files import CALIBRATION, DIRECTION, read, write
from vl_core.steer import VLDirection, apply_directions
from vl_core.types import VLEmbeds


def direction(k=2, d=8, **changes) -> VLDirection:
    v = torch.randn(k, d, generator=torch.Generator().manual_seed(0))
    fields = dict(vector=v / v.square().sum(-1).mean().sqrt(), scale=2.5, layers=(5,), num_layers=8,
                  method="pca", pairs=3, explained_variance=0.75, agreement=(0.9, 0.8, -0.1), prompt="a cat")
    return VLDirection(**{**fields, **changes})


def calibration(kind="linear", d=8, **changes) -> VLCalibration:
    g = torch.Generator().manual_seed(1)
    weight = torch.randn(d, d, generator=g) if kind == "linear" else torch.rand(d, generator=g) + 0.5
    fields = dict(kind=kind, weight=weight, bias=torch.randn(d, generator=g), vl_layers=(5,), num_layers=8,
                  text_layer="-2", lam=1e-3, held_out={"map": {"rel_error": 0.1, "cosine": 0.9},
                                                       "identity": {"rel_error": 1.2, "cosine": float("nan")},
                                                       "prompts": 4, "lambda_scores": {"0.001": 0.1}},
                  num_prompts=20, num_tokens=200, warnings=("few tokens",))
    return VLCalibration(**{**fields, **changes})


def embeds(d=8, layers=(5,)) -> VLEmbeds:
    x = torch.randn(1, 6, d, generator=torch.Generator().manual_seed(2))
    return VLEmbeds(hidden={layer: x.clone() for layer in layers}, image_spans=((1, 4),), prompt_span=(4, 6),
                    num_layers=8)


def test_a_direction_round_trips_exactly_and_applies_like_the_original(tmp_path):
    d = direction(explained_variance=float("nan"))
    path = str(tmp_path / "d.safetensors")
    write(DIRECTION, d, path)
    back = read(DIRECTION, path)
    assert torch.equal(back.vector, d.vector) and math.isnan(back.explained_variance)
    assert (back.scale, back.layers, back.num_layers, back.method, back.pairs, back.agreement, back.prompt) == \
           (d.scale, d.layers, d.num_layers, d.method, d.pairs, d.agreement, d.prompt)
    cond = torch.randn(1, 5, 8)
    assert torch.equal(apply_directions(cond, [(back, 0.3)]), apply_directions(cond, [(d, 0.3)]))


@pytest.mark.parametrize("kind", ["affine", "linear"])
def test_a_calibration_round_trips_exactly_and_maps_like_the_original(tmp_path, kind):
    c = calibration(kind)
    path = str(tmp_path / "c.safetensors")
    write(CALIBRATION, c, path)
    back = read(CALIBRATION, path)
    assert torch.equal(back.weight, c.weight) and torch.equal(back.bias, c.bias)
    assert (back.kind, back.vl_layers, back.num_layers, back.text_layer, back.lam, back.num_prompts,
            back.num_tokens, back.warnings) == (c.kind, c.vl_layers, c.num_layers, c.text_layer, c.lam,
                                                c.num_prompts, c.num_tokens, c.warnings)
    assert back.held_out["map"] == c.held_out["map"] and math.isnan(back.held_out["identity"]["cosine"])
    vl = embeds()
    assert torch.equal(apply_calibration(back, vl).tokens(), apply_calibration(c, vl).tokens())


def test_layer_mixes_round_trip_and_a_loaded_map_for_another_mix_is_refused(tmp_path):
    from vl_core.layer_mix import select_layers
    d = direction(layers=(3, 5), layer_weights={3: 0.25, 5: 0.75})
    write(DIRECTION, d, path := str(tmp_path / "d.safetensors"))
    assert read(DIRECTION, path).layer_weights == {3: 0.25, 5: 0.75}
    assert read(DIRECTION, _saved(tmp_path, direction())).layer_weights is None
    c = calibration(vl_layers=(3, 5), vl_layer_weights={3: 0.25, 5: 0.75})
    write(CALIBRATION, c, path := str(tmp_path / "c.safetensors"))
    back = read(CALIBRATION, path)
    assert back.vl_layer_weights == {3: 0.25, 5: 0.75}
    check_calibration_for(back, select_layers(embeds(layers=(3, 5)), [3, 5], {3: 1.0, 5: 3.0}))
    with pytest.raises(ValueError, match="fitted at the layer mix"):
        check_calibration_for(back, embeds(layers=(3, 5)))


def _saved(tmp_path, value, kind=DIRECTION) -> str:
    path = str(tmp_path / "v.safetensors")
    write(kind, value, path)
    return path


def test_a_loaded_map_or_direction_for_another_width_or_layer_is_refused_when_applied(tmp_path):
    path = str(tmp_path / "c.safetensors")
    write(CALIBRATION, calibration(), path)
    back = read(CALIBRATION, path)
    with pytest.raises(ValueError, match="fitted at VL layer"):
        check_calibration_for(back, embeds(layers=(6,)))
    with pytest.raises(ValueError, match="width"):
        check_calibration_for(back, embeds(d=16))
    write(DIRECTION, direction(), path2 := str(tmp_path / "d.safetensors"))
    with pytest.raises(ValueError, match="width 8 does not match conditioning width 16"):
        apply_directions(torch.randn(1, 4, 16), [(read(DIRECTION, path2), 1.0)])


def _rewrite(path, tensors: dict, key: str, **meta_changes) -> None:
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        meta = json.loads(f.metadata()[key])
    for k, v in meta_changes.items():
        if v is ...:
            meta.pop(k)
        else:
            meta[k] = v
    save_file(tensors, path, metadata={key: json.dumps(meta)})


GOOD_VECTOR = {"vector": torch.ones(2, 8) / math.sqrt(8)}
DIRECTION_CASES = [
    (GOOD_VECTOR, {"format": "other"}, "'format'"),
    (GOOD_VECTOR, {"version": 99}, "'version'"),
    (GOOD_VECTOR, {"scale": "big"}, "'scale'"),
    (GOOD_VECTOR, {"scale": -1.0}, "'scale'"),
    (GOOD_VECTOR, {"layers": [9]}, "'layers'"),
    (GOOD_VECTOR, {"layers": []}, "'layers'"),
    (GOOD_VECTOR, {"method": "magic"}, "'method'"),
    (GOOD_VECTOR, {"pairs": 1.5}, "'pairs'"),
    (GOOD_VECTOR, {"agreement": [2.0]}, "'agreement'"),
    (GOOD_VECTOR, {"prompt": 3}, "'prompt'"),
    (GOOD_VECTOR, {"num_layers": ...}, "'num_layers' is missing"),
    (GOOD_VECTOR, {"width": 9}, "'width'"),
    (GOOD_VECTOR, {"layer_weights": {"4": 1.0}}, "'layer_weights'"),
    (GOOD_VECTOR, {"layer_weights": {"5": 0.0}}, "'layer_weights'"),
    (GOOD_VECTOR, {"layer_weights": [1.0]}, "'layer_weights'"),
    ({"vector": torch.ones(8)}, {}, "'tensor vector' has shape"),
    ({"vector": torch.ones(2, 8, dtype=torch.int32)}, {}, "'tensor vector' has dtype I32"),
    ({"vector": torch.full((2, 8), float("nan"))}, {}, "'tensor vector' contains 16 NaN/Inf"),
    ({**GOOD_VECTOR, "extra": torch.ones(1)}, {}, "'tensors'"),
]


@pytest.mark.parametrize("tensors,changes,needle", DIRECTION_CASES)
def test_a_broken_direction_file_is_refused_naming_the_file_and_field(tmp_path, tensors, changes, needle):
    path = str(tmp_path / "bad.safetensors")
    write(DIRECTION, direction(), path)
    _rewrite(path, tensors, "vl_direction", **changes)
    with pytest.raises(ValueError) as ei:
        read(DIRECTION, path, label="dirs/bad.safetensors")
    assert type(ei.value) is ValueError
    assert "dirs/bad.safetensors" in str(ei.value) and needle in str(ei.value), str(ei.value)


GOOD_MAP = {"weight": torch.eye(8), "bias": torch.zeros(8)}
CALIBRATION_CASES = [
    (GOOD_MAP, {"kind": "cubic"}, "'kind'"),
    (GOOD_MAP, {"kind": "affine"}, "'tensor weight' has shape [8, 8]"),
    (GOOD_MAP, {"lam": float("inf")}, "'lam'"),
    (GOOD_MAP, {"vl_layers": ["5"]}, "'vl_layers'"),
    (GOOD_MAP, {"text_layer": None}, "'text_layer'"),
    (GOOD_MAP, {"held_out": []}, "'held_out'"),
    (GOOD_MAP, {"held_out": {"map": {"rel_error": "x"}}}, "'held_out.map.rel_error'"),
    (GOOD_MAP, {"warnings": [1]}, "'warnings'"),
    (GOOD_MAP, {"num_tokens": -1}, "'num_tokens'"),
    (GOOD_MAP, {"vl_layer_weights": {"5": "x"}}, "'vl_layer_weights'"),
    (GOOD_MAP, {"vl_layer_weights": {"5": 1.0, "6": 1.0}}, "'vl_layer_weights'"),
    ({"weight": torch.eye(8)}, {}, "'tensors'"),
    ({"weight": torch.eye(8), "bias": torch.zeros(7)}, {}, "'tensor weight' has shape"),
    ({"weight": torch.eye(8), "bias": torch.tensor([float("inf")] * 8)}, {}, "'tensor bias' contains 8"),
]


@pytest.mark.parametrize("tensors,changes,needle", CALIBRATION_CASES)
def test_a_broken_calibration_file_is_refused_naming_the_file_and_field(tmp_path, tensors, changes, needle):
    path = str(tmp_path / "bad.safetensors")
    write(CALIBRATION, calibration(), path)
    _rewrite(path, tensors, "vl_calibration", **changes)
    with pytest.raises(ValueError) as ei:
        read(CALIBRATION, path, label="cal/bad.safetensors")
    assert type(ei.value) is ValueError
    assert "cal/bad.safetensors" in str(ei.value) and needle in str(ei.value), str(ei.value)


def test_other_files_are_refused_with_what_to_do(tmp_path):
    emb = str(tmp_path / "e.safetensors")
    embeds().to_safetensors(emb)
    with pytest.raises(ValueError, match="not a VL direction .*Save VL Direction"):
        read(DIRECTION, emb)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ")
    with pytest.raises(ValueError, match="cannot read .* as safetensors VL calibration"):
        read(CALIBRATION, str(junk))
    (tmp_path / "empty.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="interrupted"):
        read(CALIBRATION, str(tmp_path / "empty.safetensors"))


def test_an_unloadable_value_is_refused_before_anything_is_written(tmp_path):
    path = tmp_path / "d.safetensors"
    with pytest.raises(ValueError, match="would not load back"):
        write(DIRECTION, direction(vector=torch.full((1, 8), float("nan"))), str(path))
    with pytest.raises(ValueError, match="cannot save VLEmbeds as a VL direction"):
        write(DIRECTION, embeds(), str(path))
    assert not path.exists()
