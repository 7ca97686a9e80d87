"""Hardware: what a machine can do and what it draws.

profiles (TOML data files in data/, every figure with its source), calibrate (this machine's
measured rates, cached), roofline (the ideal machine's time for a set of records), counters (RAPL
and NVML energy counters), cpu_power (the estimated power of a CPU without counters), gpu (which
profile a GPU is), blas (OpenBLAS threads). Imports counting and the base modules.
"""
