"""Save / Load VL Embeddings: safetensors only, inside models/vl_embeddings, through vl_core.store's rules
(confined names, exclusive numbered names, temp + atomic replace, stale-temp cleanup)."""
from __future__ import annotations

import os

import folder_paths
from comfy_api.latest import io

from ..vl_core import store
from ..vl_core.embeds_file import METADATA_KEY, check_writable
from ..vl_core.types import VLEmbeds
from .common import CATEGORY, VLEmbedsType, check_vl_embeds, validation_answer

FOLDER_KEY = "vl_embeddings"
EXTENSION = ".safetensors"
DEFAULT_STEM = "vl_embeds"


def register_folder() -> None:
    """models/vl_embeddings (plus any extra_model_paths entry), shared by Save and Load."""
    if FOLDER_KEY not in folder_paths.folder_names_and_paths:
        folder_paths.folder_names_and_paths[FOLDER_KEY] = (
            [os.path.join(folder_paths.models_dir, FOLDER_KEY)], {EXTENSION})


def embeddings_roots() -> list[str]:
    """Every folder registered for embeddings; Save writes into the first."""
    register_folder()
    return [os.path.abspath(p) for p in folder_paths.get_folder_paths(FOLDER_KEY)]


def embeddings_dir() -> str:
    return embeddings_roots()[0]


def is_embeddings_file(path: str) -> bool:
    """Listed by Load: the header carries the embeddings metadata (other kinds share the folder)."""
    return METADATA_KEY in (store.safetensors_metadata(path) or {})


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
            outputs=[io.String.Output(display_name="name", tooltip="The saved file's name, for Load VL Embeddings "
                                                                   "(connect it to Load's name).")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, vl_embeds, filename_prefix: str) -> io.NodeOutput:
        vl = check_vl_embeds("vl_embeds", vl_embeds)
        check_writable(vl, "vl_embeds")
        name = store.save_numbered(embeddings_dir(), filename_prefix, EXTENSION, vl.to_safetensors,
                                   default_stem=DEFAULT_STEM)
        return io.NodeOutput(name, ui={"text": (f"saved {name}",)})


class StoredFileLoader:
    """What every Load node of a stored file shares; the node gives `resolve(name) -> path` (ValueError if bad)."""

    @classmethod
    def validate_inputs(cls, name) -> bool | str:
        if name is None:  # linked (e.g. from Save in the same prompt): the file is checked when it runs
            return True
        return validation_answer(cls.resolve, name)

    @classmethod
    def fingerprint_inputs(cls, name):
        try:
            st = os.stat(cls.resolve(name))
            return (st.st_mtime_ns, st.st_size, st.st_ino)
        except (ValueError, OSError):
            return float("nan")


class LoadVLEmbeds(StoredFileLoader, io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        names = store.list_files(embeddings_roots(), EXTENSION, accept=is_embeddings_file)
        return io.Schema(
            node_id="ZImageVL_LoadEmbeds",
            display_name="Load VL Embeddings",
            category=CATEGORY,
            description="Loads VL embeddings saved by Save VL Embeddings (safetensors only; pickles are refused; "
                        "every field of the file is checked).",
            inputs=[
                # a file list widget that also takes a STRING link (Save VL Embeddings' name output)
                io.MultiType.Input(io.Combo.Input("name", options=names,
                                                  tooltip="A .safetensors file in models/vl_embeddings, or "
                                                          "the name output of Save VL Embeddings."),
                                   types=[io.String]),
            ],
            outputs=[VLEmbedsType.Output(display_name="vl_embeds")],
        )

    @staticmethod
    def resolve(name) -> str:
        return store.resolve_file(embeddings_roots(), name, EXTENSION, input_name="embeddings name")

    @classmethod
    def execute(cls, name) -> io.NodeOutput:
        return io.NodeOutput(check_vl_embeds(name, VLEmbeds.from_safetensors(cls.resolve(name), label=name)))
