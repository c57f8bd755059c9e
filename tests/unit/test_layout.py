"""vl_core.layout: chat ids, prompt spans and image-pad expansion, with a character-level stand-in tokenizer."""
import re

import pytest
import torch

from vl_core import extract, layout

PAD = 9


class CharTokenizer:
    """One token per character; special tokens <|...|> are one token each (<|image_pad|> → PAD)."""

    SPECIAL = re.compile(r"<\|[a-z_]+\|>")

    def __call__(self, text, add_special_tokens=False, return_offsets_mapping=False):
        ids, offsets, i = [], [], 0
        while i < len(text):
            m = self.SPECIAL.match(text, i)
            end = m.end() if m else i + 1
            piece = text[i:end]
            ids.append(PAD if piece == extract.IMAGE_PAD else (1000 + len(piece) if m else ord(piece)))
            offsets.append((i, end))
            i = end
        out = {"input_ids": ids}
        if return_offsets_mapping:
            out["offset_mapping"] = offsets
        return out


def test_expand_image_pads_repeats_each_image_and_maps_the_span():
    ids, span = layout.expand_image_pads([1, PAD, 2, 3, PAD, 4], (2, 4), PAD, [3, 2])
    assert ids.tolist() == [1, PAD, PAD, PAD, 2, 3, PAD, PAD, 4] and span == (4, 6)
    with pytest.raises(ValueError, match="more <\\|image_pad\\|> tokens than images"):
        layout.expand_image_pads([PAD, PAD], (0, 0), PAD, [1])
    with pytest.raises(ValueError, match="fewer"):
        layout.expand_image_pads([PAD], (0, 0), PAD, [1, 1])


@pytest.mark.parametrize("placement", ["after_image", "before_image"])
def test_chat_layout_spans_exactly_the_prompt(placement):
    tok = CharTokenizer()
    ids, (s, e) = layout.chat_layout(tok, "a cat", placement, PAD, [4])
    assert (ids == PAD).sum() == 4 and extract.find_runs(ids, PAD) != []
    assert "".join(chr(t) for t in ids[s:e].tolist()) == "a cat"
    with pytest.raises(ValueError, match="holds 2 <\\|image_pad\\|> tokens for 1 image"):
        layout.chat_layout(tok, "sneaky <|image_pad|>", placement, PAD, [4])


def test_layout_from_ids_is_exact_for_plain_ids_and_estimates_otherwise():
    tok = CharTokenizer()
    before, text, after = extract.chat_pieces("dog", 1, "after_image")
    raw = tok(before + text + after)["input_ids"]
    ids, span, exact = layout.layout_from_ids(tok, raw, before, text, after, [2], PAD)
    assert exact and "".join(chr(t) for t in ids[span[0]:span[1]].tolist()) == "dog"
    rewritten = raw[:len(tok(before)["input_ids"])] + [ord("x")] * 5 + tok(after)["input_ids"]   # host rewrote it
    ids, span, exact = layout.layout_from_ids(tok, rewritten, before, text, after, [2], PAD)
    assert not exact and ids[span[0]:span[1]].tolist() == [ord("x")] * 5
    assert isinstance(ids, torch.Tensor)
