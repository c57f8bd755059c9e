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
