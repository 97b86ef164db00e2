"""Interleaved timing: ours and the peer's measurements alternate, so drift on a shared machine hits both.

Each round runs every case once, the order rotated by one per round; only `Case.run` is
timed (set-up and tear-down are not), with the garbage collector off (it runs in between). The first `warmup`
rounds are discarded; a case's time is the median over the remaining rounds, and
`compare` pairs two cases round by round. Each timed run's minor page faults (fresh pages
touched, counted outside the timing) are kept beside its time.
"""

from __future__ import annotations

import gc
import resource
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


def _nothing() -> None:
    return None


@dataclass
class Case:
    name: str
    run: Callable[[], Any]
    before: Callable[[], Any] = _nothing
    after: Callable[[], Any] = _nothing
    times: list[float] = field(default_factory=list)
    faults: list[int] = field(default_factory=list)  # minor page faults of each timed run (fresh pages touched)
    last: Any = None  # what the last timed run returned

    @property
    def median(self) -> float:
        return statistics.median(self.times)


def interleave(cases: list[Case], rounds: int, warmup: int = 1) -> dict[str, Case]:
    gc.collect()  # once: a full collection over the loaded models takes a quarter of a second
    for r in range(warmup + rounds):
        k = r % len(cases)
        for case in cases[k:] + cases[:k]:
            case.before()
            gc.disable()
            try:
                f0 = _minor_faults()
                t0 = time.perf_counter()
                out = case.run()
                dt = time.perf_counter() - t0
                df = _minor_faults() - f0
            finally:
                gc.enable()
            case.last = out
            out = None
            case.after()
            if r >= warmup:
                case.times.append(dt)
                case.faults.append(df)
    return {c.name: c for c in cases}


def _minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


@dataclass
class Row:
    """One line of the results table; `ratio` reads as `sense` says."""

    what: str
    ours: str
    theirs: str
    ratio: float
    goal: tuple[str, float] | None = None  # (">=" | "<=", bound) on `ratio`
    sense: str = "faster"  # "faster": theirs / ours; "ratio": ours / theirs (times or errors)
    met: bool | None = None  # set when the goal needs more than the rounded ratio
    best: float | None = None  # the ratio of each side's fastest round

    @property
    def verdict(self) -> str:
        """On the paired ratio; flagged where the minima disagree (contention hit one side harder)."""
        if self.goal is None:
            return ""
        op, bound = self.goal

        def ok(ratio: float) -> bool:
            return ratio >= bound if op == ">=" else ratio <= bound

        paired = self.met if self.met is not None else ok(self.ratio)
        if self.best is None or ok(self.best) == paired:
            return "yes" if paired else "**no**"
        return "yes, **no** on minima" if paired else "**no**, yes on minima"

    def _show(self, ratio: float | None) -> str:
        if ratio is None:
            return ""
        return f"{ratio:.1f}× faster" if self.sense == "faster" else f"{ratio:.3f}×"

    def markdown(self) -> str:
        goal = "" if self.goal is None else f"{'≥' if self.goal[0] == '>=' else '≤'} {self.goal[1]:g}×"
        cells = [self.what, self.ours, self.theirs, self._show(self.ratio), self._show(self.best), goal, self.verdict]
        return "| " + " | ".join(cells) + " |"


def compare(what: str, ours: Case, theirs: Case, goal: tuple[str, float] | None = None, sense: str = "faster",
            scale: float = 1.0) -> Row:  # fmt: skip
    """A row from two interleaved cases; `scale` divides ours' times (when one run times several calls).

    The ratio is the median over rounds of that round's ratio: both sides of a pair ran
    within the same round, so a burst of load from elsewhere mostly cancels out.
    """
    pairs = [(o / scale, t) for o, t in zip(ours.times, theirs.times)]
    ratios = [t / o if sense == "faster" else o / t for o, t in pairs]
    o, t = ours.median / scale, theirs.median
    bo, bt = min(ours.times) / scale, min(theirs.times)
    best = bt / bo if sense == "faster" else bo / bt
    return Row(what, fmt(o), fmt(t), statistics.median(ratios), goal, sense, best=best)


def table(rows: list[Row]) -> str:
    head = [
        "| measurement | ours (median) | PEFT / reference (median) | ratio (median of rounds) | ratio of minima | goal | met |",
        "|---|---:|---:|---:|---:|---|---|",
    ]
    return "\n".join(head + [r.markdown() for r in rows])


def fmt(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e6:.0f} µs"
