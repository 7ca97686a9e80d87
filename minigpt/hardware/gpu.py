"""Which hardware profile describes this machine's GPU: its name, from NVML (pynvml, imported only
when asked) or else nvidia-smi, matched to a packaged profile by rules that refuse to guess.

    gpu_name()                      "NVIDIA H100 80GB HBM3", or None where no GPU is seen
    profile_for("NVIDIA H200")      "h200"; None for a card no profile describes

The rules: H200 -> h200; H100 PCIe -> h100-pcie; any other H100 (the SXM5 boards report
"H100 80GB HBM3") -> h100-sxm; B200 -> b200; A100 SXM4 -> a100-sxm-40gb or -80gb by memory;
V100 SXM2 -> v100-sxm2. NVL boards (H100 NVL, H200 NVL) have their own power and clocks: None.
"""

import subprocess


def gpu_name(index: int = 0) -> str | None:
    """The name NVIDIA's driver gives GPU `index`, or None where there is none to ask."""
    try:
        import pynvml  # lazily: nvidia-ml-py is an optional dependency

        try:
            pynvml.nvmlInit()
            name = pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(index))
            return name.decode() if isinstance(name, bytes) else str(name)
        except pynvml.NVMLError:
            pass
    except ImportError:
        pass
    try:
        out = subprocess.run(["nvidia-smi", f"--id={index}", "--query-gpu=name",
                              "--format=csv,noheader"], capture_output=True, text=True,
                             timeout=20, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return out or None


def profile_for(name: str | None) -> str | None:
    """The packaged profile for a GPU name (see the module docstring), or None."""
    if not name:
        return None
    n = name.upper().replace("-", " ")
    if "NVL" in n:
        return None
    if "H200" in n:
        return "h200"
    if "H100" in n:
        return "h100-pcie" if "PCIE" in n else "h100-sxm"
    if "B200" in n:
        return "b200"
    if "A100" in n and "SXM" in n:
        return "a100-sxm-80gb" if "80GB" in n else "a100-sxm-40gb"
    if "V100" in n and "SXM2" in n:
        return "v100-sxm2"
    return None
