"""Experiments, benchmarks and device checks: the top floor of the package (megatron_regdpo.LAYERS).

Modules here may import anything below them (models, objectives, data, training, capacity, kernels);
nothing below imports them. Each experiment is driven by a thin tool in tools/:
    comm.py            bytes per step per layout vs parallel/comm_model.py      tools/bench_comm.py
    decode.py          decode + normalise vs VAE-encode throughput              tools/bench_decode.py
    kernels.py         the squared-error kernel vs its memory-traffic floor     tools/bench_kernels.py
    throughput.py      a real short training run per point of a sweep           tools/bench_throughput.py
    capacity.py        the 14B I2V frames-per-clip table of the planner         tools/capacity_experiment.py
    planner_check.py   the planner against measured CPU (and GPU) peaks         tools/validate_planner.py
    also checkpoint_checksum.py, data_ranks.py, model_overhead.py, gpu_check/ (tools/gpu_check.py)
"""
