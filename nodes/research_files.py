"""Save / Load VL Direction and Save / Load VL Calibration: safetensors in models/vl_embeddings, under the same
rules as embeddings (vl_core.store: confined names, exclusive numbered names, temp + atomic replace)."""
from __future__ import annotations


from comfy_api.latest import io

from ..vl_core import research_files, store
from .calibrate import VLCalibrationType
from .common import CATEGORY
from .embedding_files import EXTENSION, StoredFileLoader, embeddings_dir, embeddings_roots
from .steer import VLDirectionType


class _SaveFile(io.ComfyNode):
    """One Save node per file kind; subclasses set the class attributes below."""

    KIND: research_files.FileKind
    TYPE: io.Custom
    NODE_ID = DISPLAY = INPUT = DEFAULT_PREFIX = SOURCE = ""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=cls.NODE_ID,
            display_name=cls.DISPLAY,
            category=CATEGORY,
            description=f"Writes a {cls.KIND.what} (tensors + every field as metadata) to models/vl_embeddings as "
                        "safetensors, to reuse without re-estimating.",
            inputs=[
                cls.TYPE.Input(cls.INPUT, tooltip=f"From {cls.SOURCE}."),
                io.String.Input("filename_prefix", default=cls.DEFAULT_PREFIX,
                                tooltip="Name inside models/vl_embeddings; a counter and .safetensors are added. "
                                        "Sub-folders are allowed, leaving the folder is not."),
            ],
            outputs=[io.String.Output(display_name="name", tooltip=f"The saved file's name (connect it to "
                                                                   f"{cls.DISPLAY.replace('Save', 'Load')}'s name).")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, filename_prefix: str, **value) -> io.NodeOutput:
        item = value[cls.INPUT]
        if not isinstance(item, cls.KIND.cls):
            raise ValueError(f"{cls.INPUT} must come from {cls.SOURCE}, got {type(item).__name__}")
        name = store.save_numbered(embeddings_dir(), filename_prefix, EXTENSION,
                                   lambda path: research_files.write(cls.KIND, item, path),
                                   default_stem=cls.DEFAULT_PREFIX.rsplit("/", 1)[-1])
        return io.NodeOutput(name, ui={"text": (f"saved {name}",)})


class _LoadFile(StoredFileLoader, io.ComfyNode):
    """One Load node per file kind: lists only the files whose header carries that kind's metadata."""

    KIND: research_files.FileKind
    TYPE: io.Custom
    NODE_ID = DISPLAY = OUTPUT = ""

    @classmethod
    def is_kind(cls, path: str) -> bool:
        return cls.KIND.key in (store.safetensors_metadata(path) or {})

    @classmethod
    def define_schema(cls) -> io.Schema:
        names = store.list_files(embeddings_roots(), EXTENSION, accept=cls.is_kind)
        saver = cls.KIND.saver
        return io.Schema(
            node_id=cls.NODE_ID,
            display_name=cls.DISPLAY,
            category=CATEGORY,
            description=f"Loads a {cls.KIND.what} saved by {saver} (safetensors only; pickles are refused; every "
                        "field is checked; one made for another width or layer is refused where it is applied).",
            inputs=[
                io.MultiType.Input(io.Combo.Input("name", options=names,
                                                  tooltip=f"A .safetensors file in models/vl_embeddings written by "
                                                          f"{saver}, or its name output."),
                                   types=[io.String]),
            ],
            outputs=[cls.TYPE.Output(display_name=cls.OUTPUT)],
        )

    @classmethod
    def resolve(cls, name) -> str:
        return store.resolve_file(embeddings_roots(), name, EXTENSION, input_name=f"{cls.OUTPUT} name")

    @classmethod
    def execute(cls, name) -> io.NodeOutput:
        return io.NodeOutput(research_files.read(cls.KIND, cls.resolve(name), label=name))


class SaveVLDirection(_SaveFile):
    KIND, TYPE = research_files.DIRECTION, VLDirectionType
    NODE_ID, DISPLAY, INPUT = "ZImageVL_SaveDirection", "Save VL Direction", "direction"
    DEFAULT_PREFIX, SOURCE = "vl_directions/direction", "VL Steering Direction / Combine Directions"


class LoadVLDirection(_LoadFile):
    KIND, TYPE = research_files.DIRECTION, VLDirectionType
    NODE_ID, DISPLAY, OUTPUT = "ZImageVL_LoadDirection", "Load VL Direction", "direction"


class SaveVLCalibration(_SaveFile):
    KIND, TYPE = research_files.CALIBRATION, VLCalibrationType
    NODE_ID, DISPLAY, INPUT = "ZImageVL_SaveCalibration", "Save VL Calibration", "calibration"
    DEFAULT_PREFIX, SOURCE = "vl_calibrations/calibration", "VL Fit Calibration"


class LoadVLCalibration(_LoadFile):
    KIND, TYPE = research_files.CALIBRATION, VLCalibrationType
    NODE_ID, DISPLAY, OUTPUT = "ZImageVL_LoadCalibration", "Load VL Calibration", "calibration"
