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

Weights are read through a weight source (weights.py: `get(module) -> (weight, bias, token)`,
`release(...)`); the default `DirectWeights` uses the module's tensors (cast to the compute dtype / device
only if they differ). The ComfyUI backend passes one that goes through ComfyUI's own weight casting for
modules it manages (lowvram / dynamic VRAM / LoRA weight functions). Tables: qwen3vl_tables.py; CUDA
graphs of repeated encodes (vision tower and language model apart, qwen3vl_graphs.py): a GraphCache
(graph_cache.py) the runner's owner creates and releases. The
elementwise steps between the matmuls (residual add + norm, q/k norm + RoPE, SiLU·mul) come from fusion.py:
their eager twins unless the process has compiled them (torch.compile: opt-in, ZIMAGE_VL_COMPILE=auto; off on the CPU).
Images on the CPU are uploaded through pinned staging buffers (staging.HostStaging), their copies started ahead
by the encoders (`prefetch`).
"""
from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..checks import require_choice
from .fused_steps import step_examples
from .fusion import EAGER, Fusion
from .graph_cache import GraphCache
from .qwen3vl_graphs import GraphedForward
from .qwen3vl_spec import Qwen3VLSpec, check_modules
from .qwen3vl_tables import mrope_positions, signed_sin, text_rope
from .qwen3vl_vision import VisionTower
from .staging import HostStaging
from .weights import DirectWeights, addresses, joint_rows, normalize_device, pack_rows, weight_slots

SDPA_MODES = ("auto", "cudnn", "flash", "efficient", "math")
_SDPA_GQA = tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 5)   # enable_gqa


def sdpa_context(mode: str, device: torch.device):
    """Restrict SDPA to the kernels of `mode` (in priority order) on a GPU; "auto" (and the CPU): torch's choice."""
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


def prefetch(runner: Qwen3VLRunner | None, images: Sequence[torch.Tensor]):
    """runner.prefetch(images), or a no-op context where there is no runner yet (a first encode runs eagerly)."""
    return contextlib.nullcontext() if runner is None else runner.prefetch(images)


class Qwen3VLRunner(VisionTower, GraphedForward):
    """Runs a Qwen3-VL's `visual` and language model (`embed_tokens`, `layers`, `norm`) module objects.

    dtype: the compute dtype (normally the weights' dtype); device: where it runs. `check()` validates
    the module layout against the spec once (raises UnsupportedModel with the reason). fusion: a Fusion, or its
    mode (None: env ZIMAGE_VL_COMPILE, unset = "off"; "auto" = compiled steps on CUDA once ready).
    """

    TABLE_CACHE = 32
    # pixels enter a GPU forward as float16, also from a tensor already there (half the DMA of float32; one dtype for
    # the compiled steps; |error| ≤ 2⁻¹² on 0..1, far below the bf16 rounding of the patch embedding's input, and
    # 3e-4 relative on the states of an fp32 forward: test_float16_image_wire_keeps_the_states); None: as given
    IMAGE_WIRE_DTYPE = torch.float16
    TUNE_ROWS = (1024, 4096)            # fused steps are compiled (tuned) for at least these rows: a 1024² encode
    _ops = EAGER                        # the elementwise steps of the forward running now (fusion.py)

    def __init__(self, visual, language_model, spec: Qwen3VLSpec, dtype: torch.dtype, device,
                 weights=None, sdpa: str = "auto", graphs: GraphCache | None = None, fusion: Fusion | str | None = None):
        require_choice("sdpa mode", sdpa, SDPA_MODES)
        self.visual = visual
        self.lm = language_model
        self.spec = spec
        self.dtype = dtype
        self.device = normalize_device(device)
        self.weights = weights if weights is not None else DirectWeights(dtype, self.device)
        self.sdpa = sdpa
        self.graphs = graphs            # CUDA graphs of repeated encodes (None: always eager)
        self.fusion = fusion if isinstance(fusion, Fusion) else Fusion(fusion)
        self.staging = HostStaging()    # pinned buffers of image uploads
        self._tables: OrderedDict = OrderedDict()     # vision tables per (grid, device, dtype), on the device
        self._packed_at: tuple = ()     # packed weights' addresses after the last pack_projections
        self.residency = None           # the owner's residency token of the weights (None: never pack them)

    @property
    def _gqa(self) -> bool:
        """SDPA's own grouped-query attention (no repeated K/V copies) where torch has it, on the GPU."""
        return self.device.type == "cuda" and _SDPA_GQA

    # ------------------------------------------------------------------ validation

    def check(self) -> None:
        check_modules(self.spec, self.visual, self.lm)

    # ------------------------------------------------------------------ primitive ops

    def _linear(self, m, x, fn=F.linear):
        w, b, tok = self.weights.get(m)
        y = fn(x, w, b)
        if tok is not None:
            self.weights.release(m, w, b, tok)
        return y

    def _joint_linear(self, ms, x):
        """x [W₁; W₂; …]ᵀ as one GEMM where the modules' weights are consecutive row blocks of one tensor
        (pack_projections) and need no per-call cast, else None (then run them one by one)."""
        got = [self.weights.get(m) for m in ms]
        joint = joint_rows([w for w, _, _ in got]) if all(b is None and t is None for _, b, t in got) else None
        for m, (w, b, tok) in zip(ms, got):
            self._release(m, w, b, tok)
        return None if joint is None else F.linear(x, joint)

    # the projections of a decoder layer that read the same input: each group stored as one block, one GEMM
    PACKED_GROUPS = (("self_attn", ("q_proj", "k_proj", "v_proj")), ("mlp", ("gate_proj", "up_proj")))

    def packed_groups(self, layer) -> list[tuple]:
        """The PACKED_GROUPS modules of one language-model layer."""
        return [tuple(getattr(getattr(layer, part), name) for name in names) for part, names in self.PACKED_GROUPS]

    def pack_projections(self, token) -> int:
        """Store each language-model layer's q/k/v and gate/up weights as one block per group (weights.pack_rows:
        same values and bytes) so the forward runs one GEMM for each (q/k/v: ≈ 6 µs less per layer at 1024² on an
        H200, bench/kernel_shapes.py). Called by forward with the owner's residency token (`residency`, set after
        every load; None: not fully resident, nothing done) wherever no CUDA graph replays (a graph's weights
        are where its capture, after packing, read them); a no-op while those weights sit where the last call left
        them (~160 pointers compared: any load or patch moves some). Packing anything means the weights moved: the CUDA
        graphs captured over the old addresses can never replay again and are released (their memory pools with
        them). (The scan cannot be skipped under an unchanged token: ComfyUI unpatching a LoRA'd clone restores
        the original token with a middle layer's weight replaced.) The number of groups packed."""
        if token is None or self.lm.layers[0].self_attn.q_proj.weight.device != self.device:
            return 0                    # (a token left from before an unload: the weights are elsewhere now)
        groups = self.__dict__.get("_groups")
        if groups is None:
            groups = self._groups = [g for layer in self.lm.layers for g in self.packed_groups(layer)]
            self._proj_slots = weight_slots([m for g in groups for m in g], ("weight",))
        where = addresses(self._proj_slots)
        if where == self._packed_at and all(joint_rows([m.weight for m in g]) is not None
                                            for g in groups[:len(self.PACKED_GROUPS)]):
            return 0                    # (layer 0 checked too: a reload may hand out the very same addresses)
        n = sum(map(pack_rows, groups))
        self._packed_at = addresses(self._proj_slots)
        if n and self.graphs is not None:
            self.graphs.release()
        return n

    def _norm_params(self, m):
        """(weight, bias, eps, token) of a LayerNorm / RMSNorm (ComfyUI's RMSNorm(add=True): scale 1 + weight)."""
        w, b, tok = self.weights.get(m)
        if getattr(m, "add", False):
            w = w + 1.0
        eps = getattr(m, "eps", None)
        if eps is None:
            eps = getattr(m, "variance_epsilon", self.spec.rms_eps)
        return w, b, eps, tok

    def _release(self, m, w, b, tok):
        if tok is not None:
            self.weights.release(m, w, b, tok)

    def _layer_norm(self, m, x):
        w, b, eps, tok = self._norm_params(m)
        y = F.layer_norm(x, (x.shape[-1],), w, b, eps)
        self._release(m, w, b, tok)
        return y

    def _add_norm(self, m, x, r, rms: bool):
        """(x + r, norm(x + r)) through the fused step; r None: (x, norm(x)). Rows flattened for the steps."""
        w, b, eps, tok = self._norm_params(m)
        d = x.shape[-1]
        if r is None:
            y = F.rms_norm(x, (d,), w, eps) if rms else F.layer_norm(x, (d,), w, b, eps)
        else:
            shape = x.shape
            if rms:
                x, y = self._ops.add_rms_norm(x.reshape(-1, d), r.reshape(-1, d), w, eps)
            else:
                x, y = self._ops.add_layer_norm(x.reshape(-1, d), r.reshape(-1, d), w, b, eps)
            x, y = x.view(shape), y.view(shape)
        self._release(m, w, b, tok)
        return x, y

    def image_dtype(self) -> torch.dtype:
        """The dtype a float32 image has inside the forward (on the wire to a GPU, float32 on the CPU)."""
        return self.IMAGE_WIRE_DTYPE if self.device.type == "cuda" and self.IMAGE_WIRE_DTYPE else torch.float32

    def _wire_dtype(self, t: torch.Tensor) -> torch.dtype:
        """t's dtype on the way into a GPU forward."""
        return (self.IMAGE_WIRE_DTYPE or t.dtype) if t.is_floating_point() else t.dtype

    def upload(self, t: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """An image t on the runner's device (CPU tensors through pinned staging buffers, asynchronously; floating
        images as IMAGE_WIRE_DTYPE on a GPU); out: the device tensor to write it into (else a new one)."""
        return self.staging.upload(t, self.device, self._wire_dtype(t), out=out)

    def prefetch(self, images: Sequence[torch.Tensor]):
        """A context: inside it, the staging copies of these CPU images (the upload's host part) run on the staging
        thread from now on, beside the caller's host work before the forward (staging.HostStaging.prefetched); a
        no-op off CUDA. The encoders open it first thing."""
        if self.device.type != "cuda":
            return contextlib.nullcontext()
        return self.staging.prefetched(images, [self._wire_dtype(im) for im in images])

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
        ids = input_ids if isinstance(input_ids, list) else list(map(int, input_ids))     # (callers pass tolist())
        fkey = self._fusion_key()
        ops = self.fusion.ops(fkey, self.device)
        graphed = self._graphs_possible() and bsz == 1
        images, wires, vkey = self._inputs(images, graphed, ops.fused)
        feats = lkey = None
        if graphed:
            out, feats, lkey = self._replay_parts(vkey, ids, wires, images, wanted, ops.fused)
            if out is not None:
                return out
        if self.pack_projections(self.residency) and graphed:     # packing moved weights and dropped the graphs
            feats, lkey = None, self._lm_key(ids, wires, wanted, ops.fused)
        tables = self._tables_for(ids, image_pad_id, grids)
        out = self._capture_parts(vkey, lkey, feats, tables, images, wanted, ops) if graphed else None
        if out is None:     # batches never capture: they take the compiled steps eagerly (guard costs are noise there)
            out = self._on(ops if self.fusion.uncaptured or bsz > 1 else EAGER, self._device_forward, tables, images,
                           wanted)
        if not ops.fused:     # compile the fused steps for these widths (background; never inside this encode)
            p = (int(images[0].shape[1]) * int(images[0].shape[2]) // s.patch_size ** 2) if images else 0
            rows = (max(bsz * len(ids), self.TUNE_ROWS[0]), max(bsz * p, self.TUNE_ROWS[1]))
            self.fusion.after_encode(fkey, self.device, lambda: step_examples(self, *rows))
        return out

    def _on(self, ops, fn, *args):
        """fn(*args) with the steps `ops`, under inference mode and the SDPA setting."""
        self._ops = ops
        try:
            with torch.inference_mode(), sdpa_context(self.sdpa, self.device):
                return fn(*args)
        finally:
            self._ops = EAGER

    # ------------------------------------------------------------------ fused steps (fusion.py)

    def _fusion_key(self):
        ffn = tuple(self.lm.layers[0].mlp.gate_proj.weight.shape)
        return (self.device, self.dtype, self.spec, ffn)

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
        return self._lm_from(tables, list(self._vision_features(images).values()), wanted)

    def _vision_features(self, images: list[torch.Tensor]) -> dict[int, torch.Tensor]:
        """{0: the merged image features [B, ΣP_k/m², D] of all images, 1…: their DeepStack features} ({}: none)."""
        if not images:
            return {}
        merged, deep = [], []
        for im in images:
            m, d = self.vision(im)
            merged.append(m)
            deep.append(d)
        ds = [torch.cat([d[j] for d in deep], dim=1) for j in range(len(self.spec.deepstack_indexes))]
        return dict(enumerate([torch.cat(merged, dim=1)] + ds))

    def _lm_from(self, tables, feats: list[torch.Tensor], wanted: list[int]) -> dict[int, torch.Tensor]:
        """The language model over the token embeddings with the image features (_vision_features' values) merged."""
        ids_dev, cos, sin, image_pos = tables
        bsz = int(feats[0].shape[0]) if feats else 1
        ew, _, tok = self.weights.get(self.lm.embed_tokens)
        emb = F.embedding(ids_dev, ew)
        if tok is not None:
            self.weights.release(self.lm.embed_tokens, ew, None, tok)
        x = emb.unsqueeze(0).expand(bsz, -1, -1)
        if feats:
            x = x.clone()
            x[:, image_pos] = feats[0].to(x.dtype)
        return self._decoder(x, cos, sin, image_pos, feats[1:], wanted)

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
        cos2, sin2 = (t.repeat(bsz, 1)[:, None, :] for t in (cos, sin))     # [B·N, 1, hd]
        r = None                        # the MLP output not yet added to x (fused into the next norm)
        last = min(deepest, L) - 1
        for i in range(min(deepest, L)):
            layer = lm.layers[i]
            att = layer.self_attn
            x, y = self._add_norm(layer.input_layernorm, x, r, rms=True)
            qkv = self._joint_linear((att.q_proj, att.k_proj, att.v_proj), y)
            qw, _, qe, qt = self._norm_params(att.q_norm)
            kw, _, ke, kt = self._norm_params(att.k_norm)
            if qkv is not None:                        # packed q/k/v weights: one GEMM, v read as a view
                qkv = qkv.view(bsz * n, heads + 2 * kvh, hd)
                q, k = self._ops.qkv_norm_rope(qkv, qw, kw, qe, ke, cos2, sin2, heads, kvh)
                v = qkv[:, heads + kvh:].view(bsz, n, kvh, hd)
            else:
                q = self._linear(att.q_proj, y).view(bsz * n, heads, hd)
                k = self._linear(att.k_proj, y).view(bsz * n, kvh, hd)
                v = self._linear(att.v_proj, y).view(bsz, n, kvh, hd)
                q, k = self._ops.qk_norm_rope(q, k, qw, kw, qe, ke, cos2, sin2)
            self._release(att.q_norm, qw, None, qt)
            self._release(att.k_norm, kw, None, kt)
            q = q.view(bsz, n, heads, hd).transpose(1, 2)
            k = k.view(bsz, n, kvh, hd).transpose(1, 2)
            v = v.transpose(1, 2)
            if rep > 1 and not self._gqa:
                k = k[:, :, None].expand(bsz, kvh, rep, n, hd).reshape(bsz, heads, n, hd)
                v = v[:, :, None].expand(bsz, kvh, rep, n, hd).reshape(bsz, heads, n, hd)
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, **({"enable_gqa": True} if rep > 1 and self._gqa else {}))
            x, y = self._add_norm(layer.post_attention_layernorm, x,
                                  self._linear(att.o_proj, o.transpose(1, 2).reshape(bsz, n, heads * hd)), rms=True)
            gu = self._joint_linear((layer.mlp.gate_proj, layer.mlp.up_proj), y)
            if gu is not None:                         # packed gate/up weights: one GEMM, halves read as views
                y = self._ops.silu_mul_joint(gu.view(-1, gu.shape[-1])).view(bsz, n, -1)
            else:
                g, u = self._linear(layer.mlp.gate_proj, y), self._linear(layer.mlp.up_proj, y)
                y = self._ops.silu_mul(g.view(-1, g.shape[-1]), u.view(-1, u.shape[-1])).view(g.shape)
            r = self._linear(layer.mlp.down_proj, y)
            index = i + 1                              # hidden_states index of this layer's output
            has_ds = i < len(ds_feats)
            if has_ds or index in want or i == last:
                x, r = x + r, None
            if index in want and index < L and not (has_ds and s.deepstack_after_record):
                out[index] = x
            if has_ds:
                if out.get(index) is x:                # (x = x + r is fresh otherwise: no copy needed)
                    x = x.clone()
                x[:, image_pos] = x[:, image_pos] + ds_feats[i].to(x.dtype)
                if index in want and index < L and s.deepstack_after_record:
                    out[index] = x
        if L in want:
            out[L] = self._add_norm(lm.norm, x, None, rms=True)[1]
        return out
