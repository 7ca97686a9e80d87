"""The atheris (libFuzzer) driver behind tests/fuzz/fuzz_*.py: coverage-guided mutation of the seed
inputs of targets.py, until -runs=N inputs have been tried (or -max_total_time=S seconds).

    PYTHONPATH=. python tests/fuzz/fuzz_checkpoint.py -runs=20000

Any exception other than a one-line MiniGPTError stops the run with the input that caused it
(saved as crash-*). libFuzzer's own limits turn a hang (-timeout, default here 10 s an input) or
a memory blow-up (-rss_limit_mb, default 2048) into a reported failure as well. pytest does not
collect these files (they are not test_*.py).
"""

import shutil
import sys
import tempfile
from pathlib import Path


def main(target: str) -> None:
    try:
        import atheris
    except ImportError:
        sys.exit("atheris is not installed (pip install atheris): the hypothesis tests in "
                 "tests/test_fuzz.py cover the same targets")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    with atheris.instrument_imports(include=["minigpt"]):
        from fuzz import targets
    fn = targets.TARGETS[target]
    # libFuzzer ends the process from C, so no atexit handler runs: the seeds and the inputs
    # written as files live in fixed folders, emptied at the start of each run instead
    base = Path(tempfile.gettempdir()) / "minigpt-fuzz"
    seed_dir, work_dir = base / f"seeds-{target}", base / f"work-{target}"
    for folder in (seed_dir, work_dir):
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
    targets.use_folder(work_dir)
    for i, seed in enumerate(targets.seeds(target)):
        (seed_dir / f"seed{i}").write_bytes(seed)
    argv = list(sys.argv)
    if not any(a.startswith("-timeout=") for a in argv):
        argv.append("-timeout=10")
    if not any(not a.startswith("-") for a in argv[1:]):
        argv.append(str(seed_dir))  # the seeds, unless a corpus folder was given
    atheris.Setup(argv, lambda data: fn(bytes(data)))
    atheris.Fuzz()
