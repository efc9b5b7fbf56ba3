"""A diffusers pipeline folder assembled from a base pipeline folder with some components written anew.

A pipeline folder is `model_index.json` (the pipeline class, and per component its [library, class]; an
absent optional component is [null, null]) plus one subfolder per component. `assemble_pipeline` writes the
new components itself, copies (or symlinks) the others from the base, and copies model_index.json, all into
`<out>.partial`, renamed to `out` once complete: a folder named `out` is always a whole pipeline.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

INDEX_FILE = "model_index.json"


def read_pipeline_index(folder: str | Path) -> dict:
    folder = Path(folder)
    path = folder / INDEX_FILE
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder (want a local diffusers pipeline folder)")
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {folder} is not a diffusers pipeline folder (give the folder "
                                f"that holds {INDEX_FILE} and the vae/, text_encoder/, ... subfolders)")
    try:
        index = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from e
    if not isinstance(index, dict) or not isinstance(index.get("_class_name"), str):
        raise ValueError(f"{path} names no pipeline class (no '_class_name' entry)")
    return index


def components(index: dict) -> dict[str, tuple[str, str]]:
    """name -> (library, class) of every component the pipeline loads; [null, null] entries are absent."""
    return {k: (v[0], v[1]) for k, v in index.items()
            if not k.startswith("_") and isinstance(v, list) and len(v) == 2 and None not in v}


def check_out_free(out: str | Path) -> None:
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"output folder {out} exists and is not empty; refusing to overwrite it")


def assemble_pipeline(base: str | Path, out: str | Path, written: dict[str, Callable[[Path], object]],
                      link: bool = False) -> dict[str, str]:
    """`out` = the pipeline in `base` with `written[name](folder)` writing component `name` into `folder`.

    Every other component is copied (symlinks followed: a hub cache's files are links to blobs) or, with
    `link`, symlinked as a whole folder to its absolute path in `base`. Everything is checked before
    anything is written. Returns name -> "written" | "copied" | "linked".
    """
    base, final = Path(base), Path(out)
    index = read_pipeline_index(base)
    comps = components(index)
    unknown = sorted(set(written) - set(comps))
    if unknown:
        raise ValueError(f"{base / INDEX_FILE} has no component {unknown[0]!r} (it lists {sorted(comps)})")
    missing = [n for n in comps if n not in written and not (base / n).is_dir()]
    if missing:
        raise FileNotFoundError(f"{base / INDEX_FILE} lists the component {missing[0]!r} but {base / missing[0]} "
                                f"is not a folder: the pipeline folder is incomplete")
    check_out_free(final)
    tmp = final.with_name(final.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)  # left by an export that was killed
    tmp.mkdir(parents=True)
    how = {}
    try:
        for name in comps:
            if name in written:
                written[name](tmp / name)
                how[name] = "written"
            elif link:
                (tmp / name).symlink_to((base / name).resolve(), target_is_directory=True)
                how[name] = "linked"
            else:
                shutil.copytree(base / name, tmp / name)
                how[name] = "copied"
        shutil.copyfile(base / INDEX_FILE, tmp / INDEX_FILE)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():  # an empty folder (checked above)
        final.rmdir()
    tmp.rename(final)
    return how
