"""comfyui-zimage-vl core library: pure torch, no ComfyUI imports, usable outside ComfyUI.

One module per concern. Each embedding-level technique is one recipe in `techniques`, composed of the ops in
`blend`, `normalize`, `pooling` and `stats`; figures (IMAGE tensors) come from `plot`; argument checks from `checks`.
"""
