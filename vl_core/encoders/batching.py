"""Batching of several reference images (or text-only prompts) through one forward, and the activation memory
it needs."""
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


def length_batches(lengths: Sequence[int], max_tokens: int = 16384) -> list[list[int]]:
    """Indices of sequences grouped longest first into batches whose padded size (rows × longest row) is at most
    max_tokens (one row at least): sorting by length keeps the padding small."""
    order = sorted(range(len(lengths)), key=lambda i: (-int(lengths[i]), i))
    batches: list[list[int]] = []
    for i in order:
        if batches and (len(batches[-1]) + 1) * int(lengths[batches[-1][0]]) <= max_tokens:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def text_rows_forward(runner, rows: Sequence[Sequence[int]], image_pad_id: int,
                      layers: Sequence[int]) -> dict[int, torch.Tensor]:
    """{layer: [B, N_max, D]} of B text-only id sequences of different lengths through one runner forward.

    Each row is right-padded to the longest with its own last id. The LM is causal, so token t of row b attends
    to tokens ≤ t of row b only: its first len_b states are those of encoding it alone (to float rounding);
    the states past len_b are padding for the caller to drop. Text-only rows share the MRoPE positions 0..N−1,
    so the runner's tables of the longest row serve every row (Qwen3VLRunner's own tables and decoder loop).
    """
    import torch.nn.functional as F

    from .qwen3vl_runner import sdpa_context

    if not rows or any(not r for r in rows):
        raise ValueError("text_rows_forward needs at least one non-empty id sequence")
    if any(int(t) == image_pad_id for r in rows for t in r):
        raise ValueError("text rows must not hold image-pad ids (they carry no images)")
    wanted = sorted({int(layer) for layer in layers})
    longest = max(rows, key=len)
    ids = torch.tensor([[int(t) for t in r] + [int(r[-1])] * (len(longest) - len(r)) for r in rows])
    runner.pack_projections(runner.residency)      # (as forward does where no graph replays)
    _, cos, sin, image_pos = runner._tables_for([int(t) for t in longest], image_pad_id, [])
    with torch.inference_mode(), sdpa_context(runner.sdpa, runner.device):
        embed = runner.lm.embed_tokens
        weight, _, token = runner.weights.get(embed)
        x = F.embedding(ids.to(runner.device), weight)
        if token is not None:
            runner.weights.release(embed, weight, None, token)
        return runner._decoder(x, cos, sin, image_pos, [], wanted)
