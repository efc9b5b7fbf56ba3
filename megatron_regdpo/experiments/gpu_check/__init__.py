"""The one-call GPU check (tools/gpu_check.py, `make gpu-check`, docs/gpu.md).

On a bare GPU machine it installs the carried wheels, then runs, each step timed, limited and caught:
  install      the wheels in .whl/ into a target folder (skipped when everything imports already)
  environment  (a) GPU, versions, measured bf16 matmul TFLOP/s and device copy GB/s
  parity       (b) our Wan against diffusers' in bf16 (debug size, one 1.3B-width layer)
  kernel       (c) the Triton per-sample squared-error kernel: correctness, GB/s against the copy
  step         (d) the 1.3B Reg-DPO step: time, TFLOP/s, MFU, peak memory against the planner;
               recompute and lean.py costs
  sampling     (e) negatives: seconds per clip, 50 UniPC steps with CFG
  gpu_tests    (f) tests/gpu through pytest
and writes gpu_check.json (after every step) and gpu_check.md. `--cpu-smoke` runs the same code at tiny
sizes on the CPU. Importing this package imports nothing heavy: the install step must run first.
"""
from .runner import main

__all__ = ["main"]
