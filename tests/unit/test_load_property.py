"""Loading any mutation of a valid embeddings file gives a valid VLEmbeds or a ValueError naming the file —
never another exception (header bytes, metadata keys/values/types, dtypes, shapes, truncation)."""
import json
import os
import struct
import tempfile

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from vl_core.embeds_file import FLOAT_DTYPES
from vl_core.types import VLEmbeds

SETTINGS = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow])
LABEL = "mutant.safetensors"


def base() -> VLEmbeds:
    g = torch.Generator().manual_seed(0)
    return VLEmbeds(hidden={5: torch.randn(1, 8, 4, generator=g), 7: torch.randn(1, 8, 4, generator=g)},
                    image_spans=((1, 4),), prompt_span=(5, 7), num_layers=8, source="tiny", prompt="a cat",
                    image_sizes=((64, 96),), extra={"outlier_dims": {"5": [1]}})


def check_load(path) -> None:
    try:
        vl = VLEmbeds.from_safetensors(path, label=LABEL)
    except ValueError as e:
        assert LABEL in str(e), str(e)
        return
    # accepted: it must be a sound VLEmbeds that downstream code can use
    assert isinstance(vl, VLEmbeds) and vl.layers and all(t.is_floating_point() for t in vl.hidden.values())
    b, n, d = next(iter(vl.hidden.values())).shape
    assert b >= 1 and n >= 1 and d >= 1
    assert all(0 <= s < e <= n for s, e in vl.image_spans) and 0 <= vl.prompt_span[0] <= vl.prompt_span[1] <= n
    assert all(0 <= layer <= vl.num_layers for layer in vl.layers)
    assert all(torch.isfinite(t).all() for t in vl.hidden.values())
    assert isinstance(vl.source, str) and isinstance(vl.prompt, str) and isinstance(vl.extra, dict)
    vl.image_mask(), vl.tokens(), vl.metadata(), [vl.layer_label(layer) for layer in vl.layers]


def written(tensors, meta) -> str:
    fd, path = tempfile.mkstemp(suffix=".safetensors")
    os.close(fd)
    save_file(tensors, path, metadata=None if meta is None else {"vl_embeds": meta})
    return path


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8)
small_ints = st.integers(-3, 12)
field_values = st.one_of(json_values, small_ints, st.lists(small_ints, max_size=3),
                         st.lists(st.lists(small_ints, max_size=3), max_size=3))
META_KEYS = list(base().metadata())


@SETTINGS
@given(changes=st.dictionaries(st.sampled_from(META_KEYS + ["unknown"]), field_values, max_size=3),
       drop=st.lists(st.sampled_from(META_KEYS), max_size=2))
def test_mutated_metadata_values_and_types(changes, drop):
    meta = base().metadata() | changes
    for key in drop:
        meta.pop(key, None)
    path = written({f"hidden.{k}": t for k, t in base().hidden.items()}, json.dumps(meta))
    try:
        check_load(path)
    finally:
        os.unlink(path)


@SETTINGS
@given(raw=st.one_of(st.none(), st.text(max_size=40), json_values.map(json.dumps),
                     st.integers(1, 3000).map(lambda n: "[" * n + "]" * n)))
def test_mutated_metadata_string(raw):
    path = written({"hidden.5": torch.zeros(1, 8, 4)}, raw)
    try:
        check_load(path)
    finally:
        os.unlink(path)


DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int8, torch.uint8, torch.int32,
          torch.int64, torch.bool, torch.float8_e4m3fn, torch.float8_e5m2]


@SETTINGS
@given(dtype=st.sampled_from(DTYPES), shape=st.lists(st.integers(0, 9), min_size=0, max_size=4),
       keys=st.sampled_from([["hidden.5"], ["hidden.5", "hidden.7"], ["hidden.05"], ["hidden.x"], ["other"],
                             ["hidden.5", "extra"], ["hidden.-1"]]),
       special=st.sampled_from([None, float("nan"), float("inf"), 1e30]))
def test_mutated_tensors(dtype, shape, keys, special):
    t = torch.randn(*shape) if shape else torch.tensor(1.0)
    if special is not None and t.numel():
        t.view(-1)[0] = special
    t = t.to(dtype)
    meta = base().metadata() | {"layers": [5, 7] if len(keys) == 2 else [5]}
    path = written({k: t.clone() for k in keys}, json.dumps(meta))
    try:
        check_load(path)
    finally:
        os.unlink(path)


def _valid_bytes() -> bytes:
    path = written({f"hidden.{k}": t for k, t in base().hidden.items()}, json.dumps(base().metadata()))
    try:
        with open(path, "rb") as f:
            return f.read()
    finally:
        os.unlink(path)


VALID = _valid_bytes()
HEADER_END = 8 + struct.unpack("<Q", VALID[:8])[0]


@SETTINGS
@given(flips=st.lists(st.tuples(st.integers(0, HEADER_END - 1), st.integers(0, 255)), min_size=1, max_size=6),
       cut=st.one_of(st.none(), st.integers(0, len(VALID))))
def test_mutated_header_bytes_and_truncation(flips, cut):
    data = bytearray(VALID)
    for pos, byte in flips:
        data[pos] = byte
    data = bytes(data[:cut] if cut is not None else data)
    fd, path = tempfile.mkstemp(suffix=".safetensors")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    try:
        check_load(path)
    finally:
        os.unlink(path)


def test_the_unmutated_file_loads():
    fd, path = tempfile.mkstemp(suffix=".safetensors")
    with os.fdopen(fd, "wb") as f:
        f.write(VALID)
    try:
        vl = VLEmbeds.from_safetensors(path)
        assert vl.metadata() == base().metadata()
    finally:
        os.unlink(path)
    assert set(FLOAT_DTYPES) == {"F16", "BF16", "F32", "F64"}
