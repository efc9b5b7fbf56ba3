"""Install the carried wheels (tools/gpu_wheels.sh fills .whl/) into a target folder and put it first on
sys.path, when what the check imports is missing. Skipped when everything imports already (a cluster with
the stack installed). No index, no dependencies: the wheel set names every missing package itself."""
from __future__ import annotations

import importlib
import importlib.util
import sys

from .runner import Skip

# module the check imports -> the distribution that brings it
REQUIRED = {"megatron.core": "megatron-core", "diffusers": "diffusers"}


def importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _version(module: str) -> str:
    return str(getattr(importlib.import_module(module), "__version__", "unknown"))


def _needed(wheels: list, missing: list[str]) -> list:
    """The wheels of the missing distributions and every wheel of another one (their dependencies): a
    package the machine has already is not shadowed by the carried copy."""
    norm = lambda name: name.replace("-", "_").lower()  # noqa: E731  (a wheel file names its dist with _)
    want, known = {norm(REQUIRED[m]) for m in missing}, {norm(d) for d in REQUIRED.values()}
    return [w for w in wheels if norm(w.name.split("-")[0]) in want or norm(w.name.split("-")[0]) not in known]


def run(ctx) -> dict:
    missing = [m for m in REQUIRED if not importable(m)]
    wheels = sorted(ctx.wheel_dir.glob("*.whl")) if ctx.wheel_dir and ctx.wheel_dir.is_dir() else []
    if not missing:
        unused = f"; {len(wheels)} wheels in {ctx.wheel_dir} not needed" if wheels else ""
        raise Skip(f"nothing to install: {', '.join(REQUIRED)} import already{unused}")
    if not wheels:
        raise RuntimeError(f"{', '.join(missing)} do not import and {ctx.wheel_dir} holds no wheels: run "
                           f"tools/gpu_wheels.sh where PyPI is reachable and carry .whl (docs/gpu.md)")
    wheels = _needed(wheels, missing)
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
           "--no-cache-dir", "--upgrade", "--target", str(ctx.site_dir), *map(str, wheels)]
    rc, out, timed_out = ctx.run_process(cmd)
    if timed_out or rc != 0:
        raise RuntimeError(f"pip install {'timed out' if timed_out else f'failed (rc {rc})'}: {out[-1500:]}")
    sys.path.insert(0, str(ctx.site_dir))
    importlib.invalidate_caches()
    ctx.site_active = True
    still = [m for m in missing if not importable(m)]
    if still:
        raise RuntimeError(f"installed {len(wheels)} wheels into {ctx.site_dir}, but {', '.join(still)} "
                           f"still do not import")
    return {"site": str(ctx.site_dir), "installed_for": missing,
            "wheels": [{"file": w.name, "MiB": round(w.stat().st_size / 2**20, 2)} for w in wheels],
            "versions": {m: _version(m) for m in REQUIRED}}


def summary(result: dict) -> str:
    return (f"{len(result['wheels'])} wheels into {result['site']}: "
            + ", ".join(f"{m} {v}" for m, v in result["versions"].items()))
