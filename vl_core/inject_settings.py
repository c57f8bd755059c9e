"""The settings of one DiT Layer Injection, validated once: one frozen value the hooks read (pure Python).

A node application gives its values (method … vl_rope, kv_scale, share, reference_noise, negative_weight: the
node's inputs of the same names) and the model gives its main-block count n. From them the value derives, once:

    block_scale[i] = strength · weight_i          weight_i from block_weights (schedule.parse_block_weights)
    window         = TimestepWindow(start_percent, end_percent, schedule)

and refuses, with the input to fix: an unknown choice, a NaN/Inf scalar, |strength · weight_i| > MAX_BLOCK_SCALE
(the added attention or caption pull would overflow or saturate long before), a negative block scale where the
strength is a log-strength bias (concat, share = joint: log w), and a caption-stream method whose only non-zero
weight is on the last block (Z-Image drops the caption after it, so that weight changes nothing). A
caption-stream method never acts on the last block: its weight there is set to 0 (a no-op removed, outputs
unchanged). Every block_scale 0 (strength 0) is valid and `acts` is False: the node installs nothing.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from . import schedule
from .checks import require_choice
from .inject import APPLY_TO, CAPTION_MODES
from .inject_extra import KV_SCALES, SHARES

VL_ROPE = ("none", "caption")
REFERENCE_NOISE = ("matched", "clean")
MAX_BLOCK_SCALE = 16.0  # |strength × block weight| cap; 1 already replaces the caption (lerp)


@dataclass(frozen=True)
class MethodTraits:
    """What the settings must know of an injection method (the method classes in nodes/ carry one).

    caption_stream: it writes the caption slice of the main blocks (dropped by the model after the last one).
    log_strength: the block scale w is a log-strength attention bias log(w) (concat), so it must be >= 0.
    attention: it adds attention to the image tokens, so `share` and `kv_scale` apply to it.
    regional: a MASK can limit which image tokens it acts on.
    """

    name: str
    caption_stream: bool = False
    log_strength: bool = False
    attention: bool = False
    regional: bool = False


@dataclass(frozen=True)
class InjectionSettings:
    """One node application's settings against a model of `num_blocks` main blocks (ValueError with the fix)."""

    method: MethodTraits
    num_blocks: int
    strength: float = 0.5
    block_weights: str = "all"
    caption_mode: str = "lerp"
    start_percent: float = 0.0
    end_percent: float = 1.0
    schedule: str = "constant"
    apply_to: str = "cond_only"
    token_budget: int = 256
    vl_rope: str = "none"
    kv_scale: str = "v"
    share: str = "add"
    reference_noise: str = "matched"
    reference_adain: bool = False
    negative_weight: float = 1.0
    block_scale: tuple[float, ...] = field(init=False)
    window: schedule.TimestepWindow = field(init=False, compare=False)

    def __post_init__(self):
        require_choice("caption_mode", self.caption_mode, CAPTION_MODES)
        require_choice("apply_to", self.apply_to, APPLY_TO)
        require_choice("vl_rope", self.vl_rope, VL_ROPE)
        require_choice("schedule", self.schedule, schedule.SCHEDULES)
        require_choice("kv_scale", self.kv_scale, KV_SCALES)
        require_choice("share", self.share, SHARES)
        require_choice("reference_noise", self.reference_noise, REFERENCE_NOISE)
        budget = self.token_budget
        if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not math.isfinite(budget) \
                or int(budget) != budget or budget < 0:
            raise ValueError(f"token_budget must be an integer >= 0 (0 = all VL tokens), got {budget!r}")
        strength = finite_number("strength", self.strength)
        start = finite_number("start_percent", self.start_percent)
        end = finite_number("end_percent", self.end_percent)
        object.__setattr__(self, "negative_weight", finite_number("negative_weight", self.negative_weight))
        weights = schedule.parse_block_weights(self.block_weights, self.num_blocks)
        scale = scaled_block_weights(strength, weights, self.block_weights)
        object.__setattr__(self, "strength", strength)
        object.__setattr__(self, "token_budget", int(budget))
        object.__setattr__(self, "window", schedule.TimestepWindow(start, end, self.schedule))
        object.__setattr__(self, "block_scale", self._checked_scale(scale))

    def _checked_scale(self, scale: list[float]) -> tuple[float, ...]:
        n = self.num_blocks
        if self.log_strength and any(s < 0 for s in scale):
            what = "concat" if self.method.log_strength else "share=joint"
            raise ValueError(f"{what} uses strength × block weight as a log-strength attention bias log(w), so it "
                             f"must be >= 0; strength {self.strength} × block_weights {self.block_weights!r} is "
                             "negative somewhere: use a positive strength (1 = unbiased, 0 = off)")
        if self.method.caption_stream and any(scale):
            if not any(scale[:-1]):
                raise ValueError(f"block_weights {self.block_weights!r} gives {self.method.name} weight only to the "
                                 f"last block ({n - 1}), whose caption Z-Image discards right after it: the "
                                 f"injection would change nothing; give an earlier block (0-{n - 2}) a weight")
            scale[-1] = 0.0
        return tuple(scale)

    @property
    def log_strength(self) -> bool:
        """Whether w is a log-strength bias: concat, or an attention method sharing one softmax (joint)."""
        return self.method.log_strength or (self.method.attention and self.share == "joint")

    @property
    def acts(self) -> bool:
        """Some block has a non-zero scale (strength 0 or all-zero block weights: the plain model)."""
        return any(self.block_scale)

    @property
    def always_on(self) -> bool:
        """The factor is 1 at every step, so no sigma needs reading: the whole run and a constant strength."""
        w = self.window
        return w.start <= 0.0 and w.end >= 1.0 and w.schedule == "constant"

    def step_factor(self, sigma: float, percent_to_sigma) -> float:
        """Window × schedule factor at σ (0 outside the window)."""
        return self.window.factor(sigma, percent_to_sigma)


def finite_number(name: str, value) -> float:
    """float(value), or a ValueError naming the input when it is not a finite number."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a finite number, got {value!r}") from None
    if not math.isfinite(number):
        raise ValueError(f"{name} must be finite, got {number}: set a number")
    return number


def scaled_block_weights(strength: float, weights: list[float], spec: str = "") -> list[float]:
    """strength · w_i per block, refused when some |strength · w_i| > MAX_BLOCK_SCALE (names both inputs)."""
    scale = [strength * w for w in weights]
    for i, s in enumerate(scale):
        if not abs(s) <= MAX_BLOCK_SCALE:  # also catches an inf/NaN product of two finite values
            raise ValueError(f"strength {strength} × block_weights {spec!r} gives block {i} a scale of {s:g}; "
                             f"|strength × block weight| must be at most {MAX_BLOCK_SCALE:g}: lower strength or "
                             "the block weights")
    return scale


__all__ = ["MAX_BLOCK_SCALE", "REFERENCE_NOISE", "VL_ROPE", "InjectionSettings", "MethodTraits", "finite_number",
           "scaled_block_weights"]
