"""Save / Load VL Embeddings: safetensors only, inside models/vl_embeddings."""
from __future__ import annotations

import os

import folder_paths
from comfy_api.latest import io

from ..vl_core.types import VLEmbeds
from .common import CATEGORY, VLEmbedsType, check_vl_embeds

FOLDER_KEY = "vl_embeddings"
EXTENSION = ".safetensors"


def register_folder() -> None:
    """models/vl_embeddings (plus any extra_model_paths entry), shared by Save and Load."""
    if FOLDER_KEY not in folder_paths.folder_names_and_paths:
        folder_paths.folder_names_and_paths[FOLDER_KEY] = (
            [os.path.join(folder_paths.models_dir, FOLDER_KEY)], {EXTENSION})


def embeddings_dir() -> str:
    register_folder()
    return os.path.abspath(folder_paths.get_folder_paths(FOLDER_KEY)[0])


def confined_path(name: str, root: str) -> str:
    """root/name, refusing absolute names, '..' escapes and symlinks that leave root."""
    if not name or os.path.isabs(name) or name.startswith(("/", "\\")):
        raise ValueError(f"embeddings name {name!r} must be a relative name inside {root}")
    path = os.path.realpath(os.path.join(root, name))
    if os.path.commonpath([os.path.realpath(root), path]) != os.path.realpath(root):
        raise ValueError(f"embeddings name {name!r} points outside the embeddings folder {root}: use a plain "
                         "name such as 'vl_embeds/reference'")
    return path


class SaveVLEmbeds(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ZImageVL_SaveEmbeds",
            display_name="Save VL Embeddings",
            category=CATEGORY,
            description="Writes VL embeddings (all layers + spans, prompt, source as metadata) to "
                        "models/vl_embeddings as safetensors, to reuse without re-encoding.",
            inputs=[
                VLEmbedsType.Input("vl_embeds", tooltip="From VL Encode."),
                io.String.Input("filename_prefix", default="vl_embeds/reference",
                                tooltip="Name inside models/vl_embeddings; a counter and .safetensors are added. "
                                        "Sub-folders are allowed, leaving the folder is not."),
            ],
            outputs=[io.String.Output(display_name="name", tooltip="The saved file's name, for Load VL Embeddings.")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, vl_embeds, filename_prefix: str) -> io.NodeOutput:
        vl = check_vl_embeds("vl_embeds", vl_embeds)
        root = embeddings_dir()
        prefix = filename_prefix.strip()
        target = confined_path(prefix or "vl_embeds", root)
        folder, stem = os.path.dirname(target), os.path.basename(target)
        os.makedirs(folder, exist_ok=True)
        taken = {f for f in os.listdir(folder)}
        counter = 1
        while f"{stem}_{counter:05}_{EXTENSION}" in taken:
            counter += 1
        path = os.path.join(folder, f"{stem}_{counter:05}_{EXTENSION}")
        vl.to_safetensors(path)
        name = os.path.relpath(path, os.path.realpath(root)).replace(os.sep, "/")
        return io.NodeOutput(name, ui={"text": (f"saved {name}",)})


class LoadVLEmbeds(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        register_folder()
        return io.Schema(
            node_id="ZImageVL_LoadEmbeds",
            display_name="Load VL Embeddings",
            category=CATEGORY,
            description="Loads VL embeddings saved by Save VL Embeddings (safetensors only; pickles are refused).",
            inputs=[
                io.Combo.Input("name", options=folder_paths.get_filename_list(FOLDER_KEY),
                               tooltip="A .safetensors file in models/vl_embeddings."),
            ],
            outputs=[VLEmbedsType.Output(display_name="vl_embeds")],
        )

    @classmethod
    def validate_inputs(cls, name: str) -> bool | str:
        try:
            cls.resolve(name)
        except ValueError as e:
            return str(e)
        return True

    @classmethod
    def fingerprint_inputs(cls, name: str):
        try:
            return os.path.getmtime(cls.resolve(name))
        except (ValueError, OSError):
            return float("nan")

    @staticmethod
    def resolve(name: str) -> str:
        path = confined_path(name, embeddings_dir())
        if not name.endswith(EXTENSION):
            raise ValueError(f"{name!r} is not a {EXTENSION} file; only safetensors embeddings are loaded")
        if not os.path.isfile(path):
            raise ValueError(f"{name!r} not found in {embeddings_dir()}")
        return path

    @classmethod
    def execute(cls, name: str) -> io.NodeOutput:
        return io.NodeOutput(check_vl_embeds(name, VLEmbeds.from_safetensors(cls.resolve(name))))
