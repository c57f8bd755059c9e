"""Where and when the DiT injection acts: per-block weights and timestep schedules (pure Python, no comfy).

Per-block weights
-----------------
One parseable string gives a weight to each of the model's ``n`` main blocks (Z-Image Turbo: 30):

    spec   := entry ((',' | ';') entry)*
    entry  := target [':' weight]
    target := INT                 one block, 0-based
            | INT '-' INT         an inclusive range, low-high
            | PRESET              'all' | 'early' | 'middle' | 'late'
    weight := a finite float (default 1.0)

Entries are applied left to right, so a later entry overrides an earlier one on the blocks they
share ("all:0.5, 27:0" = every block 0.5 except block 27). Blocks no entry names get 0.
Presets split the ``n`` blocks into thirds by ``segment(i) = ⌊3·i / n⌋``:
early = segment 0 (composition / structure), middle = segment 1, late = segment 2 (texture / detail);
for n = 30 that is 0-9, 10-19, 20-29.

Timestep window and schedule
----------------------------
``start_percent`` / ``end_percent`` are sampling-progress percents (0 = first step, pure noise,
1 = the end), converted to sigmas with the model's own ``model_sampling.percent_to_sigma``:
a step with sigma σ is active iff  σ_end ≤ σ ≤ σ_start  (ComfyUI's own convention for conditioning
timestep ranges; start 0 / end 1 leave that side open).  Inside the window the progress

    u = clamp((p(σ) − start) / (end − start), 0, 1),   p = percent_to_sigma⁻¹ (found by bisection)

sets the strength factor s(u):
    constant     s = 1
    linear_up    s = u              (0 at the window's start, 1 at its end)
    linear_down  s = 1 − u
    cosine       s = ½·(1 + cos π·u)  (smooth 1 → 0, like a cosine learning-rate decay)
Outside the window the factor is exactly 0 (the hooks then do no work at all).
"""
from __future__ import annotations

import math
import re
from collections.abc import Callable

from .checks import require_choice

PRESETS = ("all", "early", "middle", "late")
SCHEDULES = ("constant", "linear_up", "linear_down", "cosine")
SPEC_HELP = ("write e.g. 'all', 'early', 'middle:0.5', '0-9:1.0, 10-19:0.5, 27:0' (block indices are 0-based; "
             f"presets: {', '.join(PRESETS)}; blocks not named get 0)")

_ENTRY = re.compile(r"^(?P<target>[A-Za-z_]+|\d+(?:\s*-\s*\d+)?)\s*(?::\s*(?P<weight>\S+))?$")


def segment(i: int, num_blocks: int) -> int:
    """Third of the model block i lies in: ⌊3·i / n⌋ ∈ {0, 1, 2} (0 = early, 1 = middle, 2 = late)."""
    return (3 * i) // num_blocks


def preset_blocks(name: str, num_blocks: int) -> list[int]:
    """Block indices of a preset: all = 0..n−1; early / middle / late = the blocks with segment 0 / 1 / 2."""
    _require_num_blocks(num_blocks)
    key = name.strip().lower()
    require_choice("block preset", key, PRESETS)
    if key == "all":
        return list(range(num_blocks))
    seg = PRESETS.index(key) - 1
    return [i for i in range(num_blocks) if segment(i, num_blocks) == seg]


def parse_block_weights(spec: str, num_blocks: int) -> list[float]:
    """Weights [n] from a block-weight string (grammar in the module docstring); raises ValueError with the fix."""
    _require_num_blocks(num_blocks)
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"block_weights is empty: {SPEC_HELP}")
    weights = [0.0] * num_blocks
    last = num_blocks - 1
    for raw in re.split(r"[,;]", spec):
        entry = raw.strip()
        if not entry:
            continue
        m = _ENTRY.match(entry)
        if m is None:
            if entry.startswith("-"):
                raise ValueError(f"cannot read {entry!r} in block_weights {spec!r}: negative block indices are "
                                 f"not supported (this model's blocks are 0-{last}); {SPEC_HELP}")
            raise ValueError(f"cannot read {entry!r} in block_weights {spec!r}: {SPEC_HELP}")
        target, wtext = m.group("target"), m.group("weight")
        weight = 1.0
        if wtext is not None:
            try:
                weight = float(wtext)
            except ValueError:
                raise ValueError(f"weight {wtext!r} of {entry!r} in block_weights is not a number: {SPEC_HELP}") from None
            if not math.isfinite(weight):
                raise ValueError(f"weight {wtext!r} of {entry!r} in block_weights must be finite")
        if target[0].isalpha() or target[0] == "_":
            try:
                blocks = preset_blocks(target, num_blocks)
            except ValueError as e:
                raise ValueError(f"{e} or block numbers, in block_weights {spec!r}; {SPEC_HELP}") from None
        else:
            lo, _, hi = target.partition("-")
            lo = int(lo)
            hi = int(hi) if hi else lo
            if lo > hi:
                raise ValueError(f"block range {target!r} in block_weights runs backwards: write {hi}-{lo}")
            if hi > last:
                raise ValueError(f"block {hi} in {entry!r} is out of range: this model has {num_blocks} main "
                                 f"blocks (0-{last})")
            blocks = range(lo, hi + 1)
        for i in blocks:
            weights[i] = weight
    return weights


def schedule_value(name: str, u: float) -> float:
    """Strength factor s(u) at window progress u ∈ [0, 1] (clamped): constant 1, linear_up u, linear_down 1−u,
    cosine ½(1 + cos πu)."""
    require_choice("schedule", name, SCHEDULES)
    u = min(1.0, max(0.0, float(u)))
    if name == "constant":
        return 1.0
    if name == "linear_up":
        return u
    if name == "linear_down":
        return 1.0 - u
    return 0.5 * (1.0 + math.cos(math.pi * u))


def sigma_to_percent(sigma: float, percent_to_sigma: Callable[[float], float], tol: float = 1e-6,
                     max_iter: int = 60) -> float:
    """p ∈ [0, 1] with percent_to_sigma(p) = sigma, by bisection (percent_to_sigma is non-increasing).

    Sigmas above percent_to_sigma(0) give 0, below percent_to_sigma(1) give 1.
    """
    sigma = float(sigma)
    lo, hi = 0.0, 1.0
    if sigma >= float(percent_to_sigma(lo)):
        return 0.0
    if sigma <= float(percent_to_sigma(hi)):
        return 1.0
    for _ in range(max_iter):
        if hi - lo <= tol:
            break
        mid = 0.5 * (lo + hi)
        if float(percent_to_sigma(mid)) > sigma:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


class TimestepWindow:
    """start/end percent + schedule → strength factor per sigma (0 outside the window).

    factor(σ, percent_to_sigma) = 0                        if σ > σ_start or σ < σ_end
                                  s((p(σ) − start)/(end − start))  otherwise
    with σ_start = percent_to_sigma(start), σ_end = percent_to_sigma(end).
    """

    def __init__(self, start_percent: float = 0.0, end_percent: float = 1.0, schedule: str = "constant"):
        start, end = float(start_percent), float(end_percent)
        for name, value in (("start_percent", start), ("end_percent", end)):
            if not 0.0 <= value <= 1.0:  # also refuses NaN
                raise ValueError(f"{name} must lie in [0, 1], got {value}")
        if start >= end:
            raise ValueError(f"start_percent ({start}) must be below end_percent ({end}): the injection would never "
                             "act (0 = first step, 1 = last)")
        require_choice("schedule", schedule, SCHEDULES)
        self.start, self.end, self.schedule = start, end, schedule

    def bounds(self, percent_to_sigma: Callable[[float], float]) -> tuple[float, float]:
        """(σ_start, σ_end): the window is σ_end ≤ σ ≤ σ_start."""
        return float(percent_to_sigma(self.start)), float(percent_to_sigma(self.end))

    def contains(self, sigma: float, percent_to_sigma: Callable[[float], float]) -> bool:
        """σ_end ≤ σ ≤ σ_start; start 0 has no upper bound and end 1 no lower bound (the full window is always on)."""
        s_start, s_end = self.bounds(percent_to_sigma)
        sigma = float(sigma)
        return (self.end >= 1.0 or s_end <= sigma) and (self.start <= 0.0 or sigma <= s_start)

    def progress(self, sigma: float, percent_to_sigma: Callable[[float], float]) -> float:
        """u = clamp((p(σ) − start) / (end − start), 0, 1)."""
        p = sigma_to_percent(sigma, percent_to_sigma)
        return min(1.0, max(0.0, (p - self.start) / (self.end - self.start)))

    def factor(self, sigma: float, percent_to_sigma: Callable[[float], float]) -> float:
        if not self.contains(sigma, percent_to_sigma):
            return 0.0
        if self.schedule == "constant":
            return 1.0
        return schedule_value(self.schedule, self.progress(sigma, percent_to_sigma))


def _require_num_blocks(num_blocks: int) -> None:
    if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks < 1:
        raise ValueError(f"the model must have at least one main block, got {num_blocks!r}")
