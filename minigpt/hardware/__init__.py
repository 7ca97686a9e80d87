"""Hardware: what a machine can do and what it draws.

profiles (TOML data files in data/, every figure with its source), calibrate (this machine's
measured rates, cached), bandwidth (STREAM read/write/copy/triad bandwidths), roofline (the ideal
machine's time for a set of records, each against the ceiling that fits it), counters (RAPL
and NVML energy counters), cpu_power (the estimated power of a CPU without counters), gpu (which
profile a GPU is), blas (OpenBLAS threads). Imports counting, kernels and the base modules.
"""
