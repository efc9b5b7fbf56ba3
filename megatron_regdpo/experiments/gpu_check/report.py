"""gpu_check.json (the whole record) and gpu_check.md (a summary table, then every step's figures), both
rewritten atomically after every step; and the short table printed last. Imports no torch."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

JSON_NAME, MD_NAME = "gpu_check.json", "gpu_check.md"


def clean(value):
    """JSON-safe: non-finite floats become strings ("nan", "inf"), tuples lists, unknown objects str()."""
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, dict):
        return {str(k): clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean(v) for v in value]
    if value is None or isinstance(value, (bool, int, str)):
        return value
    return str(value)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write(record: dict, out_dir: Path) -> None:
    _atomic_write(out_dir / JSON_NAME, json.dumps(clean(record), indent=1) + "\n")
    _atomic_write(out_dir / MD_NAME, markdown(record))


def _rows(record: dict) -> list[list[str]]:
    rows = []
    for name, e in record["steps"].items():
        seconds = f"{e['seconds']:.1f}" if "seconds" in e else "-"
        rows.append([name, e["status"], seconds, str(e.get("summary") or e.get("reason") or "")[:110]])
    return rows


def table(record: dict) -> str:
    """The short plain-text table printed last."""
    rows = [["step", "status", "s", "summary"]] + _rows(record)
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r[:3], widths)) + "  " + r[3] for r in rows]
    head = f"gpu_check ({record['mode']}), {record.get('elapsed_s')} s of {record['budget_s']:.0f} s"
    return "\n".join([head, *lines])


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (dict, list)):
        return "`" + json.dumps(clean(v))[:300] + "`"
    return str(v).replace("|", "\\|").replace("\n", " ")


def _dict_table(rows: list[dict]) -> list[str]:
    keys = []
    for r in rows:
        keys += [k for k in r if k not in keys and k != "traceback"]
    out = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    out += ["| " + " | ".join(_fmt(r.get(k, "")) for k in keys) + " |" for r in rows]
    return out


def _details(result: dict, prefix: str = "") -> list[str]:
    """Scalars as bullets, lists of dicts and dicts of dicts as tables, other dicts flattened (a.b)."""
    lines = []
    for key, value in result.items():
        key = prefix + str(key)
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            lines += ["", f"{key}:", "", *_dict_table(value), ""]
        elif isinstance(value, dict) and value and all(isinstance(v, dict) for v in value.values()):
            lines += ["", f"{key}:", "", *_dict_table([{"name": k, **v} for k, v in value.items()]), ""]
        elif isinstance(value, dict) and value:
            lines += _details(value, key + ".")
        else:
            lines.append(f"- {key}: {_fmt(value)}")
    return lines


def markdown(record: dict) -> str:
    env = (record["steps"].get("environment", {}).get("result") or {})
    lines = [f"# GPU check ({record['mode']})", "",
             f"- device: {env.get('device', 'unknown')}; host {record['host']}; python {record['python']}",
             f"- started {record['started']}, finished {record['finished']}, "
             f"{record.get('elapsed_s')} s of a {record['budget_s']:.0f} s budget", "",
             "| step | status | s | summary |", "|---|---|---|---|"]
    lines += ["| " + " | ".join(_fmt(c) for c in r) + " |" for r in _rows(record)]
    lines += ["", "Not checked here:", *[f"- {n}" for n in record["not_checked"]]]
    for name, e in record["steps"].items():
        lines += ["", f"## {name}: {e['title']}", "", f"status **{e['status']}**"
                  + (f" ({e['seconds']:.1f} s of {e['limit_s']:.0f} s)" if "seconds" in e else "")]
        if e.get("reason"):
            lines.append(f"- reason: {_fmt(e['reason'])}")
        lines += _details(e.get("result") or {})
        if e.get("traceback"):
            lines += ["", "```", e["traceback"].rstrip(), "```"]
    return "\n".join(lines) + "\n"
