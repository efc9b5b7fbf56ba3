"""logging.tensorboard and logging.wandb with the real packages (the `logging` extra): every scalar of a step
and a validation video reach TensorBoard's event files and an offline W&B run, read back with TensorBoard's
own reader and from W&B's run log (its record stream, decoded with W&B's protobuf schema); a resumed run's
repeated steps replace the killed run's in TensorBoard. The trainer end to end: tests/integration/test_trainer.py."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from _wandb_log import history, offline_env, wandb_left, wandb_records

from megatron_regdpo.config.schema import LoggingConfig
from megatron_regdpo.training.metrics import OBJECTIVE_NAMES, STEP_NAMES, VIDEOS_KEY, step_metrics
from megatron_regdpo.training.metrics_log import MetricsLogger, middle_frame

wandb = pytest.importorskip("wandb", reason="the `logging` extra (wandb) is not installed")
pytest.importorskip("tensorboard", reason="the `logging` extra (tensorboard) is not installed")


def _step(step: int) -> dict:
    obj = {k: 0.0 for k in OBJECTIVE_NAMES} | {"loss/total": 0.5 + step, "dpo/dgr": 125.0, "dpo/implicit_acc": 0.5}
    return step_metrics(obj, step=step, lr=5e-6, grad_norm=torch.tensor(1.25), skipped_steps=0, pairs=16,
                        step_s=2.0, peak_gb=60.0)


def _video(path: Path) -> None:
    from megatron_regdpo.data.preview import MPEG4, write_video

    frames = torch.zeros(5, 16, 16, 3, dtype=torch.uint8)
    frames[2] = 200   # the middle frame, what TensorBoard gets
    path.parent.mkdir(parents=True, exist_ok=True)
    write_video(path, frames.numpy(), 8.0, MPEG4)


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    for var, value in offline_env(tmp_path).items():
        monkeypatch.setenv(var, value)
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    yield
    wandb.teardown()   # W&B's service process (wandb-core) outlives finish() until teardown or exit
    left = wandb_left()
    assert not left, f"W&B processes left running: {[p.pid for p in left]}"


def test_tensorboard_and_wandb_get_every_scalar_and_the_videos(tmp_path, offline_wandb):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "my-run"
    video = "videos/step_000003_pair0.mp4"
    _video(run_dir / video)
    cfg = LoggingConfig(jsonl=False, tensorboard=True, wandb=True)
    with MetricsLogger(run_dir, cfg, rank=0, world=1, progress=False, config={"objective": {"beta": 500}},
                       stream=io.StringIO()) as logger:
        for step in (1, 2, 3):
            logger.log(_step(step) | ({VIDEOS_KEY: [video]} if step == 3 else {}))
    scalars = set(STEP_NAMES) - {"step"}

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "images": 0}).Reload()
    assert set(events.Tags()["scalars"]) == scalars
    assert [(e.step, e.value) for e in events.Scalars("loss/total")] == [(1, 1.5), (2, 2.5), (3, 3.5)]
    assert [e.value for e in events.Scalars("dpo/dgr")] == [125.0] * 3
    (image,) = events.Images(f"{VIDEOS_KEY}/step_000003_pair0")
    from PIL import Image

    got = np.asarray(Image.open(io.BytesIO(image.encoded_image_string)))
    assert image.step == 3 and (image.height, image.width) == (16, 16)
    np.testing.assert_array_equal(got[..., :3], middle_frame(run_dir / video))

    wandb.teardown()   # W&B's service writes the run log out: read it after it ended
    (run_file,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    records = wandb_records(run_file)
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert run.display_name == "my-run" and run.project == "megatron_regdpo"
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert config["objective"] == {"beta": 500}
    rows = history(records)
    assert sorted(rows) == [1, 2, 3]
    assert {k for k in rows[1] if not k.startswith("_")} == scalars
    assert [rows[s]["loss/total"] for s in (1, 2, 3)] == [1.5, 2.5, 3.5]
    media = rows[3][f"{VIDEOS_KEY}/step_000003_pair0"]
    assert media["_type"] == "video-file"
    logged = run_file.parent / "files" / media["path"]
    assert logged.read_bytes() == (run_dir / video).read_bytes()


def test_a_rerun_replaces_the_tensorboard_steps_it_repeats(tmp_path):
    """Killed after logging steps 1-5 with its checkpoint at step 3, the run resumes at 3 and logs 4-6 again:
    TensorBoard keeps one value per step, the resumed run's (as metrics.jsonl does); so for a rerun from 0."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = LoggingConfig(jsonl=True, tensorboard=True)
    with MetricsLogger(tmp_path, cfg, rank=0, world=1, progress=False, stream=io.StringIO()) as logger:
        for step in range(1, 6):
            logger.log({"step": step, "loss/total": float(step)})
    with MetricsLogger(tmp_path, cfg, rank=0, world=1, progress=False, start_step=3, stream=io.StringIO()) as logger:
        for step in range(4, 7):
            logger.log({"step": step, "loss/total": 10.0 * step})
    events = EventAccumulator(str(tmp_path / "tensorboard")).Reload()
    want = [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0), (5, 50.0), (6, 60.0)]
    assert [(e.step, e.value) for e in events.Scalars("loss/total")] == want
    assert [(r["step"], r["loss/total"]) for r in map(json.loads, (tmp_path / "metrics.jsonl").open())] == want
    # killed before its first checkpoint, the run starts over from step 0: every old step goes
    with MetricsLogger(tmp_path, cfg, rank=0, world=1, progress=False, stream=io.StringIO()) as logger:
        for step in range(1, 3):
            logger.log({"step": step, "loss/total": 100.0 * step})
    events = EventAccumulator(str(tmp_path / "tensorboard")).Reload()
    want = [(1, 100.0), (2, 200.0)]
    assert [(e.step, e.value) for e in events.Scalars("loss/total")] == want
    assert [(r["step"], r["loss/total"]) for r in map(json.loads, (tmp_path / "metrics.jsonl").open())] == want


def test_a_resumed_run_continues_its_wandb_run(tmp_path, offline_wandb, monkeypatch):
    """Restarted from a checkpoint (start_step > 0) the run continues the W&B run its folder started
    (RUN_DIR/wandb_run_id); from step 0 it starts a new one; $WANDB_RUN_ID, when set, names the run."""
    cfg = LoggingConfig(jsonl=False, wandb=True)

    def run(start: int, steps: range) -> str:
        with MetricsLogger(tmp_path, cfg, rank=0, world=1, progress=False, start_step=start,
                           stream=io.StringIO()) as logger:
            for step in steps:
                logger.log({"step": step, "loss/total": float(step)})
        return (tmp_path / "wandb_run_id").read_text().strip()

    first = run(0, range(1, 4))
    assert run(3, range(4, 6)) == first                      # resumed: the same W&B run
    fresh = run(0, range(1, 3))
    assert fresh != first                                    # started over: a new one
    wandb.teardown()                                         # W&B reads its environment once per process
    monkeypatch.setenv("WANDB_RUN_ID", "chosen-by-user")
    assert run(2, range(3, 4)) == "chosen-by-user"
    wandb.teardown()   # W&B's service writes the run logs out: read them after it ended
    by_id: dict[str, list] = {}
    for run_file in sorted((tmp_path / "wandb").glob("offline-run-*/run-*.wandb")):
        records = wandb_records(run_file)
        (r,) = [x.run for x in records if x.WhichOneof("record_type") == "run"]
        by_id.setdefault(r.run_id, []).extend(sorted(history(records)))
    assert sorted(by_id[first]) == [1, 2, 3, 4, 5] and by_id[fresh] == [1, 2] and by_id["chosen-by-user"] == [3]
