"""comfyui-zimage-vl core library: pure torch, no ComfyUI imports, usable outside ComfyUI."""
