"""Token layout of one encode: the chat text's ids, the prompt's span in them, image pads expanded per image.

Both backends build the chat text with extract.chat_pieces; `tokenizer` is a Hugging Face tokenizer
(callable; fast or Python). Pure functions: no model, no ComfyUI.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from .extract import IMAGE_PAD, chat_pieces

Span = tuple[int, int]


def tokenize_chat(tokenizer, before: str, text: str, after: str) -> tuple[list[int], Span]:
    r"""Ids of the chat text before+text+after tokenized in one piece (as ComfyUI does), and the prompt's
    [start, end) among them: the tokens overlapping the prompt's characters.

    Exact also where a token straddles the boundary (a prompt starting with "\n" after "user\n" merges
    into one "\n\n" token, so tokenizing the pieces separately would differ); such a token counts as prompt.
    """
    ids, offsets = _ids_and_offsets(tokenizer, before + text + after)
    c0, c1 = len(before), len(before) + len(text)
    in_prompt = [i for i, (s, e) in enumerate(offsets) if s < c1 and e > c0 and e > s]
    if in_prompt:
        return ids, (in_prompt[0], in_prompt[-1] + 1)
    n_before = len(tokenizer(before, add_special_tokens=False)["input_ids"])
    return ids, (n_before, n_before)


def _ids_and_offsets(tokenizer, chat: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Ids of `chat` and each token's [start, end) characters.

    Fast (Rust) tokenizers report offsets; Python ones cannot (transformers 4.x builds ComfyUI's Qwen
    tokenizer that way), so there each token's end is the length of the decoded prefix up to it.
    """
    try:
        enc = tokenizer(chat, add_special_tokens=False, return_offsets_mapping=True)
        return [int(t) for t in enc["input_ids"]], [tuple(o) for o in enc["offset_mapping"]]
    except NotImplementedError:
        pass
    ids = [int(t) for t in tokenizer(chat, add_special_tokens=False)["input_ids"]]
    ends = [len(tokenizer.decode(ids[:i + 1], skip_special_tokens=False, clean_up_tokenization_spaces=False))
            for i in range(len(ids))]
    return ids, list(zip([0, *ends[:-1]], ends))


def expand_image_pads(raw_ids: Sequence[int], raw_span: Span, image_pad_id: int,
                      image_tokens: Sequence[int]) -> tuple[torch.Tensor, Span]:
    """Repeat the k-th image pad id image_tokens[k] times; map raw_span into the expanded sequence."""
    counts = iter(image_tokens)
    expanded: list[int] = []
    starts: list[int] = []
    for t in raw_ids:
        starts.append(len(expanded))
        if t == image_pad_id:
            n = next(counts, None)
            if n is None:
                raise ValueError(f"more {IMAGE_PAD} tokens than images")
            expanded.extend([t] * n)
        else:
            expanded.append(t)
    if next(counts, None) is not None:
        raise ValueError(f"fewer {IMAGE_PAD} tokens than images")
    starts.append(len(expanded))
    return torch.tensor(expanded, dtype=torch.long), (starts[raw_span[0]], starts[raw_span[1]])


def chat_layout(tokenizer, prompt: str, placement: str, image_pad_id: int,
                image_tokens: Sequence[int]) -> tuple[torch.Tensor, Span]:
    """(expanded ids [N] with image_tokens[k] pad ids for image k, prompt span in them) of the chat text."""
    before, text, after = chat_pieces(prompt, len(image_tokens), placement)
    raw_ids, raw_span = tokenize_chat(tokenizer, before, text, after)
    found = sum(1 for t in raw_ids if t == image_pad_id)
    if found != len(image_tokens):
        raise ValueError(f"the chat text holds {found} {IMAGE_PAD} tokens for {len(image_tokens)} image(s): "
                         f"remove {IMAGE_PAD} / vision tokens from the prompt")
    return expand_image_pads(raw_ids, raw_span, image_pad_id, image_tokens)


def layout_from_ids(tokenizer, raw_ids: Sequence[int], before: str, text: str, after: str,
                    image_tokens: Sequence[int], image_pad_id: int) -> tuple[torch.Tensor, Span, bool]:
    """(expanded ids, prompt span, exact) for ids another tokenizer pass produced (ComfyUI's own).

    exact: raw_ids equal a plain tokenization of the chat text, so the span is exact; otherwise (e.g. an
    "embedding:" or "\\(" in the prompt, which ComfyUI rewrites) the span is estimated from the template:
    [len(ids(before)), len(raw_ids) − len(ids(after))).
    """
    plain_ids, raw_span = tokenize_chat(tokenizer, before, text, after)
    exact = plain_ids == list(raw_ids)
    if not exact:
        n_after = len(tokenizer(after, add_special_tokens=False)["input_ids"])
        raw_span = (len(tokenizer(before, add_special_tokens=False)["input_ids"]), len(raw_ids) - n_after)
    ids, span = expand_image_pads(raw_ids, raw_span, image_pad_id, image_tokens)
    return ids, span, exact


def memoized(memo: dict, key, make, size: int = 64):
    """memo[key], made by make() on a miss; the oldest entries go beyond `size` (layouts are deterministic in
    their key, and re-tokenizing the chat text costs ≈ 0.7 ms per encode)."""
    hit = memo.get(key)
    if hit is None:
        hit = memo[key] = make()
        while len(memo) > size:
            memo.pop(next(iter(memo)))
    return hit
