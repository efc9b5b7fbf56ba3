"""check_store: is a GT-Pair store complete and consistent? Counts, and one line per problem.

Checks: root attributes; the commit log (parseable, no id committed twice); every committed sample's
arrays exist with the right shapes and dtype attributes (and, with deep=True, decompress); every real
clip's text and (I2V) image conditioning; every negative's real clip and matching latent shape; the pair
index equals the log's pairs; no uncommitted (partial) groups are left.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from .store import FORMAT, GTPairStore

REQUIRED_ATTRS = ("format", "version", "task", "fps", "frames", "latent_dtype", "text_len", "vae", "text_encoder")


@dataclass
class StoreReport:
    path: str
    counts: dict = field(default_factory=dict)
    generators: dict = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def format(self) -> str:
        lines = [f"store {self.path}: {'valid' if self.ok else 'INVALID'}"]
        lines += [f"  {k}: {v}" for k, v in self.counts.items()]
        lines += [f"  generator {g}: {n} negatives" for g, n in sorted(self.generators.items())]
        lines += [f"  problem: {p}" for p in self.problems[:50]]
        if len(self.problems) > 50:
            lines.append(f"  ... and {len(self.problems) - 50} more problems")
        return "\n".join(lines)


def check_store(path: str | Path, deep: bool = True) -> StoreReport:
    report = StoreReport(str(path))
    try:
        store = GTPairStore(path, "r")
    except (ValueError, FileNotFoundError) as e:
        report.problems.append(str(e))
        return report
    attrs, bad = store.attrs, report.problems
    bad += [f"root attribute {k!r} is missing" for k in REQUIRED_ATTRS if k not in attrs]
    if attrs.get("format") != FORMAT:
        bad.append(f"format {attrs.get('format')!r} is not {FORMAT!r}")
    bad += [f"{kind} {key!r} is committed more than once" for kind, key in store.duplicates]
    i2v = attrs.get("task") == "i2v"
    text_len, z_dim = attrs.get("text_len"), (attrs.get("vae") or {}).get("z_dim")
    text_dim = (attrs.get("text_encoder") or {}).get("dim")

    def arrays(kind_group: str, key: str, names: tuple[str, ...]) -> dict:
        out = {}
        for name in names:
            try:
                arr = store.root[kind_group][key][name]
                if arr.nchunks_initialized != arr.nchunks:  # zarr reads a missing chunk as fill values
                    bad.append(f"{kind_group}/{key}/{name} has {arr.nchunks_initialized} of {arr.nchunks} chunks")
                    continue
                if deep:
                    arr[...]
                out[name] = tuple(arr.shape)
            except Exception as e:  # a missing group/array or an unreadable chunk: report, keep checking
                bad.append(f"{kind_group}/{key}/{name} cannot be read ({type(e).__name__}: {e})")
        return out

    for pid in store.records["text"]:
        shapes = arrays("text", pid, ("emb", "mask"))
        if "emb" in shapes and shapes["emb"] != (text_len, text_dim):
            bad.append(f"text/{pid}/emb has shape {shapes['emb']}, want ({text_len}, {text_dim})")
    for sid, rec in store.records["real"].items():
        shapes = arrays("real", sid, ("latents",))
        lat = shapes.get("latents")
        if lat is not None and (list(lat) != rec.get("latent_shape") or lat[0] != z_dim):
            bad.append(f"real/{sid}/latents has shape {lat}, the log says {rec.get('latent_shape')} (z_dim {z_dim})")
        if rec.get("prompt_id") not in store.records["text"]:
            bad.append(f"real/{sid}: its text {rec.get('prompt_id')} is not committed")
        if i2v:
            img = arrays("image", sid, ("clip", "cond"))
            if lat is not None and "cond" in img and img["cond"] != (lat[0] + 4, *lat[1:]):
                bad.append(f"image/{sid}/cond has shape {img['cond']}, want {(lat[0] + 4, *lat[1:])}")
    for gid, rec in store.records["generated"].items():
        shapes = arrays("generated", gid, ("latents",))
        real = store.records["real"].get(rec.get("real_id"))
        if real is None:
            bad.append(f"generated/{gid}: its real clip {rec.get('real_id')!r} is not committed")
        elif "latents" in shapes and list(shapes["latents"]) != real.get("latent_shape"):
            bad.append(f"generated/{gid}/latents has shape {shapes['latents']}, its real clip {real['latent_shape']}")
    if store.pair_index() != store.pair_entries():
        bad.append(f"the pair index ({len(store.pair_index())} rows) does not match the commit log "
                   f"({len(store.pair_entries())} negatives): an interrupted run; rerun it to finish")
    bad += [f"{g}/{k} has no commit (left by an interrupted run): rerun it to finish"
            for g, k in store.orphans()]
    report.counts = {"real": len(store.records["real"]), "generated": len(store.records["generated"]),
                     "texts": len(store.records["text"]),
                     "image": len(store.records["real"]) if i2v else 0, "pairs": len(store.pair_index())}
    report.generators = dict(Counter(r["generator"] for r in store.records["generated"].values()))
    return report
