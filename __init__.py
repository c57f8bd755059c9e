"""comfyui-zimage-vl: steer Z-Image with a reference image through Qwen3-VL hidden states (no training)."""

WEB_DIRECTORY = "./web"


async def comfy_entrypoint():
    from .nodes import ZImageVLExtension  # imported lazily: nothing is patched or loaded at import time

    return ZImageVLExtension()
