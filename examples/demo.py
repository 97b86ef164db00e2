"""The whole story on one machine: a hub, a light noir world, signed, shared, pulled, applied.

    lwhub serve --data HUB              -> an embedded registry on 127.0.0.1
    lwhub account create author         -> a token for the namespace author/
    lwhub keygen --register             -> the publisher key, registered with the owner
    (train)                             -> LoRA on the reference world's LLM, on noir prose
    lwhub push DIR --as author/noir-style --version 1.0.0
    lwhub pull author/noir-style        -> verified into a fresh cache
    world.apply(bundle, weight=w)       -> the effect moves with w
    lwhub blend author/noir-style:0.7 author/plain-style:0.3 --method svd --as author/noir-plain

Run: `make demo` (installs everything, then runs this in well under two minutes on 2 cores).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from lwformat import Bundle, LightConfig, World, blend, write_bundle
from lwformat.bundle import generate_keypair, load_private_key, sign_bundle
from lwformat.zoo import reference_world
from lwformat.zoo.text import byte_tokens, load_text
from lwhub.client import Client
from lwhub.server import create_account, serve

LLM = "author/narrate/text/llm"
WEIGHTS = (0.0, 0.35, 0.7, 1.0)


def say(step: str) -> None:
    print(f"\n== {step}")


def loss(world: World, tokens: torch.Tensor) -> float:
    """The LLM's next-token loss on held-out prose: lower on noir prose is more noir."""
    with torch.no_grad():
        return world.block(LLM).module.loss(tokens).item()


def train(world: World, train_tokens: torch.Tensor, steps: int = 100) -> None:
    world.customize(LightConfig(kind="lora", rank=8, alpha=16, blocks=[LLM], slots=["*.attn.*", "*.mlp.*", "tok"]))
    opt = torch.optim.AdamW(world.adapter_parameters(), lr=3e-3)
    lm = world.block(LLM).module
    for step in range(steps):
        batch = train_tokens[torch.randint(0, len(train_tokens), (16,))]  # (16, 65)
        opt.zero_grad()
        lm.loss(batch).backward()
        opt.step()
        if step % 25 == 24:
            print(f"  step {step + 1}: train loss {lm.loss(batch).item():.3f}")


def publish(client: Client, world: World, work: Path, name: str, private: Path, **meta) -> None:
    """Write the world's adapters as a bundle, sign it, push it (lwhub push DIR --key KEY)."""
    folder = work / name.replace("/", "--")
    write_bundle(world, folder, name=name, version="1.0.0", **meta)
    sign_bundle(folder, load_private_key(private))
    client.push(folder)
    size = sum(f.stat().st_size for f in folder.iterdir())
    print(f"  pushed {name}@1.0.0, {size / 1e3:.0f} kB")


def main() -> None:
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lightworlds-demo-") as work:
        story(Path(work))
    print(f"done in {time.perf_counter() - start:.1f} s")


def story(work: Path) -> None:
    torch.manual_seed(0)
    noir = byte_tokens(load_text("noir"), 65)  # (N, 65) byte windows
    held_out, train_tokens = noir[::5], noir[[i for i in range(len(noir)) if i % 5]]
    plain = byte_tokens(load_text("plain"), 65)
    plain_held, plain_train = plain[::5], plain[[i for i in range(len(plain)) if i % 5]]

    say("lwhub serve --data HUB   (embedded: SQLite + content-addressed blobs, loopback only)")
    with serve(work / "hub") as hub:
        print(f"  hub at {hub.url}")
        token = create_account(work / "hub", "author")
        publisher = Client(hub.url, token=token, cache_dir=work / "publisher-cache")

        say("lwhub keygen --register")
        private, public = generate_keypair(work, name="author")
        publisher.register_key("author", public)
        print(f"  {private.name} (private), {public.name} registered for author/")

        say("train a light noir world: LoRA on the author's LLM, every base weight frozen")
        world = reference_world("tiny", seed=0)
        train(world, train_tokens)

        say("sign and push author/noir-style@1.0.0, and a second style, author/plain-style@1.0.0")
        publish(publisher, world, work, "author/noir-style", private,
                description="hard-boiled narration for the reference world", tags=["noir", "style"])  # fmt: skip
        other = reference_world("tiny", seed=0)
        train(other, plain_train)
        publish(publisher, other, work, "author/plain-style", private, tags=["plain", "style"])
        print(f"  lwhub search style: {[b.name for b in publisher.search('style')]}")

        say("lwhub pull author/noir-style   (a fresh cache; the owner's key pinned on first use)")
        # The demo's own trust store: its keys are new each run, and yours (~/.config/lwhub/trust) stay as they are.
        reader = Client(hub.url, cache_dir=work / "reader-cache", trust=work / "reader-trust")
        path = reader.pull("author/noir-style", tofu=True)
        bundle = Bundle.open(path)
        plain_bundle = Bundle.open(reader.pull("author/plain-style"))
        print(f"  verified into {path}")

        say("lwhub blend author/noir-style:0.7 author/plain-style:0.3 --method svd --rank 8 --as author/noir-plain")
        mix = blend([(bundle, 0.7), (plain_bundle, 0.3)], method="svd", rank=8, name="author/noir-plain")
        mix.save(work / "noir-plain", version="1.0.0")
        sign_bundle(work / "noir-plain", load_private_key(private))
        publisher.push(work / "noir-plain")
        print(f"  svd re-rank error vs the exact weighted sum: {mix.report.relative_error:.2%}; "
              f"parents {[p.name for p in mix.manifest.parents]}")  # fmt: skip

    say("apply to a fresh base world at several weights: noir loss on held-out noir prose")
    base = reference_world("tiny", seed=0)
    root = base.root_digest()
    losses = []
    for w in WEIGHTS:
        base.apply(bundle, weight=w)
        losses.append(loss(base, held_out))
        base.remove("author/noir-style")
        print(f"  weight {w:4.2f}: noir loss {losses[-1]:.4f}")
    assert all(a > b for a, b in zip(losses, losses[1:])), f"the effect must move monotonically with the weight: {losses}"
    assert base.root_digest() == root, "with the bundle removed the base is bit-exact again"
    print(f"  the effect moves monotonically with the weight; base unchanged ({root[:19]}...)")

    say("stack both styles, and compare with their blend: loss on held-out noir / plain prose")
    base.apply(bundle, weight=0.7)
    base.apply(plain_bundle, weight=0.3)
    print(f"  stacked 0.7 + 0.3:  noir {loss(base, held_out):.4f}  plain {loss(base, plain_held):.4f}")
    base.remove("author/noir-style")
    base.remove("author/plain-style")
    base.apply(mix)
    print(f"  blended (rank 8):   noir {loss(base, held_out):.4f}  plain {loss(base, plain_held):.4f}")


if __name__ == "__main__":
    main()
