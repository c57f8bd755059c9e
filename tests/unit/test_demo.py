"""The demo's command line: --image and --out are the user's paths (relative to where they ran ./dev)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from tools import demo

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def caller(tmp_path, monkeypatch):
    monkeypatch.setenv("ZIMAGE_VL_CALLER_DIR", str(tmp_path))
    return tmp_path


def test_relative_paths_resolve_against_the_callers_directory(caller):
    (caller / "refs").mkdir()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(caller / "refs" / "pic.png")
    assert demo.reference_image("refs/pic.png") == str(caller / "refs" / "pic.png")
    assert demo.reference_image(str(caller / "refs" / "pic.png")) == str(caller / "refs" / "pic.png")
    assert demo.resolve_path("out") == caller / "out"


def test_no_image_means_the_built_in_reference(caller):
    assert demo.reference_image(None) == demo.DEFAULT_IMAGE


def test_a_missing_or_unreadable_image_is_refused_naming_where_it_looked(caller):
    with pytest.raises(ValueError, match=rf"--image 'missing.png': no such file \(looked for {caller}/missing.png"):
        demo.reference_image("missing.png")
    (caller / "notes.png").write_text("not a picture")
    with pytest.raises(ValueError, match="is not a picture PIL can read"):
        demo.reference_image("notes.png")


def test_dev_demo_with_a_missing_image_fails_before_starting_anything(tmp_path):
    """Through ./dev from another directory: exit status 2, the message, no output folder written."""
    if sys.prefix == sys.base_prefix:
        pytest.skip("not run from a virtual environment: ./dev would install into this interpreter")
    env = {k: v for k, v in os.environ.items() if k != "ZIMAGE_VL_CALLER_DIR"}
    env["VENV"] = sys.prefix  # the venv running these tests (dev reuses it)
    run = subprocess.run([str(REPO / "dev"), "demo", "--image", "missing.png", "--out", "o"], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 2, run.stdout + run.stderr
    assert f"--image 'missing.png': no such file (looked for {tmp_path}/missing.png" in run.stderr
    assert not (tmp_path / "o").exists() and not (REPO / "o").exists()
