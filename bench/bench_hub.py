"""Hub transfers and metadata over loopback, against curl and a plain httpx download, in one run.

    python bench/bench_hub.py [--layers 4] [--rounds 11] [--seconds 5] [--dir /dev/shm]

A bundle of ~109 MB (4 LoRA slots of rank 832 on 4096x4096 layers, random weights) is
published to a registry started on 127.0.0.1, then the weights blob is fetched by:

    curl     `curl -s -o FILE URL`: the same bytes from the same server, written to disk, unverified
    httpx    one httpx stream, sha256 over the bytes as they arrive, written to disk
    pull     `Client.pull` into an empty cache (its trust store holds the owner's key): resolve,
             signature, chunk-verified download, install
    cached   `Client.pull` again: the cache hit, every chunk re-hashed

Cases alternate round by round (bench/_timing.py), medians are reported, and ratios are
taken within this run. Then 32 concurrent clients (one keep-alive connection each)
resolve ``latest`` for a few seconds: requests per second and latency percentiles.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from _timing import Case, interleave  # noqa: E402

from lwformat import Block, LightConfig, World  # noqa: E402
from lwformat.bundle.keys import generate_keypair, load_private_key  # noqa: E402
from lwformat.bundle.read import Bundle  # noqa: E402
from lwformat.bundle.signing import sign_bundle  # noqa: E402
from lwformat.bundle.write import write_bundle  # noqa: E402
from lwhub.client import Client  # noqa: E402
from lwhub.server import create_account, serve  # noqa: E402
from lwhub.trust import TrustStore  # noqa: E402


def build(root: Path, layers: int) -> tuple[Path, Path]:
    torch.manual_seed(0)
    world = World.from_blocks({"author/narrate/text/llm": Block(nn.Sequential(*[nn.Linear(4096, 4096) for _ in range(layers)]), "llm")})
    world.customize(LightConfig(rank=832))
    for p in world.parameters():
        if p.requires_grad:
            nn.init.normal_(p)
    private, public = generate_keypair(root, name="bench")
    write_bundle(world, root / "bundle", name="bench/big", version="1.0.0")
    sign_bundle(root / "bundle", load_private_key(private))
    return root / "bundle", public


def httpx_download(url: str, dest: Path) -> str:
    h = hashlib.sha256()
    with httpx.Client() as http, http.stream("GET", url) as r, open(dest, "wb") as f:
        for piece in r.iter_raw():
            h.update(piece)
            f.write(piece)
    return h.hexdigest()


async def metadata_load(url: str, clients: int, seconds: float) -> list[float]:
    """`clients` keep-alive connections, each sending its next GET as soon as the answer is in.

    The load generator speaks raw HTTP/1.1 on asyncio streams, so that on two cores its
    own overhead takes as little as possible from the server being measured.
    """
    host, port = url.removeprefix("http://").split(":")
    request = f"GET /v1/bundles/bench/big/resolve/latest HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
    latencies: list[float] = []
    stop = time.perf_counter() + seconds

    async def one() -> None:
        reader, writer = await asyncio.open_connection(host, int(port))
        while time.perf_counter() < stop:
            t0 = time.perf_counter()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(re.search(rb"(?i)content-length: *(\d+)", head)[1])
            await reader.readexactly(length)
            latencies.append(time.perf_counter() - t0)
            assert head.startswith(b"HTTP/1.1 200"), head
        writer.close()

    await asyncio.gather(*(one() for _ in range(clients)))
    return latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--seconds", type=float, default=5.0, help="duration of the metadata load")
    parser.add_argument("--streams", type=int, default=None, help="Client(streams=...) for the pull (default: the client's)")
    parser.add_argument("--dir", default="/dev/shm" if Path("/dev/shm").is_dir() else None,
                        help="where the registry, the caches and curl's file live (default: tmpfs, so the VM disk's "
                             "write-back does not decide the result)")  # fmt: skip
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-hub-", dir=args.dir))
    try:
        folder, public = build(root, args.layers)
        entry = Bundle.open(folder).manifest.files[0]
        token = create_account(root / "data", "bench")
        with serve(root / "data") as server:
            with Client(server.url, token=token, cache_dir=root / "publisher") as c:
                c.register_key("bench", public)
                t0 = time.perf_counter()
                c.push(folder)
                push_s = time.perf_counter() - t0
            url = f"{server.url}/v1/blobs/sha256:{entry.sha256}"
            cache = root / "cache"
            streams = {} if args.streams is None else {"streams": args.streams}

            def fresh() -> None:
                shutil.rmtree(cache, ignore_errors=True)
                (root / "out").unlink(missing_ok=True)
                TrustStore(cache / "trust").pin("bench", public)  # set-up a user does once, not part of a pull

            def pull() -> Path:
                with Client(server.url, cache_dir=cache, trust=cache / "trust", **streams) as client:
                    return client.pull("bench/big")

            cases = [
                Case("curl", lambda: subprocess.run(["curl", "-sf", "-o", str(root / "out"), url], check=True), before=fresh),
                Case("httpx", lambda: httpx_download(url, root / "out"), before=fresh),
                Case("pull", pull, before=fresh),
            ]
            result = interleave(cases, rounds=args.rounds)
            assert result["httpx"].last == entry.sha256
            pull()
            cached = interleave([Case("cached", pull)], rounds=args.rounds)["cached"]
            latencies = asyncio.run(metadata_load(server.url, 32, args.seconds))
        size = entry.size
        rate = {name: size / case.median / 1e9 for name, case in result.items()}
        print(f"blob: {size / 1e6:.1f} MB in {len(entry.chunks)} chunks; loopback; medians of {args.rounds} rounds")
        print(f"push (upload, server-side verify, publish)   {push_s * 1e3:8.1f} ms  {size / push_s / 1e9:5.2f} GB/s")
        spread = lambda case: f"(rounds {min(case.times) * 1e3:.0f}..{max(case.times) * 1e3:.0f} ms)"  # noqa: E731
        for name, label in [("curl", "curl -o FILE (unverified)"), ("httpx", "httpx 1 stream + sha256 + write"),
                            ("pull", "Client.pull, empty cache (verified)")]:  # fmt: skip
            print(f"{label:44s} {result[name].median * 1e3:8.1f} ms  {rate[name]:5.2f} GB/s  {spread(result[name])}")
        print(f"{'Client.pull, from the cache (re-verified)':44s} {cached.median * 1e3:8.1f} ms  {size / cached.median / 1e9:5.2f} GB/s  {spread(cached)}")
        print(f"pull / curl  = {rate['pull'] / rate['curl']:.2f}x   (goal >= 0.8)")
        print(f"pull / httpx = {rate['pull'] / rate['httpx']:.2f}x   (goal >= 1.5)")
        ms = sorted(x * 1e3 for x in latencies)
        p = lambda q: ms[min(len(ms) - 1, int(q * len(ms)))]  # noqa: E731
        print(f"metadata, 32 concurrent clients, {args.seconds:.0f} s: {len(ms) / args.seconds:7.0f} req/s  "
              f"p50 {statistics.median(ms):.2f} ms  p99 {p(0.99):.2f} ms  max {ms[-1]:.2f} ms")  # fmt: skip
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
