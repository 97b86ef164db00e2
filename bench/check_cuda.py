"""The runtime on a CUDA device, against PEFT on the same GPT-2-small LM: exactness, the
compiled hot-swap, mixed batches, and a few timings. Needs a GPU; the tests and CI never run it.

    python bench/check_cuda.py                 # on a machine with CUDA
    python bench/check_cuda.py --device cpu    # the same checks on the CPU (a smoke run)

Set-up is `_runtime_setup.build` (bundles and PEFT adapters with the same factors), then
the world and PEFT's model move to the device. Each check prints one line; a failed
exactness check raises. Timings alternate ours and the peer's round by round (`_timing`),
with the device synchronized inside each timed call.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from peft.utils.hotswap import hotswap_adapter

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _runtime_setup import build, load_factors  # noqa: E402
from _timing import Case, compare, interleave, table  # noqa: E402

from lwformat.bundle.read import Bundle  # noqa: E402

BATCH, TOKENS = 8, 128


def check(what: str, ok: bool, detail: str = "") -> None:
    print(f"{'ok  ' if ok else 'FAIL'} {what}{': ' + detail if detail else ''}", flush=True)
    if not ok:
        raise SystemExit(f"check failed: {what}")


def diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    with tempfile.TemporaryDirectory(prefix="lwcuda-") as tmp:
        t0 = time.perf_counter()
        s = build(Path(tmp), BATCH)
        world, lm, pm = s.world.to(dev), s.lm, s.peft.to(dev)
        name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
        print(f"torch {torch.__version__} on {name}; set-up {time.perf_counter() - t0:.1f} s", flush=True)
        x = torch.randint(0, 50257, (BATCH, TOKENS), generator=torch.Generator().manual_seed(0)).to(dev)  # (8, 128)
        bundles = [Bundle.open(p) for p in s.ours]
        rows = []
        with torch.no_grad():
            base = lm(x)
            world.apply(bundles[0], name="s/a", weight=1.0)
            check("apply: the LM matches PEFT with the same factors", diff(lm(x), pm(x)) < 1e-3, f"max |diff| {diff(lm(x), pm(x)):.2e}")
            check("adapters live on the device", all(b.device.type == dev.type for b in world.applied["s/a"].buffers.values()))
            world.set_weight("s/a", 0.0)
            check("weight 0 gives the base bit for bit", torch.equal(lm(x), base))
            world.set_weight("s/a", 1.0)
            world.swap("s/a", bundles[1])
            load_factors(pm, s.factors[1])
            check("swap: matches PEFT holding the new factors", diff(lm(x), pm(x)) < 1e-3, f"max |diff| {diff(lm(x), pm(x)):.2e}")
            unmerged = lm(x)
            before = {k: v.clone() for k, v in lm.state_dict().items()}
            world.fuse()
            check("fuse: matches the unmerged output", diff(lm(x), unmerged) < 1e-3, f"max |diff| {diff(lm(x), unmerged):.2e}")
            world.unfuse()
            check("unfuse restores every tensor bit for bit", all(torch.equal(lm.state_dict()[k], v) for k, v in before.items()))
            world.remove("s/a")
            check("remove gives the base bit for bit", torch.equal(lm(x), base))
            load_factors(pm, s.factors[0])

            names = [f"s/m{i}" for i in range(BATCH)]
            for i in range(BATCH):
                world.apply(bundles[i], name=names[i])
                pm.load_adapter(str(s.theirs[i]), adapter_name=f"m{i}")
            with world.routed(names):
                ours8 = lm(x)
            theirs8 = pm(x, adapter_names=[f"m{i}" for i in range(BATCH)])
            check("mixed batch of 8 distinct bundles matches PEFT's adapter_names", diff(ours8, theirs8) < 1e-3, f"max |diff| {diff(ours8, theirs8):.2e}")

            def routed(picks):
                def run():
                    with world.routed(picks):
                        out = lm(x)
                    sync()
                    return out

                return run

            c = interleave([Case("8", routed(names)), Case("1", routed([names[0]] * BATCH)),
                            Case("peft 8", lambda: (pm(x, adapter_names=[f"m{i}" for i in range(BATCH)]), sync())[0])],
                           args.rounds, 2)  # fmt: skip
            rows.append(compare("mixed: 8 distinct bundles vs 8x the same (both routed)", c["8"], c["1"], ("<=", 1.10), sense="ratio"))
            rows.append(compare("mixed: ours 8 distinct vs PEFT adapter_names 8 distinct", c["8"], c["peft 8"]))
            for i in range(BATCH):
                world.remove(names[i])
                pm.delete_adapter(f"m{i}")

            world.apply(bundles[0], name="s/a")
            turn = {"o": 0, "p": 0}
            src = torch.randn(s.adapter_bytes // 4)  # (n,) float32, pageable host memory like a mapped file
            dst = torch.empty_like(src, device=dev)

            def ours_swap():
                turn["o"] ^= 1
                world.swap("s/a", bundles[1 + turn["o"]])
                sync()

            def peft_swap():
                turn["p"] ^= 1
                hotswap_adapter(pm, str(s.theirs[1 + turn["p"]]), adapter_name="default")
                sync()

            c = interleave([Case("ours", ours_swap), Case("peft", peft_swap), Case("copy", lambda: (dst.copy_(src), sync()))], args.rounds, 2)
            rows.append(compare("hot-swap vs PEFT hotswap_adapter", c["ours"], c["peft"]))
            rows.append(compare(f"hot-swap vs a host-to-device copy of the {s.adapter_bytes / 1e6:.2f} MB", c["ours"], c["copy"], sense="ratio"))
            load_factors(pm, s.factors[0])

            def fwd():
                out = lm(x)
                sync()
                return out

            c = interleave([Case("base", fwd, before=lambda: world.remove("s/a"), after=lambda: world.apply(bundles[0], name="s/a")),
                            Case("unmerged", fwd), Case("fused", fwd, before=world.fuse, after=world.unfuse),
                            Case("peft", lambda: (pm(x), sync())[0])], args.rounds, 2)  # fmt: skip
            rows.append(compare(f"forward {BATCH}x{TOKENS}, one bundle unmerged vs base", c["unmerged"], c["base"], sense="ratio"))
            rows.append(compare("forward, fused vs base", c["fused"], c["base"], sense="ratio"))
            rows.append(compare("forward (PEFT), one adapter unmerged vs base", c["peft"], c["base"], sense="ratio"))

        torch._dynamo.reset()
        backend = "inductor" if dev.type == "cuda" else "eager"  # a CPU smoke run skips code generation
        compiled = torch.compile(lm, backend=backend, dynamic=False)
        with torch.no_grad():
            t = time.perf_counter()
            compiled(x)
            sync()
            graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
            compile_s = time.perf_counter() - t
            world.swap("s/a", bundles[2])
            world.set_weight("s/a", 0.3)
            got = compiled(x)
            eager = lm(x)
        recompiled = torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs
        check(f"compiled ({backend}, first call {compile_s:.1f} s): swap and set_weight recompile nothing", recompiled == 0, f"{recompiled} new graphs")
        check("compiled output after the swap matches eager", diff(got, eager) < 1e-2, f"max |diff| {diff(got, eager):.2e}")
        print()
        print(table(rows))


if __name__ == "__main__":
    main()
