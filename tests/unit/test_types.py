import json
import pickle

import pytest
import torch
from safetensors.torch import save_file

from vl_core.types import VLEmbeds


def sample():
    g = torch.Generator().manual_seed(1)
    return VLEmbeds(hidden={31: torch.randn(1, 10, 6, generator=g).to(torch.bfloat16), 35: torch.randn(1, 10, 6, generator=g)},
                    image_spans=((2, 6),), prompt_span=(6, 8), num_layers=36, placement="before_image",
                    token_mode="full", source="tiny", prompt="a cat", image_sizes=((64, 128),), extra={"k": [1]})


def test_safetensors_round_trip_keeps_tensors_and_metadata(tmp_path):
    vl = sample()
    path = tmp_path / "e.safetensors"
    vl.to_safetensors(str(path))
    back = VLEmbeds.from_safetensors(str(path))
    assert back.layers == vl.layers
    for layer in vl.layers:
        assert back.hidden[layer].dtype == vl.hidden[layer].dtype and torch.equal(back.hidden[layer], vl.hidden[layer])
    assert back.metadata() == vl.metadata()


def test_pickle_and_corrupt_and_foreign_files_are_refused(tmp_path):
    pkl = tmp_path / "evil.safetensors"
    pkl.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(ValueError, match="corrupt or not a safetensors"):
        VLEmbeds.from_safetensors(str(pkl))
    good = tmp_path / "good.safetensors"
    sample().to_safetensors(str(good))
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[:-20])
    with pytest.raises(ValueError):
        VLEmbeds.from_safetensors(str(cut))
    foreign = tmp_path / "lora.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    with pytest.raises(ValueError, match="not VL embeddings"):
        VLEmbeds.from_safetensors(str(foreign))
    wrong = tmp_path / "wrong.safetensors"
    meta = sample().metadata() | {"layers": [1]}
    save_file({"hidden.31": torch.zeros(1, 2, 3)}, str(wrong), metadata={"vl_embeds": json.dumps(meta)})
    with pytest.raises(ValueError, match="do not match"):
        VLEmbeds.from_safetensors(str(wrong))


def test_layers_must_share_one_shape():
    with pytest.raises(ValueError, match="one shape"):
        VLEmbeds(hidden={1: torch.zeros(1, 3, 4), 2: torch.zeros(1, 4, 4)}, image_spans=(), prompt_span=(0, 0),
                 num_layers=4)
    with pytest.raises(ValueError, match="at least one"):
        VLEmbeds(hidden={}, image_spans=(), prompt_span=(0, 0), num_layers=4)


def _write(tmp_path, tensors=None, **meta_changes):
    vl = sample()
    meta = vl.metadata() | meta_changes
    tensors = tensors if tensors is not None else {f"hidden.{k}": t for k, t in vl.hidden.items()}
    path = tmp_path / "e.safetensors"
    save_file(tensors, str(path), metadata={"vl_embeds": json.dumps(meta)})
    return str(path)


@pytest.mark.parametrize("tensors,meta,field", [
    ({"hidden.31": torch.zeros(1, 10, 6, dtype=torch.int8), "hidden.35": torch.zeros(1, 10, 6)}, {}, "hidden.31"),
    ({"hidden.31": torch.zeros(1, 10, 6, dtype=torch.bool), "hidden.35": torch.zeros(1, 10, 6)}, {}, "hidden.31"),
    ({"hidden.31": torch.zeros(1, 10, 6, dtype=torch.uint8), "hidden.35": torch.zeros(1, 10, 6)}, {}, "hidden.31"),
    ({"hidden.31": torch.zeros(0, 10, 6), "hidden.35": torch.zeros(0, 10, 6)}, {}, "hidden.31"),
    ({"hidden.31": torch.zeros(1, 10, 6), "hidden.35": torch.zeros(1, 9, 6)}, {}, "hidden"),
    ({"hidden.31": torch.zeros(10, 6), "hidden.35": torch.zeros(10, 6)}, {}, "hidden.31"),
    ({"hidden.31": torch.full((1, 10, 6), float("nan")), "hidden.35": torch.zeros(1, 10, 6)}, {}, "hidden.31"),
    ({"hidden.x": torch.zeros(1, 10, 6)}, {}, "hidden.x"),
    (None, {"image_spans": [[2, 11]]}, "image_spans"),
    (None, {"image_spans": [[4, 6], [2, 5]]}, "image_spans"),
    (None, {"image_spans": [[3, 3]]}, "image_spans"),
    (None, {"image_spans": [["2", 6]]}, "image_spans"),
    (None, {"image_spans": "2-6"}, "image_spans"),
    (None, {"prompt_span": [8, 6]}, "prompt_span"),
    (None, {"prompt_span": [3, 5]}, "prompt_span"),
    (None, {"layers": [31, 35], "num_layers": 30}, "layers"),
    (None, {"num_layers": "36"}, "num_layers"),
    (None, {"num_layers": True}, "num_layers"),
    (None, {"token_mode": "all"}, "token_mode"),
    (None, {"token_mode": "text"}, "image_spans"),
    (None, {"placement": None}, "placement"),
    (None, {"source": "x" * 5_000_000}, "vl_embeds"),
    (None, {"source": "x" * 5000}, "source"),
    (None, {"source": 3}, "source"),
    (None, {"prompt": ["a"]}, "prompt"),
    (None, {"image_sizes": [[64]]}, "image_sizes"),
    (None, {"image_sizes": [[0, 64]]}, "image_sizes"),
    (None, {"extra": []}, "extra"),
    (None, {"width": 7}, "width"),
    (None, {"num_tokens": 11}, "num_tokens"),
    (None, {"version": 2}, "version"),
    (None, {"version": "1"}, "version"),
    (None, {"layers": [31, 31]}, "layers"),
])
def test_every_field_is_checked_and_named(tmp_path, tensors, meta, field):
    path = _write(tmp_path, tensors, **meta)
    with pytest.raises(ValueError) as e:
        VLEmbeds.from_safetensors(path, label="shared/e.safetensors")
    assert "shared/e.safetensors" in str(e.value) and field in str(e.value), str(e.value)


@pytest.mark.parametrize("raw,rule", [("{", "not valid JSON"), ("[1]", "JSON object"), ("[" * 5000 + "]" * 5000, "vl_embeds")])
def test_metadata_json_errors_are_value_errors(tmp_path, raw, rule):
    path = tmp_path / "e.safetensors"
    save_file({"hidden.31": torch.zeros(1, 10, 6)}, str(path), metadata={"vl_embeds": raw})
    with pytest.raises(ValueError, match=rule):
        VLEmbeds.from_safetensors(str(path))


def test_missing_key_and_empty_file_name_the_problem(tmp_path):
    meta = sample().metadata()
    del meta["token_mode"]
    path = tmp_path / "m.safetensors"
    save_file({"hidden.31": torch.zeros(1, 10, 6), "hidden.35": torch.zeros(1, 10, 6)}, str(path),
              metadata={"vl_embeds": json.dumps(meta)})
    with pytest.raises(ValueError, match="'token_mode' is missing"):
        VLEmbeds.from_safetensors(str(path))
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="interrupted"):
        VLEmbeds.from_safetensors(str(empty))


def test_files_of_the_previous_version_still_load(tmp_path):
    """The exact bytes layout VLEmbeds.to_safetensors wrote before the checks (version 1, every key)."""
    vl = sample()
    path = tmp_path / "old.safetensors"
    save_file({f"hidden.{k}": t.contiguous() for k, t in vl.hidden.items()}, str(path),
              metadata={"vl_embeds": json.dumps(vl.metadata())})
    assert VLEmbeds.from_safetensors(str(path)).metadata() == vl.metadata()


def test_save_side_refuses_what_would_not_load():
    from vl_core.embeds_file import check_writable

    check_writable(sample(), "vl_embeds")
    bad = VLEmbeds(hidden={3: torch.zeros(1, 4, 2, dtype=torch.int8)}, image_spans=(), prompt_span=(0, 0), num_layers=8)
    with pytest.raises(ValueError, match="vl_embeds.*dtype torch.int8"):
        check_writable(bad, "vl_embeds")
    big = VLEmbeds(hidden={3: torch.zeros(1, 4, 2)}, image_spans=(), prompt_span=(0, 0), num_layers=8, source="s" * 5000)
    with pytest.raises(ValueError, match="vl_embeds.*'source'"):
        check_writable(big, "vl_embeds")
