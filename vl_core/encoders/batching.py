"""Batching of several reference images through one forward, and the activation memory it needs."""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .qwen3vl_spec import Qwen3VLSpec


def batch_chunks(count: int, tokens_per_item: int, max_tokens: int = 65536) -> list[tuple[int, int]]:
    """[start, end) chunks of `count` items with at most max(1, max_tokens // tokens_per_item) items each."""
    per = max(1, max_tokens // max(1, tokens_per_item))
    return [(i, min(count, i + per)) for i in range(0, count, per)]


def same_size_batches(images: Sequence[torch.Tensor], patches_of: Callable[[int, int], int],
                      max_batch_tokens: int = 65536) -> list[tuple[list[int], list[list[int]]]]:
    """[(group, chunks)]: indices of the images grouped by their [H, W] (first-seen order), each group cut
    into chunks (batch_chunks) of at most max_batch_tokens vision patches, patches_of(H, W) per image."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, im in enumerate(images):
        groups.setdefault((int(im.shape[0]), int(im.shape[1])), []).append(i)
    return [(members, [members[a:b] for a, b in batch_chunks(len(members), patches_of(h, w), max_batch_tokens)])
            for (h, w), members in groups.items()]


def activation_bytes(spec: Qwen3VLSpec, num_tokens: int, sizes: Sequence[tuple[int, int]], batch: int = 1) -> int:
    """Activation memory estimate of one runner forward, bf16 worst case:
    batch · (P·hv·14 + N·(8·D + 12·D)) · 2 bytes, P = vision patches of `sizes`, N = LM tokens."""
    patches = sum(h * w for h, w in sizes) // spec.patch_size ** 2
    vision = patches * spec.vision_hidden * 14 * 2          # qkv, mlp (4x), residuals
    text = num_tokens * (spec.hidden * 8 + 3 * 4 * spec.hidden) * 2
    return int(batch * (vision + text))
