"""Where the runner's weights and results live: the weight source protocol's default, device names, owned outputs."""
from __future__ import annotations

import torch

PINNED_OUTPUT_MAX_BYTES = 64 * 2 ** 20


def normalize_device(device) -> torch.device:
    """cuda → cuda:<current index> (tensors always report an index; torch.device("cuda") != "cuda:0")."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


class DirectWeights:
    """The modules' own tensors, cast to (dtype, device) per use only where they differ.

    A weight source is `get(module) -> (weight, bias, token)` and `release(module, weight, bias, token)`
    (called when token is not None); `graph_safe` says a CUDA graph may capture what it reads.
    """

    graph_safe = True     # reads only the modules' tensors: a CUDA graph may capture it

    def __init__(self, dtype: torch.dtype, device: torch.device):
        self.dtype = dtype
        self.device = normalize_device(device)

    def _fit(self, t):
        if t is None:
            return None
        if t.dtype != self.dtype or t.device != self.device:
            t = t.to(self.device, self.dtype, non_blocking=True)
        return t

    def get(self, module):
        return self._fit(module.weight), self._fit(getattr(module, "bias", None)), None

    def release(self, module, weight, bias, token) -> None:
        pass


def weight_slots(modules, names=None) -> tuple[list, list]:
    """(parameter dicts, names) of the modules' registered tensors (all, or those named): a scan through them
    sees the tensor each module holds *now*, also where ComfyUI swapped in a new Parameter object (LoRA patching,
    set_attr_param), which a list of the Parameter objects themselves would miss (and keep alive)."""
    dicts, keys = [], []
    for m in modules:
        for name, p in m._parameters.items():
            if p is not None and (names is None or name in names):
                dicts.append(m._parameters)
                keys.append(name)
    return dicts, keys


def addresses(slots) -> tuple | None:
    """The data pointers of the tensors in weight_slots(...) now (C-level maps: ≈ 0.05 ms for ~700 weights
    measured alone on an H200 host, 0.2 ms inside an encode); None where a slot was emptied or holds no tensor."""
    dicts, keys = slots
    try:
        return tuple(map(torch.Tensor.data_ptr, map(dict.__getitem__, dicts, keys)))
    except (KeyError, TypeError, RuntimeError):
        return None


def joint_rows(weights) -> torch.Tensor | None:
    """One [ΣN_j, K] view W = [W₁; W₂; …] over 2-D weights that are consecutive row blocks of one storage (no
    copy), else None."""
    first = weights[0]
    if first is None or first.dim() != 2:
        return None
    ptr, storage, size = first.data_ptr(), first.untyped_storage().data_ptr(), first.element_size()
    for w in weights:
        if (w is None or w.dim() != 2 or not w.is_contiguous() or w.dtype != first.dtype or w.device != first.device
                or w.shape[1] != first.shape[1] or w.data_ptr() != ptr or w.untyped_storage().data_ptr() != storage):
            return None
        ptr += w.numel() * size
    return first.as_strided((sum(int(w.shape[0]) for w in weights), int(first.shape[1])), (int(first.shape[1]), 1))


def pack_rows(linears) -> bool:
    """Make the weights of `linears` (bias-free, plain tensors of one width, dtype and device) consecutive row
    blocks of one new tensor, each module's weight a view of it (their .data swapped: same values, same bytes in
    all); True if it packed them, False where they already are one block or cannot be."""
    ws = [getattr(m, "weight", None) for m in linears]
    if any(type(w) not in (torch.Tensor, torch.nn.Parameter) or getattr(m, "bias", None) is not None
           for m, w in zip(linears, ws)):
        return False
    if any(w.dim() != 2 or w.shape[1] != ws[0].shape[1] or w.dtype != ws[0].dtype or w.device != ws[0].device
           or w.is_meta for w in ws) or joint_rows(ws) is not None:
        return False
    with torch.no_grad():
        joint = torch.cat([w.data for w in ws])
        start = 0
        for w in ws:
            w.data = joint[start:start + w.shape[0]]
            start += w.shape[0]
    return True


def to_outputs(results: dict, device) -> dict:
    """float32 copies on `device` of the runner's results ({key: tensor}) that the caller owns: plain tensors, also
    when called under inference mode (ComfyUI runs nodes in it), so no clone is needed downstream.

    GPU → CPU (results up to 64 MiB): widened to float32 on the GPU (exact; one kernel), then one DMA each
    into a page-locked output from torch's caching host allocator, whose blocks come back when the caller drops
    a result: no first-touch page faults (≈ 1 ms per 10 MB of fresh pageable memory) and no host widening copy,
    which ran on OpenMP's pool and left its idle workers spinning into the next Python work (bench/README.md).
    The outputs are pinned CPU tensors (≤ 64 MiB each)."""
    device = torch.device(device)
    out, sources = {}, set()
    with torch.inference_mode(False):
        for k, t in results.items():
            if t.device.type == "cuda" and device.type == "cpu" and t.numel() * 4 <= PINNED_OUTPUT_MAX_BYTES:
                wide = t.to(torch.float32, memory_format=torch.contiguous_format)   # stream-ordered: safe to drop
                out[k] = torch.empty(t.shape, dtype=torch.float32, pin_memory=True)
                out[k].copy_(wide, non_blocking=True)
                sources.add(t.device)
        for source in sources:
            torch.cuda.current_stream(source).synchronize()
        for k, t in results.items():
            if k not in out:
                o = t.to(device, torch.float32)
                out[k] = o.clone() if o is t or o.is_inference() else o
    return out
