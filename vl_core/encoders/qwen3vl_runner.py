"""Fast Qwen3-VL encode over already-loaded module objects (pure torch: no ComfyUI / transformers import).

Both backends hold the same architecture under the same attribute names: ComfyUI's
`comfy.text_encoders.qwen3vl.Qwen3VL` (`visual` + `model`) and transformers'
`Qwen3VLModel` (`visual` + `language_model`). `Qwen3VLRunner` runs them in its own loop over their
submodules' weights, never through the modules' forward methods, so that

- everything computes in the weights' dtype (bf16 on GPUs; ComfyUI's own encoder upcasts to fp32),
- attention is one SDPA call per layer (flash / cuDNN / efficient kernels): full attention per image in
  the vision tower (its block-diagonal mask is exactly "one image per batch row" when the images of a
  batch share a size), causal attention (`is_causal=True`, no mask tensor) in the language model,
- the language model stops at the deepest requested layer (no later layers, final norm only when
  layer L is asked for, never the lm_head),
- there is no host/device synchronisation inside the forward: every index table (MRoPE positions,
  vision rotary table, position-embedding interpolation taps) is built on the CPU first and
  copied once; image positions are long-tensor indices (never boolean masks),
- same-size images are batched: B sequences of identical token layout run as one [B, N, D] forward.

Layer numbering is Hugging Face's `hidden_states`: 0 = input embeddings (image features merged in),
i = output of decoder layer i-1, L = final normed output. DeepStack: transformers records layers 1..K
*before* the DeepStack vision features are added, ComfyUI *after*; `Qwen3VLSpec.deepstack_after_record`
selects the backend's convention.

Weights are read through a `WeightSource` (`get(module) -> (weight, bias, token)`, `release(...)`);
the default `DirectWeights` uses the module's tensors (cast to the compute dtype / device only if they
differ). The ComfyUI backend passes one that goes through ComfyUI's own weight casting for modules it
manages (lowvram / dynamic VRAM / LoRA weight functions).
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import preprocess

SDPA_MODES = ("auto", "cudnn", "flash", "efficient", "math")


class UnsupportedModel(ValueError):
    """The modules do not have the layout / configuration this runner implements."""


@dataclass(frozen=True)
class Qwen3VLSpec:
    # vision tower
    patch_size: int
    temporal_patch_size: int
    merge_size: int
    vision_hidden: int
    vision_heads: int
    vision_depth: int
    num_grid_per_side: int
    deepstack_indexes: tuple[int, ...]
    # language model
    num_layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    rope_theta: float
    mrope_section: tuple[int, int, int]
    mrope_interleaved: bool
    rms_eps: float
    # conventions of the backend the weights come from
    deepstack_after_record: bool      # True: ComfyUI (records layer i after DeepStack add of layer i-1)
    vision_rope_theta: float = 10000.0
    image_mean: float = 0.5
    image_std: float = 0.5

    @property
    def vision_head_dim(self) -> int:
        return self.vision_hidden // self.vision_heads


# ---------------------------------------------------------------------------------------------- weights

class DirectWeights:
    """The modules' own tensors, cast to (dtype, device) per use only where they differ."""

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


# ---------------------------------------------------------------------------------------------- tables (CPU)

def mrope_positions(input_ids: Sequence[int], image_pad_id: int, merged_grids: Sequence[tuple[int, int]]) -> torch.Tensor:
    """[3, N] T/H/W MRoPE positions (Qwen2/3-VL rule, = HF get_rope_index = ComfyUI qwen2vl_mrope_position_ids).

    Text runs sequentially; the k-th run of image pads gets (t, h, w) = (p, p + row, p + col) over its
    merged grid (mh, mw), p = the position the run starts at; text after it resumes at p + max(mh, mw).
    """
    ids = list(input_ids)
    out = torch.empty(3, len(ids), dtype=torch.long)
    pos, i, k = 0, 0, 0
    while i < len(ids):
        if ids[i] != image_pad_id:
            out[:, i] = pos
            pos += 1
            i += 1
            continue
        if k >= len(merged_grids):
            raise ValueError("more image-pad runs than images")
        mh, mw = merged_grids[k]
        n = mh * mw
        if ids[i:i + n] != [image_pad_id] * n:
            raise ValueError(f"image {k}: expected {n} consecutive image pads")
        out[0, i:i + n] = pos
        out[1, i:i + n] = (torch.arange(mh) + pos).repeat_interleave(mw)
        out[2, i:i + n] = (torch.arange(mw) + pos).repeat(mh)
        pos += max(mh, mw)
        i += n
        k += 1
    if k != len(merged_grids):
        raise ValueError(f"{len(merged_grids)} images but {k} image-pad runs")
    return out


def text_rope(positions: torch.Tensor, spec: Qwen3VLSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) [N, head_dim] float32 for MRoPE positions [3, N] (interleaved or sectioned)."""
    hd = spec.head_dim
    inv_freq = 1.0 / (spec.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd))
    freqs = positions.float()[:, :, None] * inv_freq[None, None, :]          # [3, N, hd/2]
    sec = spec.mrope_section
    if spec.mrope_interleaved:
        f = freqs[0].clone()
        for axis, offset in ((1, 1), (2, 2)):
            idx = slice(offset, sec[axis] * 3, 3)
            f[:, idx] = freqs[axis][:, idx]
        emb = torch.cat((f, f), dim=-1)
        return emb.cos(), emb.sin()
    emb = torch.cat((freqs, freqs), dim=-1)                                   # [3, N, hd]
    cos, sin = emb.cos(), emb.sin()
    split = list(sec) * 2
    cos = torch.cat([c[i % 3] for i, c in enumerate(cos.split(split, dim=-1))], dim=-1)
    sin = torch.cat([s[i % 3] for i, s in enumerate(sin.split(split, dim=-1))], dim=-1)
    return cos, sin


def vision_tables(gh: int, gw: int, spec: Qwen3VLSpec):
    """CPU tables for one (gh, gw) patch grid, patches in merge-window order:
    (pos-embed taps [P, 4] long, tap weights [P, 4] float32, rotary cos [P, hd], sin [P, hd] float32)."""
    m, side = spec.merge_size, spec.num_grid_per_side
    r = torch.arange(gh).view(gh // m, m, 1, 1).expand(gh // m, m, gw // m, m)
    c = torch.arange(gw).view(1, 1, gw // m, m).expand(gh // m, m, gw // m, m)
    row = r.permute(0, 2, 1, 3).reshape(-1)      # merge-window order: (block_row, block_col, in_row, in_col)
    col = c.permute(0, 2, 1, 3).reshape(-1)

    def taps(index, size):   # bilinear, align_corners=True over `side` table entries (= ComfyUI linspace)
        src = index.float() * (side - 1) / max(size - 1, 1)
        lo = src.floor()
        w1 = src - lo
        lo = lo.long().clamp(0, side - 1)
        hi = (lo + 1).clamp(max=side - 1)
        return lo, hi, 1.0 - w1, w1

    h0, h1, wh0, wh1 = taps(row, gh)
    w0, w1_, ww0, ww1 = taps(col, gw)
    idx = torch.stack([h0 * side + w0, h0 * side + w1_, h1 * side + w0, h1 * side + w1_], dim=1)
    wts = torch.stack([wh0 * ww0, wh0 * ww1, wh1 * ww0, wh1 * ww1], dim=1)

    rot_dim = spec.vision_head_dim // 2
    inv_freq = 1.0 / (spec.vision_rope_theta ** (torch.arange(0, rot_dim, 2, dtype=torch.float) / rot_dim))
    freqs = torch.cat([row.float()[:, None] * inv_freq, col.float()[:, None] * inv_freq], dim=-1)   # [P, hd/2]
    emb = torch.cat((freqs, freqs), dim=-1)
    return idx, wts, emb.cos(), emb.sin()


def signed_sin(sin: torch.Tensor) -> torch.Tensor:
    """[-sin[..., :half], sin[..., half:]]: rotate_half folded into the sine table."""
    half = sin.shape[-1] // 2
    return torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)


# ---------------------------------------------------------------------------------------------- FLOPs

def encode_flops(spec: Qwen3VLSpec, grids: Sequence[tuple[int, int]], num_tokens: int, deepest: int,
                 batch: int = 1, vision_ffn: int | None = None, text_ffn: int | None = None,
                 vision_out: int | None = None) -> dict[str, float]:
    """Matmul + attention FLOPs of one runner forward (2 per multiply-add; causal attention counted half).

    grids: (gh, gw) patch grid of each image of one sequence; the LM runs `deepest` layers (all when
    deepest == num_layers). Returns {"vision", "text", "total"} for `batch` sequences.
    """
    hv = spec.vision_hidden
    ffv = vision_ffn or 4 * hv
    out = vision_out or spec.hidden
    cin = 3 * spec.temporal_patch_size * spec.patch_size ** 2
    vision = 0.0
    for gh, gw in grids:
        p = gh * gw
        vision += 2 * p * cin * hv
        vision += spec.vision_depth * (2 * p * hv * 3 * hv + 4 * p * p * hv + 2 * p * hv * hv + 4 * p * hv * ffv)
        q = p // spec.merge_size ** 2
        md = hv * spec.merge_size ** 2
        vision += (1 + len(spec.deepstack_indexes)) * (2 * q * md * md + 2 * q * md * out)
    n, d, hd = num_tokens, spec.hidden, spec.head_dim
    ff = text_ffn or 4 * d
    per_layer = (2 * n * d * spec.heads * hd + 4 * n * d * spec.kv_heads * hd + 2 * n * spec.heads * hd * d
                 + 2 * n * n * spec.heads * hd + 6 * n * d * ff)
    text = per_layer * min(deepest, spec.num_layers)
    return {"vision": vision * batch, "text": text * batch, "total": (vision + text) * batch}


# ---------------------------------------------------------------------------------------------- runner

_SDPA_GQA = tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 5)   # enable_gqa


def _sdpa_context(mode: str, device: torch.device):
    import contextlib

    if mode == "auto" or device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    order = {"cudnn": [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                       SDPBackend.MATH],
             "flash": [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH],
             "efficient": [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH],
             "math": [SDPBackend.MATH]}[mode]
    try:
        return sdpa_kernel(order, set_priority=True)
    except TypeError:   # torch without set_priority: restrict to the list instead
        return sdpa_kernel(order)


_TABLES: OrderedDict = OrderedDict()
_GRAPHS: OrderedDict = OrderedDict()     # key -> captured graph with its static buffers
_GRAPH_SEEN: dict = {}                   # key -> eager runs so far
GRAPH_CACHE = 2
_GRAPH_STATE = {"broken": False}         # set when a capture failed: eager from then on
_LOG = logging.getLogger("comfyui-zimage-vl")


def release_graphs() -> None:
    """Drop every captured CUDA graph (and the memory pools they hold)."""
    _GRAPHS.clear()
    _GRAPH_SEEN.clear()


def normalize_device(device) -> torch.device:
    """cuda → cuda:<current index> (tensors always report an index; torch.device("cuda") != "cuda:0")."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


class Qwen3VLRunner:
    """Runs a Qwen3-VL's `visual` and language model (`embed_tokens`, `layers`, `norm`) module objects.

    dtype: the compute dtype (normally the weights' dtype); device: where it runs. `check()` validates
    the module layout against the spec once (raises UnsupportedModel with the reason).
    """

    TABLE_CACHE = 32

    def __init__(self, visual, language_model, spec: Qwen3VLSpec, dtype: torch.dtype, device,
                 weights=None, sdpa: str = "auto", graphs: bool = True):
        if sdpa not in SDPA_MODES:
            raise ValueError(f"sdpa must be one of {SDPA_MODES}, got {sdpa!r}")
        self.visual = visual
        self.lm = language_model
        self.spec = spec
        self.dtype = dtype
        self.device = normalize_device(device)
        self.weights = weights if weights is not None else DirectWeights(dtype, self.device)
        self.sdpa = sdpa
        self.graphs = graphs
        self._tables = _TABLES          # shared by all runners: pure functions of (spec, grid, device, dtype)

    @property
    def _gqa(self) -> bool:
        """SDPA's own grouped-query attention (no repeated K/V copies) where torch has it, on the GPU."""
        return self.device.type == "cuda" and _SDPA_GQA

    # ------------------------------------------------------------------ validation

    def check(self) -> None:
        s, v, lm = self.spec, self.visual, self.lm

        def need(obj, path):
            cur = obj
            for part in path.split("."):
                if not hasattr(cur, part):
                    raise UnsupportedModel(f"module has no {path!r}")
                cur = getattr(cur, part)
            return cur

        proj = need(v, "patch_embed.proj")
        cin = 3 * s.temporal_patch_size * s.patch_size ** 2
        if proj.weight.numel() != s.vision_hidden * cin:
            raise UnsupportedModel(f"patch_embed.proj has {tuple(proj.weight.shape)}, expected "
                                   f"{s.vision_hidden}x{cin} elements")
        if need(v, "pos_embed.weight").shape[0] != s.num_grid_per_side ** 2:
            raise UnsupportedModel("pos_embed size does not match num_grid_per_side")
        blocks = need(v, "blocks")
        if len(blocks) != s.vision_depth:
            raise UnsupportedModel(f"{len(blocks)} vision blocks, expected {s.vision_depth}")
        for path in ("norm1", "norm2", "attn.qkv", "attn.proj", "mlp.linear_fc1", "mlp.linear_fc2"):
            need(blocks[0], path)
        for path in ("merger.norm", "merger.linear_fc1", "merger.linear_fc2"):
            need(v, path)
        mergers = need(v, "deepstack_merger_list") if s.deepstack_indexes else []
        if len(mergers) != len(s.deepstack_indexes):
            raise UnsupportedModel("deepstack mergers do not match deepstack indexes")
        need(lm, "embed_tokens.weight")
        layers = need(lm, "layers")
        if len(layers) != s.num_layers:
            raise UnsupportedModel(f"{len(layers)} decoder layers, expected {s.num_layers}")
        for path in ("input_layernorm", "post_attention_layernorm", "self_attn.q_proj", "self_attn.k_proj",
                     "self_attn.v_proj", "self_attn.o_proj", "self_attn.q_norm", "self_attn.k_norm",
                     "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
            if need(layers[0], path) is None:
                raise UnsupportedModel(f"decoder layer has no {path}")
        if getattr(lm, "norm", None) is None:
            raise UnsupportedModel("language model has no final norm")
        q = layers[0].self_attn.q_proj.weight
        if tuple(q.shape) != (s.heads * s.head_dim, s.hidden):
            raise UnsupportedModel(f"q_proj is {tuple(q.shape)}, expected {(s.heads * s.head_dim, s.hidden)}")

    # ------------------------------------------------------------------ primitive ops

    def _linear(self, m, x):
        w, b, tok = self.weights.get(m)
        y = F.linear(x, w, b)
        if tok is not None:
            self.weights.release(m, w, b, tok)
        return y

    def _layer_norm(self, m, x):
        w, b, tok = self.weights.get(m)
        y = F.layer_norm(x, (x.shape[-1],), w, b, m.eps)
        if tok is not None:
            self.weights.release(m, w, b, tok)
        return y

    def _rms_norm(self, m, x):
        w, _, tok = self.weights.get(m)
        if getattr(m, "add", False):      # ComfyUI's RMSNorm(add=True): scale is 1 + weight
            w = w + 1.0
        eps = getattr(m, "eps", None)
        if eps is None:
            eps = getattr(m, "variance_epsilon", self.spec.rms_eps)
        y = F.rms_norm(x, (x.shape[-1],), w, eps)
        if tok is not None:
            self.weights.release(m, w, None, tok)
        return y

    @staticmethod
    def _rope_(x, cos, ssin):
        """Rotate-half RoPE on the last dim, x*cos + rotate_half(x)*sin, in x's dtype (ComfyUI's op order:
        one product and two in-place multiply-adds). ssin = signed sin: [-sin(first half), sin(second half)]."""
        half = x.shape[-1] // 2
        out = x * cos
        out[..., :half].addcmul_(x[..., half:], ssin[..., :half])
        out[..., half:].addcmul_(x[..., :half], ssin[..., half:])
        return out

    # ------------------------------------------------------------------ tables (cached per grid, on device)

    def _vision_tables(self, gh: int, gw: int):
        key = (self.spec, gh, gw, self.device, self.dtype)
        hit = self._tables.get(key)
        if hit is None:
            idx, wts, cos, sin = vision_tables(gh, gw, self.spec)
            sin = signed_sin(sin)
            pin = self.device.type == "cuda"
            hit = tuple((t.pin_memory() if pin else t).to(self.device, non_blocking=True)
                        for t in (idx, wts))
            hit += tuple((t.to(self.dtype).pin_memory() if pin else t.to(self.dtype)).to(self.device, non_blocking=True)
                         for t in (cos, sin))
            self._tables[key] = hit
            while len(self._tables) > self.TABLE_CACHE:
                self._tables.popitem(last=False)
        else:
            self._tables.move_to_end(key)
        return hit

    # ------------------------------------------------------------------ vision tower

    def vision(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """images [B, H, W, 3] (0..1, one size) → (merged [B, P/m², D], DeepStack features [B, P/m², D] each)."""
        s, v = self.spec, self.visual
        bsz, h, w, _ = images.shape
        gh, gw = h // s.patch_size, w // s.patch_size
        patches = torch.stack([preprocess.to_patches(im, s.patch_size, s.temporal_patch_size, s.merge_size,
                                                     s.image_mean, s.image_std)[0] for im in images])
        p = patches.shape[1]
        idx, wts, cos, sin = self._vision_tables(gh, gw)

        pw, pb, tok = self.weights.get(v.patch_embed.proj)       # Conv3d with kernel == stride: one matmul
        x = F.linear(patches.to(self.dtype), pw.reshape(pw.shape[0], -1), pb)
        if tok is not None:
            self.weights.release(v.patch_embed.proj, pw, pb, tok)
        ew, _, tok = self.weights.get(v.pos_embed)
        pos = (F.embedding(idx, ew).float() * wts[:, :, None]).sum(1).to(self.dtype)     # [P, hv]
        if tok is not None:
            self.weights.release(v.pos_embed, ew, None, tok)
        x = x + pos

        heads, hd = s.vision_heads, s.vision_head_dim
        cos4, sin4 = cos[:, None, None, :], sin[:, None, None, :]     # broadcast over (qk, heads)
        ds_index = {layer: j for j, layer in enumerate(s.deepstack_indexes)}
        deepstack: list = [None] * len(s.deepstack_indexes)
        for i, blk in enumerate(v.blocks):
            y = self._layer_norm(blk.norm1, x)
            qkv = self._linear(blk.attn.qkv, y).view(bsz, p, 3, heads, hd)
            qk = self._rope_(qkv[:, :, :2], cos4, sin4)
            q, k = qk.unbind(2)
            val = qkv[:, :, 2]
            o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), val.transpose(1, 2))
            x = x + self._linear(blk.attn.proj, o.transpose(1, 2).reshape(bsz, p, heads * hd))
            y = self._layer_norm(blk.norm2, x)
            y = F.gelu(self._linear(blk.mlp.linear_fc1, y), approximate="tanh")
            x = x + self._linear(blk.mlp.linear_fc2, y)
            j = ds_index.get(i)
            if j is not None:
                deepstack[j] = self._merger(v.deepstack_merger_list[j], x, postshuffle=True)
        return self._merger(v.merger, x, postshuffle=False), deepstack

    def _merger(self, m, x, postshuffle: bool):
        bsz, p, hv = x.shape
        md = hv * self.spec.merge_size ** 2
        if postshuffle or m.norm.weight.numel() == md:
            y = self._layer_norm(m.norm, x.reshape(bsz, p // self.spec.merge_size ** 2, md))
        else:
            y = self._layer_norm(m.norm, x).reshape(bsz, p // self.spec.merge_size ** 2, md)
        y = F.gelu(self._linear(m.linear_fc1, y))
        return self._linear(m.linear_fc2, y)

    # ------------------------------------------------------------------ language model

    def forward(self, input_ids: Sequence[int], image_pad_id: int, images: Sequence[torch.Tensor],
                layers: Sequence[int]) -> dict[int, torch.Tensor]:
        """B sequences of one token layout → {layer: [B, N, D]} (compute dtype, on the device; owned by the caller).

        input_ids: the expanded ids of the layout (one pad id per image token); images[k]: [B, H_k, W_k, 3]
        (0..1), the k-th image of each of the B sequences; layers: resolved hidden-state indices.
        """
        s = self.spec
        wanted = sorted({int(layer) for layer in layers})
        if not wanted or wanted[0] < 0 or wanted[-1] > s.num_layers:
            raise ValueError(f"layers {list(layers)} are not resolved hidden-state indices in 0..{s.num_layers}")
        bsz = int(images[0].shape[0]) if images else 1
        grids = []
        for im in images:
            if im.shape[0] != bsz or im.ndim != 4 or im.shape[-1] != 3:
                raise ValueError("images must be [B, H, W, 3] with one B for all image slots")
            gh, gw = int(im.shape[1]) // s.patch_size, int(im.shape[2]) // s.patch_size
            if gh % s.merge_size or gw % s.merge_size or gh * s.patch_size != im.shape[1] or gw * s.patch_size != im.shape[2]:
                raise ValueError(f"image size {im.shape[2]}x{im.shape[1]} must be a multiple of "
                                 f"{s.patch_size * s.merge_size} px")
            grids.append((gh // s.merge_size, gw // s.merge_size))
        ids = [int(t) for t in input_ids]

        key = self._graph_key(ids, images, wanted) if self._graphs_possible() else None
        if key is not None:
            out = self._replay(key, images)
            if out is not None:
                return out
        tables = self._tables_for(ids, image_pad_id, grids)
        if key is not None and _GRAPH_SEEN.get(key, 0) >= 1:     # second time this exact encode: capture it
            out = self._capture(key, tables, images, wanted)
            if out is not None:
                return out
        if key is not None:
            _GRAPH_SEEN[key] = _GRAPH_SEEN.get(key, 0) + 1
            while len(_GRAPH_SEEN) > 64:
                _GRAPH_SEEN.pop(next(iter(_GRAPH_SEEN)))
        with torch.inference_mode(), _sdpa_context(self.sdpa, self.device):
            return self._device_forward(tables, [im.to(self.device, non_blocking=True) for im in images], wanted)

    def _tables_for(self, ids: list[int], image_pad_id: int, grids) -> tuple:
        """All host-side tables first, then one copy each: no synchronisation inside the forward."""
        ids_cpu = torch.tensor(ids, dtype=torch.long)
        positions = mrope_positions(ids, image_pad_id, grids)
        cos, sin = text_rope(positions, self.spec)
        sin = signed_sin(sin)
        image_pos = (ids_cpu == image_pad_id).nonzero().flatten()
        pin = self.device.type == "cuda"

        def up(t, dtype=None):
            t = t if dtype is None else t.to(dtype)
            return (t.pin_memory() if pin else t).to(self.device, non_blocking=True)

        return up(ids_cpu), up(cos, self.dtype), up(sin, self.dtype), up(image_pos)

    def _device_forward(self, tables, images: list[torch.Tensor], wanted: list[int]) -> dict[int, torch.Tensor]:
        ids_dev, cos, sin, image_pos = tables
        s = self.spec
        bsz = int(images[0].shape[0]) if images else 1
        merged, deep = [], []
        for im in images:
            m, d = self.vision(im)
            merged.append(m)
            deep.append(d)
        ew, _, tok = self.weights.get(self.lm.embed_tokens)
        emb = F.embedding(ids_dev, ew)
        if tok is not None:
            self.weights.release(self.lm.embed_tokens, ew, None, tok)
        x = emb.unsqueeze(0).expand(bsz, -1, -1)
        ds_feats = []
        if images:
            x = x.clone()
            x[:, image_pos] = torch.cat(merged, dim=1).to(x.dtype)
            ds_feats = [torch.cat([d[j] for d in deep], dim=1) for j in range(len(s.deepstack_indexes))]
        return self._decoder(x, cos, sin, image_pos, ds_feats, wanted)

    # ------------------------------------------------------------------ CUDA graphs
    # An encode is ~1100 small kernel launches: on a GPU the forward is bound by the host launching them.
    # The second time an identical encode (same ids, image sizes, layers, weights at the same addresses)
    # runs, it is captured as a CUDA graph; later ones copy the new pixels into the graph's input buffers
    # and replay it. Only with plain resident weights (no per-call casting), never on the CPU.

    def _graphs_possible(self) -> bool:
        return (self.graphs and not _GRAPH_STATE["broken"] and self.device.type == "cuda"
                and getattr(self.weights, "graph_safe", False) and not torch.cuda.is_current_stream_capturing())

    def _graph_key(self, ids, images, wanted):
        params = getattr(self, "_param_list", None)
        if params is None:
            params = self._param_list = [p for mod in (self.visual, self.lm) for p in mod.parameters()]
        try:
            sig = tuple(p.data_ptr() for p in params)
        except RuntimeError:
            return None
        return (id(self.visual), self.spec, self.dtype, self.device, self.sdpa, tuple(ids),
                tuple(tuple(im.shape) for im in images), tuple(wanted), sig)

    def _replay(self, key, images):
        g = _GRAPHS.get(key)
        if g is None:
            return None
        _GRAPHS.move_to_end(key)
        for buf, im in zip(g["images"], images):
            buf.copy_(im, non_blocking=True)
        g["graph"].replay()
        return {layer: t.clone() for layer, t in g["outputs"].items()}

    def _capture(self, key, tables, images, wanted):
        try:
            static = [im.to(self.device).clone() for im in images]
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream), torch.inference_mode(), _sdpa_context(self.sdpa, self.device):
                self._device_forward(tables, static, wanted)           # warm-up (allocator, cuBLAS, cuDNN plans)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            if getattr(self.weights, "used_cast", False):
                return None
            keep = [self._vision_tables(int(im.shape[1]) // self.spec.patch_size,
                                        int(im.shape[2]) // self.spec.patch_size) for im in images]
            graph = torch.cuda.CUDAGraph()
            with torch.inference_mode(), _sdpa_context(self.sdpa, self.device):
                with torch.cuda.graph(graph):
                    outputs = self._device_forward(tables, static, wanted)
        except Exception as e:  # noqa: BLE001 - capture is an optimisation: fall back to eager
            _GRAPH_STATE["broken"] = True
            _LOG.warning("Qwen3-VL runner: CUDA graph capture failed (%s: %s); running eagerly", type(e).__name__, e)
            return None
        _GRAPHS[key] = {"graph": graph, "images": static, "outputs": outputs, "tables": tables, "keep": keep}
        while len(_GRAPHS) > GRAPH_CACHE:
            _GRAPHS.popitem(last=False)
        graph.replay()
        return {layer: t.clone() for layer, t in outputs.items()}

    def _decoder(self, x, cos, sin, image_pos, ds_feats, wanted):
        s, lm = self.spec, self.lm
        deepest, L = wanted[-1], s.num_layers
        want = set(wanted)
        out: dict[int, torch.Tensor] = {}
        if 0 in want:
            out[0] = x
        bsz, n, _ = x.shape
        heads, kvh, hd = s.heads, s.kv_heads, s.head_dim
        rep = heads // kvh
        cos2, sin2 = cos[None, :, None, :], sin[None, :, None, :]
        for i in range(min(deepest, L)):
            layer = lm.layers[i]
            att = layer.self_attn
            y = self._rms_norm(layer.input_layernorm, x)
            q = self._rms_norm(att.q_norm, self._linear(att.q_proj, y).view(bsz, n, heads, hd))
            k = self._rms_norm(att.k_norm, self._linear(att.k_proj, y).view(bsz, n, kvh, hd))
            v = self._linear(att.v_proj, y).view(bsz, n, kvh, hd)
            q = self._rope_(q, cos2, sin2).transpose(1, 2)
            k = self._rope_(k, cos2, sin2).transpose(1, 2)
            v = v.transpose(1, 2)
            if rep > 1 and not self._gqa:
                k = k[:, :, None].expand(bsz, kvh, rep, n, hd).reshape(bsz, heads, n, hd)
                v = v[:, :, None].expand(bsz, kvh, rep, n, hd).reshape(bsz, heads, n, hd)
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, **({"enable_gqa": True} if rep > 1 and self._gqa else {}))
            x = x + self._linear(att.o_proj, o.transpose(1, 2).reshape(bsz, n, heads * hd))
            y = self._rms_norm(layer.post_attention_layernorm, x)
            y = F.silu(self._linear(layer.mlp.gate_proj, y)) * self._linear(layer.mlp.up_proj, y)
            x = x + self._linear(layer.mlp.down_proj, y)
            index = i + 1                              # hidden_states index of this layer's output
            has_ds = i < len(ds_feats)
            if index in want and index < L and not (has_ds and s.deepstack_after_record):
                out[index] = x
            if has_ds:
                x = x.clone()
                x[:, image_pos] = x[:, image_pos] + ds_feats[i].to(x.dtype)
                if index in want and index < L and s.deepstack_after_record:
                    out[index] = x
        if L in want:
            out[L] = self._rms_norm(lm.norm, x)
        return out


PINNED_OUTPUT_MAX_BYTES = 64 * 2 ** 20


def to_output(t: torch.Tensor, device) -> torch.Tensor:
    """float32 copy of a result on `device` that the caller owns (never an inference tensor). GPU → CPU goes
    through a pinned buffer (one fast DMA instead of a pageable copy) for results up to 64 MiB."""
    device = torch.device(device)
    if t.device.type == "cuda" and device.type == "cpu" and t.numel() * 4 <= PINNED_OUTPUT_MAX_BYTES:
        out = torch.empty(t.shape, dtype=torch.float32, pin_memory=True)
        out.copy_(t, non_blocking=True)
        torch.cuda.current_stream(t.device).synchronize()
        return out
    out = t.to(device, torch.float32)
    if out is t or out.is_inference():
        out = out.clone()
    return out


def batch_chunks(count: int, tokens_per_item: int, max_tokens: int = 65536) -> list[tuple[int, int]]:
    """[start, end) chunks of `count` items with at most max(1, max_tokens // tokens_per_item) items each."""
    per = max(1, max_tokens // max(1, tokens_per_item))
    return [(i, min(count, i + per)) for i in range(0, count, per)]


def merged_tokens(h: int, w: int, spec: Qwen3VLSpec) -> int:
    return (h // spec.patch_size) * (w // spec.patch_size) // spec.merge_size ** 2


__all__ = ["Qwen3VLSpec", "Qwen3VLRunner", "DirectWeights", "UnsupportedModel", "mrope_positions", "text_rope",
           "vision_tables", "encode_flops", "batch_chunks", "merged_tokens", "SDPA_MODES", "release_graphs",
           "normalize_device", "to_output"]
