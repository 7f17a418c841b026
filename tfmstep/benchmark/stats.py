"""Statistics of the benchmark's repeats: median and inter-quartile range per setting, and ratios with
bootstrap confidence intervals, so a "win" is claimed only when the interval says so.

Every setting is timed in many short repeats interleaved with the others (``timing.time_interleaved``);
a ratio of two settings is the ratio of their medians, and its interval comes from resampling each
setting's repeats with replacement (percentile bootstrap, fixed seed: the same results give the same
report)."""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

LEVEL = 0.95
RESAMPLES = 4000


def summary(values: Sequence[float]) -> dict:
    a = np.asarray(values, np.float64)
    q1, median, q3 = np.percentile(a, [25, 50, 75])
    return {"median": float(median), "q1": float(q1), "q3": float(q3),
            "iqr_relative": float((q3 - q1) / median) if median else float("nan"), "n": int(a.size)}


def _resampled_medians(values, rng, resamples: int) -> np.ndarray:
    a = np.asarray(values, np.float64)
    return np.median(a[rng.integers(0, a.size, (resamples, a.size))], axis=1)


def ratio(numerator: Sequence[float], denominator: Sequence[float], *, scale: float = 1.0,
          denominator_scale: Optional[Sequence[float]] = None, level: float = LEVEL,
          resamples: int = RESAMPLES, seed: int = 0) -> dict:
    """median(numerator) / median(denominator) * scale, with its percentile-bootstrap interval.
    ``denominator_scale``: repeats of a further factor of the denominator (e.g. a measured peak), resampled
    too. The verdict is "win" when the whole interval is above 1, "loss" when below, else "tie"."""
    rng = np.random.default_rng(seed)
    top = _resampled_medians(numerator, rng, resamples)
    bottom = _resampled_medians(denominator, rng, resamples)
    point_bottom = float(np.median(denominator))
    if denominator_scale is not None:
        bottom = bottom * _resampled_medians(denominator_scale, rng, resamples)
        point_bottom *= float(np.median(denominator_scale))
    ratios = scale * top / bottom
    low, high = np.percentile(ratios, [100 * (1 - level) / 2, 100 * (1 + level) / 2])
    point = scale * float(np.median(numerator)) / point_bottom
    return {"ratio": point, "low": float(low), "high": float(high), "level": level,
            "verdict": verdict(float(low), float(high))}


def verdict(low: float, high: float, threshold: float = 1.0) -> str:
    if low > threshold:
        return "win"
    if high < threshold:
        return "loss"
    return "tie"


def meets(interval: dict, goal: float) -> str:
    """Whether a ratio meets ``goal``: "met" (the whole interval at or above it), "not met" (the whole
    interval below), "unclear" (the interval straddles it)."""
    if interval["low"] >= goal:
        return "met"
    if interval["high"] < goal:
        return "not met"
    return "unclear"


def format_interval(interval: dict, digits: int = 2, percent: bool = False) -> str:
    f = (lambda x: f"{100 * x:.{max(0, digits - 1)}f}%") if percent else (lambda x: f"{x:.{digits}f}x")
    return f"{f(interval['ratio'])} [{f(interval['low'])}, {f(interval['high'])}]"
