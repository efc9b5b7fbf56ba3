"""Finding inputs: captions that are not UTF-8 or not valid captions.jsonl lines, and lines naming missing
videos, are reported with their file and line, never stored garbled, and never stop the scan."""
from __future__ import annotations

import json
import shutil

import pytest

from megatron_regdpo.data.inputs import find_inputs, scan_inputs

LATIN1 = "caf\u00e9 au lait".encode("latin-1")   # 0xE9 alone is no UTF-8


@pytest.fixture()
def folder(tmp_path, clips):
    for name in ("vp9", "mjpeg", "truncated"):
        shutil.copy(clips[name], tmp_path / clips[name].name)
    (tmp_path / "sub").mkdir()
    shutil.copy(clips["vp9"], tmp_path / "sub" / "nested.webm")
    return tmp_path


def _by_id(videos):
    return {v.sample_id: v for v in videos}


def test_txt_caption_that_is_not_utf8_is_a_problem_of_its_video(folder):
    (folder / "vp9.txt").write_bytes(LATIN1)
    (folder / "mjpeg.txt").write_bytes("\ufeffa clip \u2014 in UTF-8 with a BOM\n".encode())
    videos, problems = scan_inputs(folder)
    vp9, mjpeg = _by_id(videos)["vp9"], _by_id(videos)["mjpeg"]
    assert problems == [] and vp9.caption is None
    assert vp9.problem.reason == "bad_caption" and vp9.problem.path == str(folder / "vp9.webm")
    assert "vp9.txt is not valid UTF-8 at byte offset 3" in vp9.problem.detail
    assert mjpeg.caption == "a clip \u2014 in UTF-8 with a BOM" and mjpeg.problem is None
    assert _by_id(videos)["truncated"].caption is None and _by_id(videos)["truncated"].problem is None


def test_bad_captions_jsonl_lines_are_reported_and_the_good_lines_count(folder):
    lines = [json.dumps({"file": "vp9.webm", "caption": "good line"}).encode(),
             b'{"file": "mjpeg.avi", "caption": ',                         # 2: not JSON
             json.dumps({"file": "mjpeg.avi"}).encode(),                    # 3: no caption
             json.dumps({"file": "mjpeg.avi", "caption": 7}).encode(),      # 4: not a string
             b"",                                                           # blank lines are fine
             b'{"file": "sub/nested.webm", "caption": "' + LATIN1 + b'"}',  # 6: not UTF-8
             json.dumps({"file": "gone.mp4", "caption": "lost"}).encode(),  # 7: no such video
             json.dumps({"file": "../vp9.webm", "caption": "outside"}).encode(),   # 8: outside the folder
             json.dumps({"file": "truncated.webm", "caption": "last line"}).encode()]
    (folder / "captions.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    videos, problems = scan_inputs(folder)
    got = {(p.path.rsplit("/", 1)[-1], p.reason) for p in problems}
    assert got == {("captions.jsonl:2", "bad_caption"), ("captions.jsonl:3", "bad_caption"),
                   ("captions.jsonl:4", "bad_caption"), ("captions.jsonl:6", "bad_caption"),
                   ("gone.mp4", "missing_video"), ("captions.jsonl:8", "bad_caption")}
    detail = {p.path.rsplit("/", 1)[-1]: p.detail for p in problems}
    assert "not valid JSON" in detail["captions.jsonl:2"]
    assert "string 'file' and 'caption'" in detail["captions.jsonl:4"]
    assert "not valid UTF-8 at byte offset 43" in detail["captions.jsonl:6"]
    assert detail["gone.mp4"] == f"{folder / 'captions.jsonl'}:7 names it but there is no such file"
    found = _by_id(videos)
    assert found["vp9"].caption == "good line" and found["truncated"].caption == "last line"
    assert found["mjpeg"].caption is None and found["sub__nested"].caption is None     # never garbled
    assert "gone" not in found
    with pytest.raises(ValueError, match=r"6 problem\(s\)(.|\n)*captions.jsonl:2: bad_caption"):
        find_inputs(folder)


def test_a_jsonl_caption_wins_over_a_bad_txt(folder):
    (folder / "vp9.txt").write_bytes(LATIN1)
    (folder / "captions.jsonl").write_text(json.dumps({"file": "vp9.webm", "caption": " from jsonl "}) + "\r\n")
    vp9 = _by_id(find_inputs(folder))["vp9"]
    assert vp9.caption == "from jsonl" and vp9.problem is None


def test_missing_folder_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        scan_inputs(tmp_path / "nope")
