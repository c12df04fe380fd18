"""Seeded comparisons: mean and spread over seeds, and a gain over a baseline that counts only
when it stands out of the seed noise.

The rule (one place, so every benchmark applies it the same way): runs are *paired* by seed
(a recipe and the baseline trained with seed ``s`` share initial weights and batch order),
the gain is the mean of the per-seed differences ``d_s = recipe_s - baseline_s``, and it is
significant when ``|mean(d)| > 2 * std(d)``, with ``std`` the sample standard deviation
(``ddof=1``) of those differences. Pairing cancels what a seed does to both runs, so
``std(d)`` is the noise of the gain itself. In t-test terms the rule asks for
``t = mean / (std / sqrt(n)) > 2 sqrt(n)``: with 3 seeds ``t > 3.46`` (two-sided p < 0.075
at 2 degrees of freedom); it is a screening rule, not a proof. With fewer than two paired
seeds nothing is significant: there is no spread to compare with.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Mapping, Optional

SIGNIFICANCE_FACTOR = 2.0  # a gain counts when |mean| > SIGNIFICANCE_FACTOR * std of the paired differences


@dataclass(frozen=True)
class SeedSummary:
    """Mean and sample standard deviation (``ddof=1``; NaN below two values) over seeds."""

    mean: float
    std: float
    n: int


@dataclass(frozen=True)
class PairedGain:
    """Mean and sample std of per-seed differences over ``n`` paired seeds; ``verdict`` is
    ``"better"`` or ``"worse"`` when significant (see the module docstring), else ``"n.s."``."""

    mean: float
    std: float
    n: int
    verdict: str

    @property
    def significant(self) -> bool:
        return self.verdict != "n.s."


def _finite(values: Iterable[Optional[float]]) -> list[float]:
    return [float(v) for v in values if v is not None and math.isfinite(float(v))]


def _mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, math.nan
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def seed_summary(values: Iterable[Optional[float]]) -> SeedSummary:
    """Mean and sample std of the finite values (None and NaN, e.g. an undefined metric, are left out)."""
    finite = _finite(values)
    mean, std = _mean_std(finite)
    return SeedSummary(mean, std, len(finite))


def paired_gain(
    values: Mapping[int, Optional[float]],
    baseline: Mapping[int, Optional[float]],
    factor: float = SIGNIFICANCE_FACTOR,
) -> PairedGain:
    """Gain of ``values`` over ``baseline`` (both: seed -> metric) on the seeds where both are finite.

    >>> paired_gain({0: 0.30, 1: 0.32, 2: 0.31}, {0: 0.25, 1: 0.26, 2: 0.27}).verdict
    'better'
    """
    seeds = [s for s in values if s in baseline]
    pairs = [(values[s], baseline[s]) for s in seeds]
    differences = [float(v) - float(b) for v, b in pairs if len(_finite([v, b])) == 2]
    mean, std = _mean_std(differences)
    verdict = "n.s."
    if len(differences) >= 2 and abs(mean) > factor * std:
        verdict = "better" if mean > 0 else "worse"
    return PairedGain(mean, std, len(differences), verdict)


def format_mean_std(summary: SeedSummary, scale: float = 100.0, digits: int = 1) -> str:
    """``"24.6 ± 0.8"`` (``scale`` turns fractions into percent); one value: no spread; none: "-"."""
    if summary.n == 0:
        return "-"
    if summary.n < 2:
        return f"{scale * summary.mean:.{digits}f}"
    return f"{scale * summary.mean:.{digits}f} ± {scale * summary.std:.{digits}f}"


def format_gain(gain: PairedGain, scale: float = 100.0, digits: int = 1) -> str:
    """``"+2.1 ± 0.5 *"`` when significant, ``"+0.4 ± 0.6 (n.s.)"`` when not, ``"+0.4 (n=1)"``
    with a single paired seed, "-" with none. The marker is decided on unrounded values."""
    if gain.n == 0:
        return "-"
    if gain.n < 2:
        return f"{scale * gain.mean:+.{digits}f} (n=1)"
    marker = "*" if gain.significant else "(n.s.)"
    return f"{scale * gain.mean:+.{digits}f} ± {scale * gain.std:.{digits}f} {marker}"
