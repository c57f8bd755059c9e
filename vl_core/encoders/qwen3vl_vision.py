"""The Qwen3-VL vision tower of the fast runner (a mixin of qwen3vl_runner.Qwen3VLRunner): patch embedding,
interpolated position embedding, the ViT blocks with their DeepStack taps, and the patch mergers.

It reads weights and runs norms through the runner's primitives (`_linear`, `_add_norm`, `_layer_norm`, the
weight source, `_ops` for the fused steps); tables are built on the CPU once per grid and cached on the device.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .fused_steps import image_windows
from .qwen3vl_tables import signed_sin, vision_tables


class VisionTower:
    """Vision half of Qwen3VLRunner (needs its spec, visual, weights, dtype, device, _tables, TABLE_CACHE)."""

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
        p = gh * gw
        patches = self._ops.patch_rows(image_windows(images, s.patch_size, s.merge_size), s.image_mean, s.image_std,
                                       s.temporal_patch_size, self.dtype)          # [B·P, 3·T·ps²]
        idx, wts, cos, sin = self._vision_tables(gh, gw)

        pw, pb, tok = self.weights.get(v.patch_embed.proj)       # Conv3d with kernel == stride: one matmul
        x = F.linear(patches, pw.reshape(pw.shape[0], -1), pb)
        self._release(v.patch_embed.proj, pw, pb, tok)
        ew, _, tok = self.weights.get(v.pos_embed)
        x = self._ops.add_position(x, ew, idx, wts).view(bsz, p, -1)
        self._release(v.pos_embed, ew, None, tok)

        heads, hd = s.vision_heads, s.vision_head_dim
        cos4, sin4 = (t.repeat(bsz, 1)[:, None, None, :] for t in (cos, sin))   # [B·P, 1, 1, hd] over (qk, heads)
        ds_index = {layer: j for j, layer in enumerate(s.deepstack_indexes)}
        deepstack: list = [None] * len(s.deepstack_indexes)
        r = None                        # the MLP output not yet added to x (fused into the next norm)
        last = len(v.blocks) - 1
        for i, blk in enumerate(v.blocks):
            x, y = self._add_norm(blk.norm1, x, r, rms=False)
            qkv = self._linear(blk.attn.qkv, y).view(bsz * p, 3, heads, hd)
            q, k = self._ops.qkv_rope(qkv, cos4, sin4)
            q, k, val = (t.view(bsz, p, heads, hd).transpose(1, 2) for t in (q, k, qkv[:, 2]))
            o = F.scaled_dot_product_attention(q, k, val)
            x, y = self._add_norm(blk.norm2, x, self._linear(blk.attn.proj, o.transpose(1, 2).reshape(bsz, p, heads * hd)),
                                  rms=False)
            y = self._linear(blk.mlp.linear_fc1, y, self._ops.linear_gelu_tanh)
            r = self._linear(blk.mlp.linear_fc2, y)
            j = ds_index.get(i)
            if j is not None or i == last:
                x, r = x + r, None
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
