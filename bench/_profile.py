"""``--profile``: where our apply and swap spend their time (cProfile, lwformat functions only).

Prints, for each operation, the lwformat functions by cumulative time per call, so a
missed goal can be traced to a function and line.
"""

from __future__ import annotations

import cProfile
import io
import pstats

from _runtime_setup import Sides

from lwformat.bundle.read import Bundle


def _top(profile: cProfile.Profile, calls: int, limit: int = 14) -> str:
    stats = pstats.Stats(profile)
    rows = []
    for (path, line, func), (_, ncalls, tottime, cumtime, _) in stats.stats.items():
        if "/lwformat/" in path:
            short = path[path.index("/lwformat/") + 1 :]
            rows.append((cumtime / calls, tottime / calls, ncalls / calls, f"{short}:{line}({func})"))
    rows.sort(reverse=True)
    out = io.StringIO()
    out.write(f"{'cum ms/call':>12} {'own ms/call':>12} {'calls/call':>11}  function\n")
    for cum, own, n, name in rows[:limit]:
        out.write(f"{cum * 1e3:12.3f} {own * 1e3:12.3f} {n:11.0f}  {name}\n")
    return out.getvalue()


def profile_runtime(s: Sides, calls: int = 20) -> str:
    w = s.world
    apply_prof, swap_prof = cProfile.Profile(), cProfile.Profile()
    for _ in range(calls):
        apply_prof.enable()
        w.apply(Bundle.open(s.ours[1]), name="bench/profile")
        apply_prof.disable()
        w.remove("bench/profile")
    w.apply(Bundle.open(s.ours[0]), name="bench/profile")
    others = [Bundle.open(s.ours[1]), Bundle.open(s.ours[2])]
    swap_prof.enable()
    for i in range(calls):
        w.swap("bench/profile", others[i % 2])
    swap_prof.disable()
    w.remove("bench/profile")
    return (f"profile of `Bundle.open` + `apply` (cProfile inflates Python-heavy parts):\n{_top(apply_prof, calls)}\n"
            f"profile of `swap`:\n{_top(swap_prof, calls)}")  # fmt: skip
