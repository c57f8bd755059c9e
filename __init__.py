"""comfyui-zimage-vl: steer Z-Image with a reference image through Qwen3-VL hidden states (no training)."""

WEB_DIRECTORY = "./web"


async def comfy_entrypoint():
    # imported lazily: nothing is patched or loaded at import time, and the host is checked first
    import logging

    from .nodes.host_check import missing_features, unsupported_message

    missing = missing_features()
    if missing:
        logging.getLogger("comfyui-zimage-vl").error(unsupported_message(missing))
        try:
            from comfy_api.latest import ComfyExtension
        except ImportError:
            return None

        class Unsupported(ComfyExtension):
            async def get_node_list(self):
                return []

        return Unsupported()
    from .nodes.extension import ZImageVLExtension

    return ZImageVLExtension()
