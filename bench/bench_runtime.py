"""Runtime vs PEFT on the ``small`` reference world's LLM (GPT-2 small), LoRA r=16 on 48 layers.

    python bench/bench_runtime.py              # the full run (3 minutes on 2 quiet cores, more under load)
    python bench/bench_runtime.py --quick      # a smoke run: few rounds, not a measurement
    python bench/bench_runtime.py --profile    # also where our apply and swap spend their time
    python bench/bench_runtime.py --only apply,swap   # some sections only (apply, swap, blend, forward, mixed)
    python bench/bench_runtime.py --system-malloc     # glibc's default heap policy (see below)

Every ratio compares two measurements taken in this run, interleaved round by round
(see `_timing`): the median over the rounds after the warm-up of each round's ratio (the
goals apply to it), and the ratio of each side's fastest round, which contention on a
shared machine disturbs least. "× faster" is PEFT's time over ours; the other rows are time
(or error) ratios, lower is better. Set-up (`_runtime_setup`) writes our bundles and
PEFT's adapter directories, with the same factors, into a temporary directory.

Before anything is timed, glibc is told to keep freed memory in its heap (`retain_heap`),
as jemalloc or tcmalloc would (PyTorch's CPU tuning guide advises one of them). By
default glibc gives each block above its mmap threshold (at most 32 MiB) fresh pages and
unmaps them when it is freed, so every forward faults in its 206 MB of logits page by page
(about 50k minor faults). On this VM such a fault costs 1 to 5 µs depending on what ran
before (its balloon reports freed pages back to the host: the likely cause), which moved
forward times by up to 0.25 s on 1.4 s, whatever the adapters did. With the heap kept,
forwards stop faulting once the heap has grown (the notes print the median and the largest
count per case); `--system-malloc` runs with glibc's default.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import peft
import torch
import torch.nn.functional as F
from peft.utils.hotswap import hotswap_adapter

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _blend_bench import blend_rows  # noqa: E402
from _runtime_setup import ALPHA, RANK, Sides, build, load_factors  # noqa: E402
from _timing import Case, Row, compare, interleave, table  # noqa: E402

from lwformat.bundle.read import Bundle  # noqa: E402

BATCH, TOKENS = 8, 128


@dataclass(frozen=True)
class Budget:
    """Timed rounds (after `warmup` discarded rounds) per section."""

    apply: int
    swap: int
    forward: int
    mixed: int
    blend: int
    warmup: int = 1


FULL = Budget(apply=20, swap=40, forward=10, mixed=5, blend=2)
QUICK = Budget(apply=4, swap=8, forward=1, mixed=1, blend=1)


def _open(path: Path) -> Bundle:
    return Bundle.open(path)


def bench_apply(s: Sides, budget: Budget) -> tuple[list[Row], list[str]]:
    w, pm = s.world, s.peft
    cases = [
        Case("ours cold", lambda: w.apply(_open(s.ours[1]), name="bench/apply"), after=lambda: w.remove("bench/apply")),
        Case(
            "ours hosted",
            lambda: w.apply(_open(s.ours[1]), name="bench/apply"),
            before=lambda: w.apply(_open(s.ours[0]), name="bench/resident"),
            after=lambda: (w.remove("bench/apply"), w.remove("bench/resident")),
        ),
        Case("peft", lambda: pm.load_adapter(str(s.theirs[1]), adapter_name="loaded"), after=lambda: pm.delete_adapter("loaded")),
    ]  # fmt: skip
    c = interleave(cases, budget.apply, budget.warmup + 1)
    return [
        compare("1a apply a bundle from disk (`Bundle.open` + `apply`; nothing applied, hosts created) vs `load_adapter`",
                c["ours cold"], c["peft"], (">=", 10)),
        compare("1b the same with one bundle already applied (PEFT holds its `default` adapter too)",
                c["ours hosted"], c["peft"], (">=", 10)),
    ], []  # fmt: skip


def bench_swap(s: Sides, budget: Budget) -> tuple[list[Row], list[str]]:
    w, pm = s.world, s.peft
    w.apply(_open(s.ours[0]), name="bench/swap")
    others = [_open(s.ours[1]), _open(s.ours[2])]
    dirs = [str(s.theirs[1]), str(s.theirs[2])]
    src = torch.randn(s.adapter_bytes // 4)  # (n,) float32: the adapter's byte size
    dst = torch.empty_like(src)
    turn = {"ours": 0, "peft": 0}

    def ours(check_base: bool):
        def run() -> None:
            turn["ours"] ^= 1
            w.swap("bench/swap", others[turn["ours"]], check_base=check_base)

        return run

    def theirs() -> None:
        turn["peft"] ^= 1
        hotswap_adapter(pm, dirs[turn["peft"]], adapter_name="default")

    def mapped_copy() -> None:
        # the same copy from a fresh map of the bundle file, as `copy_packed` reads it (page faults included)
        dst.copy_(others[0].packed()["F32"])

    def rounds(check_base: bool) -> dict[str, Case]:
        # Each swap kind in a run of its own, after the same cases: what ran just before
        # decides how much of the 19 MB a copy touches is still in the 32 MB cache.
        cases = [Case("ours", ours(check_base)), Case("peft", theirs), Case("memcpy", lambda: dst.copy_(src)),
                 Case("mapped", mapped_copy)]  # fmt: skip
        return interleave(cases, budget.swap, budget.warmup + 2)

    c, t = rounds(check_base=True), rounds(check_base=False)
    w.remove("bench/swap")
    load_factors(pm, s.factors[0])  # PEFT's default back to bundle 0 for the forward rows
    gbs = s.adapter_bytes / c["memcpy"].median / 1e9
    return [
        compare("2a hot-swap (`swap` to an open bundle of the same layout) vs `hotswap_adapter`", c["ours"], c["peft"],
                (">=", 20)),
        compare(f"2b hot-swap vs a plain memory copy of the {s.adapter_bytes / 1e6:.2f} MB (`dst.copy_(src)`, "
                f"{gbs:.1f} GB/s)", c["ours"], c["memcpy"], ("<=", 2), sense="ratio"),
        compare("2c  (info) the same copy from a fresh map of the bundle file vs the plain copy", c["mapped"],
                c["memcpy"], sense="ratio"),
        # 2a's ceiling for any swap that copies the adapter bytes: below 20x, 2a cannot be met here
        compare("2d  (info) the plain copy vs `hotswap_adapter`", c["memcpy"], c["peft"]),
        compare("2a' hot-swap trusting the base (`check_base=False`, as `hotswap_adapter`), in rounds of its own",
                t["ours"], t["peft"], (">=", 20)),
        compare("2b' the same vs the plain memory copy (its rounds)", t["ours"], t["memcpy"], ("<=", 2), sense="ratio"),
    ], []  # fmt: skip


def _tokens() -> torch.Tensor:
    return torch.randint(0, 50257, (BATCH, TOKENS), generator=torch.Generator().manual_seed(0))  # (8, 128)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def bench_forward(s: Sides, budget: Budget) -> tuple[list[Row], list[str]]:
    w, lm, pm, x = s.world, s.lm, s.peft, _tokens()
    b0 = _open(s.ours[0])

    def on() -> None:
        w.apply(b0, name="bench/fwd")

    def fused_on() -> None:
        on()
        w.fuse()

    def fused_off() -> None:
        w.unfuse()
        w.remove("bench/fwd")

    # The LoRA matmuls of one forward on their own (inputs of the right shapes, in the
    # order the layers run): the base plus these is the floor of any unmerged forward.
    gen = torch.Generator().manual_seed(0)
    tokens = BATCH * TOKENS
    loras = [(torch.randn(tokens, A.shape[1], generator=gen), A, B, torch.randn(tokens, B.shape[0], generator=gen))
             for A, B in s.factors[0].values()]  # (N, in), (r, in), (out, r), (N, out)

    def floor() -> None:
        for xin, A, B, out in loras:
            out.addmm_(F.linear(xin, A) * (ALPHA / RANK), B.t())  # (N, out) += s·(N, r) @ (r, out)

    with torch.no_grad():
        cases = [
            Case("base", lambda: lm(x)),
            Case("floor", lambda: (lm(x), floor())),
            Case("unmerged", lambda: lm(x), before=on, after=lambda: w.remove("bench/fwd")),
            Case("fused", lambda: lm(x), before=fused_on, after=fused_off),
            Case("peft", lambda: pm(x)),
        ]
        c = interleave(cases, budget.forward, budget.warmup + 1)  # one more: the heap grows in the first rounds
    last = {k: v.last for k, v in c.items()}
    notes = [
        f"check (forward): logits max |diff| ours unmerged vs PEFT {_max_diff(last['unmerged'], last['peft']):.2e}, "
        f"fused vs unmerged {_max_diff(last['fused'], last['unmerged']):.2e}, unmerged vs base "
        f"{_max_diff(last['unmerged'], last['base']):.2e} (the adapter does change the output)",
        _faults("forward", c),
    ]
    return [
        compare(f"4a forward {BATCH}×{TOKENS} tokens, one bundle unmerged vs base", c["unmerged"], c["base"],
                ("<=", 1.03), sense="ratio"),
        compare("4b  (PEFT) forward, one adapter unmerged vs the same base", c["peft"], c["base"], sense="ratio"),
        compare("4c forward, fused vs base", c["fused"], c["base"], ("<=", 1.01), sense="ratio"),
        compare("4d  (info) the base forward, then the same LoRA matmuls alone vs base: 4a's floor", c["floor"],
                c["base"], sense="ratio"),
    ], notes  # fmt: skip


def bench_mixed(s: Sides, budget: Budget) -> tuple[list[Row], list[str]]:
    w, lm, pm, x = s.world, s.lm, s.peft, _tokens()
    names = [f"author/style-{i}" for i in range(BATCH)]
    theirs = [f"s{i}" for i in range(BATCH)]
    for i in range(BATCH):
        w.apply(_open(s.ours[i]), name=names[i])
        pm.load_adapter(str(s.theirs[i]), adapter_name=theirs[i])

    def routed(picks: list[str]):
        def run():
            with w.routed(picks):  # inside the timed region: routes are built on every call
                return lm(x)

        return run

    with torch.no_grad():
        cases = [
            Case("ours 8", routed(names)),
            Case("ours 1", routed([names[0]] * BATCH)),
            Case("peft 8", lambda: pm(x, adapter_names=theirs)),
            Case("peft 1", lambda: pm(x, adapter_names=[theirs[0]] * BATCH)),
        ]
        c = interleave(cases, budget.mixed, budget.warmup + 1)  # one more: the heap grows in the first rounds
    for i in range(BATCH):
        w.remove(names[i])
        pm.delete_adapter(theirs[i])
    last = {k: v.last for k, v in c.items()}
    notes = [
        f"check (mixed): logits max |diff| ours vs PEFT with 8 distinct adapters {_max_diff(last['ours 8'], last['peft 8']):.2e}, "
        f"ours 8 distinct vs 8× the same {_max_diff(last['ours 8'], last['ours 1']):.2e} (the routing takes effect)",
        _faults("mixed", c),
    ]
    return [
        compare("5a batch of 8 with 8 distinct bundles vs 8× the same bundle (both routed per sample)", c["ours 8"],
                c["ours 1"], ("<=", 1.10), sense="ratio"),
        compare("5b  (PEFT) `adapter_names`, 8 distinct vs 8× the same", c["peft 8"], c["peft 1"], sense="ratio"),
        compare("5c batch of 8 with 8 distinct bundles vs PEFT `adapter_names` with 8 distinct", c["ours 8"],
                c["peft 8"]),
    ], notes  # fmt: skip


def _faults(section: str, cases: dict[str, Case]) -> str:
    counts = ", ".join(f"{name} {statistics.median(c.faults):,.0f} / {max(c.faults):,}" for name, c in cases.items())
    return f"page faults ({section}): minor faults per timed run, median / largest: {counts}"


def retain_heap() -> bool:
    """Keep freed memory in glibc's heap: no fresh mappings for large blocks, no trimming.

    False, changing nothing, where the C library has no glibc `mallopt`.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # glibc's <malloc.h>
    return mallopt(m_mmap_max, 0) == 1 and mallopt(m_trim_threshold, 2**31 - 1) == 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few repeats: a smoke run, not a measurement")
    parser.add_argument("--profile", action="store_true", help="also profile our apply and swap (cProfile)")
    parser.add_argument("--only", default="", help="comma-separated sections to run (apply,swap,blend,forward,mixed); default all")
    parser.add_argument("--system-malloc", action="store_true", help="keep the C library's default heap policy")
    args = parser.parse_args(argv)
    heap = "system default" if args.system_malloc else "heap retained" if retain_heap() else "system default (no glibc)"
    sections = {"apply": bench_apply, "swap": bench_swap, "blend": blend_rows, "forward": bench_forward, "mixed": bench_mixed}
    names = [name for name in args.only.split(",") if name]
    if unknown := sorted(set(names) - set(sections)):
        parser.error(f"--only: no section {unknown[0]!r} (sections: {', '.join(sections)})")
    chosen = [sections[name] for name in names] or list(sections.values())
    budget = QUICK if args.quick else FULL
    start = time.perf_counter()
    print(f"torch {torch.__version__}, peft {peft.__version__}, torch threads {torch.get_num_threads()}, "
          f"{os.cpu_count()} CPUs, load average {_load()}, {'quick' if args.quick else 'full'} run, malloc: "
          f"{heap}", flush=True)  # fmt: skip
    rows, notes = [], []
    with tempfile.TemporaryDirectory(prefix="lwbench-") as tmp:
        sides = build(Path(tmp), BATCH)
        print(f"set-up {time.perf_counter() - start:.1f} s: small reference world, {BATCH} bundles and {BATCH} PEFT "
              f"adapters of {sides.adapter_bytes / 1e6:.2f} MB, 48 layers each", flush=True)  # fmt: skip
        for section in chosen:
            t = time.perf_counter()
            new, extra = section(sides, budget)
            rows += new
            notes += extra
            print(f"  {section.__name__}: {time.perf_counter() - t:.1f} s", flush=True)
        if args.profile:
            from _profile import profile_runtime

            profile = profile_runtime(sides)
    print()
    print(table(rows))
    print()
    for note in notes:
        print(note)
    if args.profile:
        print()
        print(profile)
    print(f"total {time.perf_counter() - start:.0f} s, load average now {_load()}; timed rounds after the warm-up: "
          f"apply {budget.apply}, swap {budget.swap}, blend {budget.blend}, forward {budget.forward}, mixed {budget.mixed}")
    return 0


def _load() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


if __name__ == "__main__":
    raise SystemExit(main())
