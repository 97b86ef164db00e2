"""`lwhub` verbs that run a hub and get a person onto one: serve, account, token, login, whoami.

    lwhub serve --data DIR [--host H] [--port P] [--workers N] [--upload-idle S]   run the hub until Ctrl-C
    lwhub account create OWNER --data DIR [--ttl S]              on the hub's machine: prints a token
    lwhub token create ACCOUNT --data DIR [--scope NS ...]       on the hub's machine: another token
    lwhub token create [--scope NS ...] [--ttl S]                from the hub, for the logged-in account
    lwhub login [--url URL] [--token TOKEN]                      check the token, then save both (0600)
    lwhub whoami                                                 the account, scopes and expiry of the token

A token is printed once and stored by the hub only as a hash. Text output prints the
bare token on stdout (the rest goes to stderr), so ``TOKEN=$(lwhub account create ...)`` works.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
import time
from pathlib import Path

from .cli import URL, arg, emit, existing, group, verb
from .cli_config import hub_client, save_config
from .client.settings import load_config
from .errors import UsageError
from .protocol import MAX_TTL

DATA = arg("--data", metavar="DIR", help="the hub's data directory (offline, on the hub's machine)")
TTL = arg("--ttl", type=float, metavar="SECONDS", help="the token expires after this long (default: never)")

group("account", "accounts on a hub (admin, on the hub's data directory)")
group("token", "bearer tokens: scoped to namespaces, shown once")


def _expires(ttl: float | None) -> float | None:
    if ttl is not None and not 0 < ttl <= MAX_TTL:  # also NaN and inf, before anything is written
        raise UsageError(f"--ttl {ttl:g}: give a positive number of seconds, up to {MAX_TTL} (100 years)")
    return None if ttl is None else time.time() + ttl


def _data_dir(path: str) -> str:
    if Path(path).exists() and not Path(path).is_dir():
        raise UsageError(f"--data {path}: a file; --data names the hub's data directory", path=path)
    return path


def _when(expires: float | None) -> str:
    if expires is None:
        return "never"
    try:
        return time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(expires))
    except (OverflowError, OSError, ValueError):  # a registry may hand out expiries no clock here can print
        return f"{expires:.0f} s after 1970"


def _print_token(args: argparse.Namespace, token: str, note: str, data: dict) -> None:
    if not args.json:
        print(note, file=sys.stderr)
    emit(args, token, data | {"token": token})


@verb(
    "serve", "run the hub: SQLite metadata and content-addressed blobs in DIR, until Ctrl-C",
    arg("--data", required=True, metavar="DIR", help="the data directory (made if missing)"),
    arg("--host", default="127.0.0.1", help="the address to listen on (default: loopback only)"),
    arg("--port", type=int, default=8700, help="default: 8700"),
    arg("--workers", type=int, default=1, help="worker processes (default: 1)"),
    arg("--upload-idle", type=float, metavar="SECONDS", help="drop a request body (an upload or JSON) that sends nothing this long (default: 60)"),
)  # fmt: skip
def serve(args: argparse.Namespace) -> int:
    from .server import run_server

    def ready(url: str) -> None:  # once the port, the data directory and its lock are checked: not before
        if args.json:  # the one document on stdout: where the hub listens
            print(json.dumps({"data": str(Path(args.data).resolve()), "url": url}, sort_keys=True), flush=True)
        print(f"lwhub: serving {args.data} at {url} (Ctrl-C stops)", file=sys.stderr, flush=True)

    run_server(_data_dir(args.data), host=args.host, port=args.port, workers=args.workers, upload_idle=args.upload_idle, ready=ready)
    return 0


@verb("account create", "make the account OWNER, owning the namespace OWNER; prints its first token",
      arg("owner", metavar="OWNER"), arg("--data", required=True, metavar="DIR", help="the hub's data directory"), TTL)  # fmt: skip
def account_create(args: argparse.Namespace) -> int:
    from .server import create_account

    expires = _expires(args.ttl)
    new = not (Path(_data_dir(args.data)) / "registry.sqlite3").exists()  # bootstrapping a hub, or a typo in --data
    token = create_account(args.data, args.owner, expires=expires)
    made = f"no registry was at {args.data}: a new one is made there, holding only this account\n" if new else ""
    note = f"{made}account {args.owner} made; its token, shown once (expires: {_when(expires)}):"
    _print_token(args, token, note, {"account": args.owner, "scopes": [args.owner], "expires": expires})
    return 0


@verb(
    "token create", "a new token: with --data, made on the hub's machine; without, asked of the hub",
    arg("account", metavar="ACCOUNT", nargs="?", help="with --data: whose token"), DATA,
    arg("--scope", action="append", metavar="NS", help="'owner' or 'owner/name' (repeatable; default: the account's own)"),
    TTL, URL,
)  # fmt: skip
def token_create(args: argparse.Namespace) -> int:
    from .server import create_token

    expires = _expires(args.ttl)
    if args.data:
        if not args.account:
            raise UsageError("with --data, name the ACCOUNT the token is for")
        token = create_token(existing(_data_dir(args.data), "hub data directory"), args.account, args.scope, expires=expires)
        account, scopes = args.account, args.scope or [args.account]
    else:
        if args.account:
            raise UsageError("ACCOUNT goes with --data; the hub makes tokens for the logged-in account only")
        with hub_client(args) as client:
            new = client.new_token(args.scope, args.ttl)
        token, account, scopes, expires = new.token, new.account, new.scopes, new.expires
    note = f"token for {account}, scopes {', '.join(scopes)}, shown once (expires: {_when(expires)}):"
    _print_token(args, token, note, {"account": account, "scopes": scopes, "expires": expires})
    return 0


def _ask_token() -> str:
    if os.environ.get("LWHUB_TOKEN"):
        return os.environ["LWHUB_TOKEN"]
    if not sys.stdin.isatty():
        raise UsageError("give --token lwh_... (or set LWHUB_TOKEN); the hub's admin makes one with `lwhub token create`")
    return getpass.getpass("token: ").strip()


def _describe(account: str, scopes: list[str], expires: float | None, url: str) -> str:
    return f"{account} on {url}\nscopes   {', '.join(scopes) or 'none (read only)'}\nexpires  {_when(expires)}"


@verb("login", "check a token with the hub, then save the hub's URL and the token for later commands",
      URL, arg("--token", help="the token (default: LWHUB_TOKEN, else asked for on a terminal)"))  # fmt: skip
def login(args: argparse.Namespace) -> int:
    from .client.api import check_token

    token = args.token or _ask_token()
    check_token(token, "--token" if args.token else "LWHUB_TOKEN" if os.environ.get("LWHUB_TOKEN") else "the token typed")
    with hub_client(args, token=token) as client:
        who = client.whoami()  # a refused token raises here, and nothing is saved
        url = client.url
    path = save_config(load_config() | {"url": url, "token": token})
    text = f"logged in as {_describe(who.account, who.scopes, who.expires, url)}\nsaved to {path}"
    emit(args, text, {"url": url, "account": who.account, "scopes": who.scopes, "expires": who.expires, "config": str(path)})
    return 0


@verb("whoami", "the account behind the current token, and what it may write", URL)
def whoami(args: argparse.Namespace) -> int:
    with hub_client(args) as client:
        who, url = client.whoami(), client.url
    emit(args, _describe(who.account, who.scopes, who.expires, url), {"url": url, "account": who.account,
                                                                      "scopes": who.scopes, "expires": who.expires})  # fmt: skip
    return 0
