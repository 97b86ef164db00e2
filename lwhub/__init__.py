"""lwhub: share light custom worlds — the `lwhub` command, and (soon) the hub server and client."""

__all__: list[str] = []
