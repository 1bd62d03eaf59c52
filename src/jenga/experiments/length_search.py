"""The longest-trainable-length search: which lengths to probe, guided by the memory the probes used.

A probe at a long length costs a whole training step (at 512K tokens on an 8B model, about ten minutes of
attention), so the search spends as few as it can near the limit. Peak memory grows about linearly with the
length (flash attention; checkpointed layers): after one probe that fits, the line through the memory kept
between steps (weights, adapters, optimizer state) and that probe's peak, or through the two longest probes
that fit, predicts where the limit is. The search probes where the line reaches 97% of the memory, then all of
it, then one step beyond. Without memory figures (or when the line says nothing useful) it doubles, then
bisects. Every result is still a probe that ran: `good` trained a step, `bad` did not."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

# Shares of the process's memory the predictions aim at: first a length that should fit with room for the
# allocator's reserve and fragmentation (which sit on top of the peak it reports), then the whole of it.
AIMS = (0.97, 1.0)
# The furthest one prediction may jump past the longest length that fitted (a wrong line costs one long probe).
MAX_JUMP = 16


@dataclass(frozen=True)
class Probe:
    """One probe's outcome; the memory figures (GiB), when known, guide the next length."""

    ok: bool
    peak_gib: float | None = None  # the step's allocator peak
    base_gib: float | None = None  # what stays allocated between steps
    limit_gib: float | None = None  # what the process may allocate (its cap, or the GPU's memory)


def predict_longest(fitted: dict[int, Probe], step: int, aim: float = AIMS[0]) -> int | None:
    """The longest multiple of `step` at which the memory line reaches `aim` of the limit, or None without a
    usable line."""
    points = sorted((seq, p) for seq, p in fitted.items() if p.peak_gib is not None and p.limit_gib is not None)
    if not points:
        return None
    seq, last = points[-1]
    if len(points) >= 2:
        seq0, first = points[-2]
        slope = (last.peak_gib - first.peak_gib) / (seq - seq0)
    elif last.base_gib is not None:
        slope = (last.peak_gib - last.base_gib) / seq
    else:
        return None
    if slope <= 0:
        return None
    longest = seq + (aim * last.limit_gib - last.peak_gib) / slope
    return max(0, int(longest) // step * step)


def longest_fitting(
    probe: Callable[[int], Probe], step: int, cap: int, start: int | None = None
) -> tuple[int, int | None]:
    """(longest multiple of `step` that trained, first failing length or None up to `cap`).

    Grows from `start` (default `step`) to the length predicted with room to spare, then to the one predicted
    for the whole memory (doubling without a prediction; past both, by a gap that doubles each time), trying
    `cap` itself rather than passing it; after the first failure, probes once just under the roomy prediction,
    then bisects. Assumes fitting is monotone in the length.
    """
    fitted: dict[int, Probe] = {}
    good, bad, seq, gap = 0, None, start or step, step
    while seq <= cap:
        result = probe(seq)
        if not result.ok:
            bad = seq
            break
        fitted[seq], good = result, seq
        if seq == cap:
            break
        guesses = [predict_longest(fitted, step, aim) for aim in AIMS]
        ahead = [guess for guess in guesses if guess is not None and guess > seq]
        if None in guesses:
            nxt = seq * 2
        elif not ahead:
            nxt, gap = seq + gap, gap * 2
        else:
            nxt, gap = min(ahead[0], seq * MAX_JUMP), step
        seq = min(nxt, cap)
    guided = True
    while bad is not None and bad - good > step:
        guess = predict_longest(fitted, step) if guided else None
        guided = False
        mid = (good + bad) // 2 // step * step if guess is None else min(max(guess, good + step), bad - step)
        result = probe(mid)
        if result.ok:
            fitted[mid], good = result, mid
        else:
            bad = mid
    return good, bad
