"""`./dev demo`: the style-reference workflow on built-in tiny models.

With a ComfyUI host (COMFYUI_PATH, default $HOME/ComfyUI): starts the real server on loopback with this
pack and the test-only tiny model nodes, submits the shipped API workflow with its loaders swapped for
tiny random models (same classes as Z-Image / Qwen3-4B / Qwen3-VL / Flux VAE, small sizes), and writes
the generated image and the VL Inspect plot. Without a host: encodes the reference with a tiny
transformers Qwen3-VL through vl_core and writes the inspector plot (no image: sampling needs the host).
Random weights make a noise-like picture; the point is that the real graph runs end to end.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

from tools import host_harness as harness

WORKFLOW = "VL Style Reference"
DEFAULT_IMAGE = "test_scene.png"


def caller_dir() -> Path:
    """The directory the user ran the demo from: ./dev changes into the repo and exports it as
    ZIMAGE_VL_CALLER_DIR; run as `python -m tools.demo` it is the current directory."""
    return Path(os.environ.get("ZIMAGE_VL_CALLER_DIR") or os.getcwd())


def resolve_path(arg: str) -> Path:
    """A path as the user typed it: relative to the caller's directory, ~ expanded."""
    return (caller_dir() / Path(arg).expanduser()).resolve()


def reference_image(arg: str | None) -> str:
    """--image as a file the harness can stage: a path (relative to the caller's directory) or a name in
    ../shared/ref_images. Without --image: test_scene.png from there, or (a plain clone has no ../shared) a
    synthetic picture of that name. A named file that does not exist or is no picture is a ValueError."""
    if arg is None:
        return DEFAULT_IMAGE
    candidates = [resolve_path(arg), harness.ref_images_dir() / arg]
    found = next((p for p in candidates if p.is_file()), None)
    if found is None:
        raise ValueError(f"--image {arg!r}: no such file (looked for {candidates[0]} and {candidates[1]}); "
                         "give the path of a PNG or JPEG picture, or leave --image out for the built-in one")
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(found) as im:
            im.verify()
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"--image {arg!r}: {found} is not a picture PIL can read ({e}); give a PNG or JPEG")
    return str(found)


def run_in_host(out: Path, image: str, size: int, alpha: float) -> None:
    root = harness.comfyui_path()
    with tempfile.TemporaryDirectory(prefix="zimage_vl_demo_") as work:
        server = harness.ComfyServer(root, Path(work))
        server.prepare()
        print(f"demo: starting ComfyUI from {root} ...", flush=True)
        server.start()
        try:
            prompt = harness.swap_loaders_for_tiny(harness.load_api_workflow(WORKFLOW))
            harness.set_image(prompt, server.stage_ref_image(image, size=size))
            harness.set_inputs(prompt, "EmptySD3LatentImage", width=size, height=size)
            harness.set_inputs(prompt, "KSampler", steps=4)
            harness.set_inputs(prompt, "ZImageVL_EmbeddingBlend", alpha=alpha)
            entry = server.submit(prompt)
            saved = server.output_files(entry, harness.node_of(prompt, "SaveImage"), "images")
            plot = server.output_files(entry, harness.node_of(prompt, "PreviewImage"), "images")
            report = entry["outputs"][harness.node_of(prompt, "ZImageVL_Inspect")]["text"][0]
        finally:
            server.stop()
        shutil.copyfile(saved[0], out / "demo_image.png")
        shutil.copyfile(plot[0], out / "demo_inspect.png")
    print(report)
    print(f"demo: ran workflows/api/{WORKFLOW}.json in ComfyUI on tiny models")
    print(f"demo: wrote {out / 'demo_image.png'} and {out / 'demo_inspect.png'}")


def run_without_host(out: Path, image: str) -> None:
    import numpy as np
    import torch
    from PIL import Image

    from tools import tiny_models
    from vl_core import extract, plot, preprocess
    from vl_core.encoders.transformers_qwen3vl import TransformersQwen3VL

    print("demo: no ComfyUI host (set COMFYUI_PATH): encoding with a tiny transformers Qwen3-VL only; "
          "the sampled image needs the host", flush=True)
    with tempfile.TemporaryDirectory(prefix="zimage_vl_demo_") as work:
        encoder = TransformersQwen3VL.from_pretrained(tiny_models.make_hf_tiny_qwen3vl(work, num_layers=8))
        with Image.open(harness.ref_image_path(image, fallback_dir=Path(work))) as im:
            picture = torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0)[None]
        picture = preprocess.check_image(picture)
        picture = preprocess.resize_image(picture, preprocess.plan_size(*picture.shape[:2], 256, "fit_budget"))
        vl = encoder.encode([picture], "Describe the style of this image.",
                            extract.parse_layers("-6", encoder.num_layers), "after_image")
    figure, report = plot.inspect_embeds(vl, 10.0)
    Image.fromarray((figure.numpy() * 255).round().astype("uint8")).save(out / "demo_inspect.png")
    print(report)
    print(f"demo: wrote {out / 'demo_inspect.png'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="out", help="folder for demo_image.png and demo_inspect.png "
                                                     "(relative to where you run the demo)")
    parser.add_argument("--image", help="reference picture: a path (relative to where you run the demo) or a "
                                        f"name in ../shared/ref_images (default {DEFAULT_IMAGE}, a built-in "
                                        "synthetic picture when that folder is absent)")
    parser.add_argument("--size", type=int, default=128, help="reference and output size in px (tiny models)")
    parser.add_argument("--alpha", type=float, default=0.5, help="Embedding Blend alpha")
    args = parser.parse_args(argv)
    try:
        image = reference_image(args.image)
    except ValueError as e:
        parser.error(str(e))
    out = resolve_path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if harness.comfyui_path() is not None:
        run_in_host(out, image, args.size, args.alpha)
    else:
        run_without_host(out, image)
    return 0


if __name__ == "__main__":
    sys.exit(main())
