"""Backend tests: one tiny Hugging Face Qwen3-VL per session; native (ComfyUI) tests only with a host.

Without a ComfyUI host (env COMFYUI_PATH, default ~/ComfyUI) the native test module is not collected and
one line says so at the end of the run; the transformers tests still run (with a synthetic tokenizer).
"""
from __future__ import annotations

import os
import sys

import pytest

TESTS_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPO_ROOT = os.path.dirname(TESTS_DIR)
for p in (REPO_ROOT, TESTS_DIR):
    if p not in sys.path:
        sys.path.insert(0, p)

from tools import tiny_models  # noqa: E402

HOST = tiny_models.comfy_path()
NATIVE_MODULES = ["test_native_qwen3vl.py"]
if HOST is None:
    collect_ignore = NATIVE_MODULES
else:
    tiny_models.prepare_comfy()


def pytest_terminal_summary(terminalreporter):
    if HOST is None:
        terminalreporter.write_line(
            "!!! NO ComfyUI HOST: native Qwen3-VL backend tests (tests/backends/test_native_qwen3vl.py) were NOT "
            "run; set COMFYUI_PATH to a ComfyUI checkout", red=True, bold=True)


@pytest.fixture(scope="session")
def hf_tiny_path(tmp_path_factory) -> str:
    return tiny_models.make_hf_tiny_qwen3vl(str(tmp_path_factory.mktemp("Qwen3-VL-tiny")), hidden_size=256, seed=0)


TRANSFORMERS_4 = int(__import__("transformers").__version__.split(".")[0]) < 5


@pytest.fixture(scope="session")
def hf_encoder(hf_tiny_path):
    """The default engine ("auto" = the fast runner over the HF modules)."""
    from vl_core.encoders.transformers_qwen3vl import TransformersQwen3VL

    if TRANSFORMERS_4:
        pytest.skip("transformers 4.x: the transformers backend refuses it (test_backend_refuses_transformers_4)")

    enc = TransformersQwen3VL.from_pretrained(hf_tiny_path, dtype=None, device="cpu")
    assert enc.fast_runner() is not None
    return enc


@pytest.fixture(scope="session")
def hf_exact(hf_encoder):
    """Same model and tokenizer, engine "hf": the transformers forward stopped early by hooks."""
    from vl_core.encoders.transformers_qwen3vl import TransformersQwen3VL

    return TransformersQwen3VL(hf_encoder.model, hf_encoder.tokenizer, source=hf_encoder.source, engine="hf")
