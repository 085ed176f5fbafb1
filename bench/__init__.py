"""medix_fast benchmarks: one harness, one command, baselines measured in the same run.

    python -m bench                      # everything that fits this machine -> bench/results/
    python -m bench --smoke              # each benchmark at its smallest size (CI smoke test)
    python -m bench --only policy_loss   # one benchmark (or a module: kernels, sampler, rewards)
    python -m bench --gpu-check          # the prepared ~8-minute check of every CUDA path (bench/gpu_check.py)
    python bench/plot.py                 # time and memory against tokens, PNG next to the CSV
    pytest bench/ --benchmark-only       # the same cases through pytest-benchmark

See bench/run.py for the flags, bench/timing.py for how time and memory are measured.
"""
