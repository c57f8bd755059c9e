"""CUDA graphs of the Qwen3-VL runner's single-sequence forward (a mixin of qwen3vl_runner.Qwen3VLRunner), in two
parts: the vision tower and the language model, each captured and replayed through the runner's GraphCache.

Why two: a graph may replay only over the weights its capture read, so its key holds every weight's address, and
that scan (~700 weights, cold in the CPU caches after the previous encode's GPU wait: ≈ 0.3 ms, bench/README.md) sat
before the first kernel. Split, the vision graph launches once its own key (image sizes + ~300 vision weights) is
known and the language model's key (ids, image sizes, layers + its weights) is built while the GPU runs the vision
tower. The language-model graph reads the vision graph's outputs through its own input buffers (one copy each); the
vision graph reads its image in place, from the graph cache's input buffer the upload's DMA writes.

Only with plain resident weights (no per-call casting), never on the CPU, and only for single sequences: a batched
forward is GPU-bound (launches are a small part of it) and its graph would hold GiBs of activations in a private
pool for as long as the encoder lives, out of ComfyUI's sight.
"""
from __future__ import annotations

from .fusion import EAGER, Fusion
from .weights import addresses, weight_slots


class GraphedForward:
    """Graph half of Qwen3VLRunner (needs its graphs, weights, visual, lm, spec, dtype, device, sdpa, fusion, _on,
    _vision_features, _lm_from, _vision_tables, staging, upload, _wire_dtype)."""

    def _graphs_possible(self) -> bool:
        return (self.graphs is not None and self.graphs.usable(self.device)
                and getattr(self.weights, "graph_safe", False) and not Fusion.busy())

    def _part_key(self, part: str, module, shape_key: tuple, fused: bool):
        """(part, module, settings, shape_key, fused, every weight's address in the module now) or None where a
        weight slot was emptied: moves and swapped Parameter objects both change it."""
        slots = self.__dict__.setdefault("_part_slots", {})
        if part not in slots:
            slots[part] = weight_slots(list(module.modules()))
        sig = addresses(slots[part])
        if sig is None:
            return None
        return (part, id(module), self.spec, self.dtype, self.device, self.sdpa, shape_key, fused, sig)

    def _vision_key(self, wires, fused: bool):
        """wires: each image's (shape, dtype) on the device."""
        return self._part_key("vision", self.visual, tuple(wires), fused)

    def _lm_key(self, ids, wires, wanted, fused: bool):
        """(The image sizes too: they set the MRoPE positions of the same ids.)"""
        return self._part_key("lm", self.lm, (tuple(ids), tuple(wires), tuple(wanted)), fused)

    def _inputs(self, images, graphed: bool, fused: bool) -> tuple[list, list, tuple | None]:
        """(images on the device, their (shape, dtype) wires, the vision graph's key or None). Graphed, each image
        lands by DMA in the graph cache's own buffer for its wire, over which the vision graph is captured (no
        device copy before a replay). The key (a scan of its weights' addresses) is built while the DMA runs, or,
        where a prefetched staging copy is still running, while that copy ends (then the DMA)."""
        if not graphed or not images:
            images = [self.upload(im) for im in images]
            return images, [(tuple(im.shape), im.dtype) for im in images], None
        wires = [(tuple(im.shape), self._wire_dtype(im)) for im in images]
        copying = any(self.staging.copying(im, dtype) for im, (_, dtype) in zip(images, wires))
        vkey = self._vision_key(wires, fused) if copying else None
        images = [self.upload(im, out=self.graphs.input_buffer(*wire, self.device)) for im, wire in zip(images, wires)]
        return images, wires, (vkey if copying else self._vision_key(wires, fused))

    def _replay_parts(self, vkey, ids, wires, images, wanted, fused: bool):
        """(outputs, vision features, language-model key): outputs where both parts replayed (else None); the vision
        features where its graph replayed ({} without images; None where it has no graph)."""
        feats = {} if not images else (self.graphs.replay(vkey, images, clone=False) if vkey is not None else None)
        lkey = self._lm_key(ids, wires, wanted, fused)          # while the GPU runs the vision graph
        if feats is not None and lkey is not None:
            out = self.graphs.replay(lkey, list(feats.values()))
            if out is not None:     # (its weights sit where the capture read them: packed then, packed now)
                return out, feats, lkey
        return None, feats, lkey

    def _capture_parts(self, vkey, lkey, feats, tables, images, wanted, ops):
        """The forward from the parts: each captured where its key ran once before, eager else; None where the
        vision part has neither graph nor features (the caller runs the whole forward eagerly)."""
        def cancelled():
            return getattr(self.weights, "used_cast", False)

        vision_seen = self.graphs.ran_before(vkey) if feats is None and vkey is not None else False
        lm_seen = self.graphs.ran_before(lkey) if lkey is not None else False      # (both counted on a first run)
        if feats is None:
            if not vision_seen:
                return None
            s = self.spec
            keep = [self._vision_tables(int(im.shape[1]) // s.patch_size, int(im.shape[2]) // s.patch_size)
                    for im in images]
            feats = self.graphs.capture(vkey, self.device, lambda static: self._on(ops, self._vision_features, static),
                                        images, keep=keep, cancelled=cancelled, clone=False)
            if feats is None:
                return None
            out = self.graphs.replay(lkey, list(feats.values())) if lkey is not None else None
            if out is not None:         # (the LM graph stayed while the vision one was evicted)
                return out
        feats = list(feats.values())
        if lm_seen:
            out = self.graphs.capture(lkey, self.device,
                                      lambda static: self._on(ops, self._lm_from, tables, static, wanted),
                                      feats, keep=tables, cancelled=cancelled)
            if out is not None:
                return out
        return self._on(ops if self.fusion.uncaptured else EAGER, self._lm_from, tables, feats, wanted)
