"""Generic conversion engine: a list of `Rule`s turns one naming/layout into the other, tensor by tensor.

Model families supply the rules (models/<family>/mapping.py); this module knows nothing about Wan.
Conversion is a stream: each output tensor is produced from the few input tensors it needs, so peak
memory is one model copy (the destination) plus one tensor, never two copies.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import torch


@dataclass(frozen=True)
class Rule:
    ours: str
    theirs: tuple[str, ...]
    fuse: str | None = None  # None: 1:1 rename; "heads": per-head interleave along dim 0

    def __post_init__(self):
        if self.fuse not in (None, "heads"):
            raise ValueError(f"unknown fuse {self.fuse!r} in rule for {self.ours}")
        if self.fuse is None and len(self.theirs) != 1:
            raise ValueError(f"rule for {self.ours}: a plain rename needs exactly one source")


def fuse_heads(parts: list[torch.Tensor], heads: int) -> torch.Tensor:
    """[H*K, ...] x n -> [H*n*K, ...] with each head's n blocks adjacent."""
    split = [p.unflatten(0, (heads, -1)) for p in parts]
    return torch.stack(split, dim=1).flatten(0, 2)


def unfuse_heads(fused: torch.Tensor, heads: int, n: int) -> list[torch.Tensor]:
    per_head = fused.unflatten(0, (heads, n, -1))
    return [per_head[:, j].flatten(0, 1).contiguous() for j in range(n)]


def check_keys(available: Iterable[str], expected: Iterable[str], what: str, ignore: Iterable[str] = ()) -> None:
    """Raise naming every missing and unexpected key (a partial conversion is worse than none)."""
    available, expected = set(available) - set(ignore), set(expected)
    missing, unexpected = sorted(expected - available), sorted(available - expected)
    if missing or unexpected:
        lines = [f"{what}: key mismatch"]
        if missing:
            lines.append(f"  missing ({len(missing)}): " + ", ".join(missing[:12]) + (" ..." if len(missing) > 12 else ""))
        if unexpected:
            lines.append(f"  unexpected ({len(unexpected)}): " + ", ".join(unexpected[:12])
                         + (" ..." if len(unexpected) > 12 else ""))
        raise KeyError("\n".join(lines))


def to_ours(rules: list[Rule], read: Callable[[str], torch.Tensor], heads: int) -> Iterator[tuple[str, torch.Tensor]]:
    for r in rules:
        parts = [read(name) for name in r.theirs]
        yield r.ours, (fuse_heads(parts, heads) if r.fuse == "heads" else parts[0])


def to_theirs(rules: list[Rule], read: Callable[[str], torch.Tensor], heads: int) -> Iterator[tuple[str, torch.Tensor]]:
    for r in rules:
        t = read(r.ours)
        parts = unfuse_heads(t, heads, len(r.theirs)) if r.fuse == "heads" else [t]
        yield from zip(r.theirs, parts)
