"""ComfyUI nodes of comfyui-zimage-vl: thin wrappers that validate, convert and call vl_core.

Nothing is imported here: the entry point checks the host first (host_check) and only then imports
the node modules (extension), so an unsupported ComfyUI gets one log line instead of an import error.
"""
