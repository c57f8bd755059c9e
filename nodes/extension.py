"""The pack's ComfyExtension: every node class, and the model folders registered on load."""
from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from .blend import AdaIN, EmbeddingBlend, StyleDelta
from .calibrate import ApplyCalibration, FitCalibration
from .encode import LoadQwen3VL, VLEncode
from .gram import GramMatch
from .injection import DiTInjection
from .inspector import VLInspect
from .layers import VLSelectLayers
from .metrics import ArtifactScore, ColourSimilarity, SemanticSimilarity
from .embedding_files import LoadVLEmbeds, SaveVLEmbeds, register_folder
from .model_folders import register_folders
from .references import CombineReferences
from .research_files import LoadVLCalibration, LoadVLDirection, SaveVLCalibration, SaveVLDirection
from .steer import ApplyDirection, CombineDirections, SteeringDirection


class ZImageVLExtension(ComfyExtension):
    async def on_load(self) -> None:
        register_folder()
        register_folders()

    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [LoadQwen3VL, VLEncode, EmbeddingBlend, StyleDelta, AdaIN, SaveVLEmbeds, LoadVLEmbeds, VLInspect,
                DiTInjection, ColourSimilarity, ArtifactScore, SemanticSimilarity,
                SteeringDirection, ApplyDirection, CombineDirections, CombineReferences, GramMatch, FitCalibration,
                ApplyCalibration, SaveVLDirection, LoadVLDirection, SaveVLCalibration, LoadVLCalibration,
                VLSelectLayers]
