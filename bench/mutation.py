"""Mutation testing of the core numerics with mutmut, module by module, in a bounded time.

    PYTHONPATH=$PWD nice -n 19 python bench/mutation.py optim sampling --minutes 20
    PYTHONPATH=$PWD python bench/mutation.py --list

mutmut (3.x, the `mutation` extra: pip install mutmut) rewrites each function of a module into
many small variants ("mutants": `<` for `<=`, `+ 1` for `- 1`, a constant changed, an argument
dropped) and runs the tests against each one. A mutant the tests catch is "killed"; one they do
not is a "survivor": either a test is missing, or the change cannot alter behaviour (an
"equivalent" mutant). docs/testing.md lists the scores and explains every survivor.

Each module is run with only the test files that exercise it (MODULES below), in a temporary copy
of the repository (mutmut writes its mutated tree to ./mutants): nothing is left in the working
tree. The copy is made from the files on disk, so uncommitted tests count. mutmut runs with the
lowest CPU priority (nice 19) unless --nice says otherwise. The time budget (--minutes) covers
all modules together: when it runs out mutmut is interrupted, the mutants it finished are
counted, and the rest are reported as not run. The table gives, per module: mutants, killed,
survived, timeout (killed by running past mutmut's time limit), not run, and the score
(killed + timeout) / (mutants that were run). --survivors prints each survivor's diff.
"""

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# module name -> (source file, the test files that exercise it). mutmut runs these tests once
# to learn which test reaches which function, then runs only those tests against each mutant.
MODULES = {
    "optim": ("minigpt/train/optim.py",
              ["tests/test_mutants_optim.py", "tests/test_schedule.py",
               "tests/test_torch_parity.py", "tests/test_scaling_flops.py"]),
    "sampling": ("minigpt/sampling.py",
                 ["tests/test_mutants_sampling.py", "tests/test_sampling.py",
                  "tests/test_generate.py"]),
    "accounting": ("minigpt/energy/accounting.py",
                   ["tests/test_mutants_accounting.py", "tests/test_energy.py",
                    "tests/test_run_power.py", "tests/test_run_report.py",
                    "tests/test_published.py"]),
    "quant": ("minigpt/nn/quant.py",
              ["tests/test_mutants_quant.py", "tests/test_quant.py", "tests/test_kv_int8.py",
               "tests/test_moe.py"]),
    "closed_form": ("minigpt/counting/closed_form.py",
                    ["tests/test_mutants_closed_form.py", "tests/test_costs.py",
                     "tests/test_moe.py", "tests/test_quant.py", "tests/test_scaling_flops.py",
                     "tests/test_flops_per_element.py", "tests/test_dist.py",
                     "tests/test_scaling.py"]),
    "layers": ("minigpt/nn/layers.py",
               ["tests/test_mutants_layers.py", "tests/test_gradients.py",
                "tests/test_torch_parity.py", "tests/test_kv_int8.py",
                "tests/test_flops_per_element.py", "tests/test_generate.py", "tests/test_moe.py",
                "tests/test_costs.py", "tests/test_quant.py"]),
    "model": ("minigpt/nn/model.py",
              ["tests/test_mutants_model.py", "tests/test_gradients.py", "tests/test_generate.py",
               "tests/test_torch_parity.py", "tests/test_moe.py", "tests/test_kv_int8.py",
               "tests/test_scaling_flops.py", "tests/test_costs.py", "tests/test_quant.py"]),
}

# what the copy needs for the tests to run: the package, the tests and the files they read
COPY = ["minigpt", "tests", "configs", "corpora", "bench", "docs", "train.py", "generate.py",
        "pyproject.toml", "README.md"]
IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", ".hypothesis", "mutants")

# mutmut's exit codes per mutant (mutmut.stats.status_by_exit_code), folded into our columns
STATUS = {1: "killed", 3: "killed", 0: "survived", 36: "timeout", 24: "timeout", -24: "timeout",
          152: "timeout", 255: "timeout", 5: "no tests", 33: "no tests", 34: "skipped",
          None: "not run"}


def make_copy(module: str, tests: list[str], dest: Path) -> None:
    """A copy of the repository in dest with a [tool.mutmut] table that mutates only module."""
    for name in COPY:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=IGNORE)
        elif src.exists():
            shutil.copy2(src, dest / name)
    tests = [t for t in tests if (ROOT / t).exists()]
    table = {
        "source_paths": ["minigpt"],
        "only_mutate": [module],
        "pytest_add_cli_args_test_selection": tests,
        "pytest_add_cli_args": ["-p", "no:cacheprovider", "-q"],
        "also_copy": [n for n in COPY if n not in ("minigpt", "tests", "pyproject.toml")],
    }
    # made now, not by mutmut: a folder on PYTHONPATH that is missing when Python starts is
    # skipped for the whole run, and the tests would import the installed minigpt instead
    (dest / "mutants").mkdir()
    lines = ["", "[tool.mutmut]"] + [f"{k} = {json.dumps(v)}" for k, v in table.items()]
    with open(dest / "pyproject.toml", "a") as f:
        f.write("\n".join(lines) + "\n")


def run_mutmut(dest: Path, seconds: float, children: int, nice: int) -> bool:
    """Run mutmut in dest for at most `seconds`; True if it finished, False if interrupted."""
    env = dict(os.environ)
    # the tests import minigpt from the mutated tree, and so do the commands they start
    env["PYTHONPATH"] = str(dest / "mutants")
    env.pop("MUTANT_UNDER_TEST", None)
    # mutmut forks each mutant's test process from one that has already run the tests; an
    # OpenMP thread pool that process started (PyTorch's, in test_torch_parity) is gone in the
    # fork, and the first parallel call there waits on it forever, which mutmut would then
    # count as a kill by timeout. One OpenMP thread: no pool to lose. (OPENBLAS_NUM_THREADS
    # stays as it is: test_energy sets it to see the calibration cache key change.)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = "1"
    cmd = ["nice", "-n", str(nice), sys.executable, "-m", "mutmut", "run", "--max-children",
           str(children)]
    with open(dest / "mutmut.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=dest, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            proc.wait(timeout=max(1.0, seconds))
            return True
        except subprocess.TimeoutExpired:
            # mutmut stops its workers on Ctrl-C and keeps the results it has
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            return False


def read_results(dest: Path, module: str) -> dict[str, str]:
    """mutant name -> status, from the .meta file mutmut keeps beside the mutated module."""
    meta = dest / "mutants" / (module + ".meta")
    if not meta.exists():
        return {}
    codes = json.loads(meta.read_text())["exit_code_by_key"]
    return {name: STATUS.get(code, f"exit {code}") for name, code in codes.items()}


def diff_of(dest: Path, name: str) -> str:
    """The lines one mutant changes (mutmut's diff without its headers and context)."""
    env = dict(os.environ, PYTHONPATH=str(dest / "mutants"))
    out = subprocess.run([sys.executable, "-m", "mutmut", "show", name], cwd=dest, env=env,
                         capture_output=True, text=True, check=False)
    return "\n".join(line for line in out.stdout.splitlines()
                     if line[:1] in "-+" and not line.startswith(("---", "+++")))


def row(name: str, counts: Counter) -> str:
    tried = counts["killed"] + counts["survived"] + counts["timeout"]
    score = f"{100 * (counts['killed'] + counts['timeout']) / tried:.1f}%" if tried else "-"
    total = sum(counts.values())
    return (f"{name:<12} {total:>7} {counts['killed']:>7} {counts['survived']:>8} "
            f"{counts['timeout']:>7} {counts['not run'] + counts['no tests']:>7} {score:>7}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("modules", nargs="*", help=f"modules to mutate, from: {', '.join(MODULES)}")
    p.add_argument("--minutes", type=float, default=30.0,
                   help="time budget for all modules together (default 30)")
    p.add_argument("--children", type=int, default=1,
                   help="mutants tested at once (default 1: the machine is shared)")
    p.add_argument("--nice", type=int, default=19, help="CPU niceness of mutmut (default 19)")
    p.add_argument("--survivors", action="store_true", help="print each survivor's diff")
    p.add_argument("--keep", action="store_true", help="keep the temporary copies (for mutmut "
                   "show/browse) and print where they are")
    p.add_argument("--list", action="store_true", help="list the modules and their tests")
    args = p.parse_args(argv)

    if args.list or not args.modules:
        for name, (module, tests) in MODULES.items():
            print(f"{name:<12} {module:<34} {' '.join(tests)}")
        return 0
    unknown = [m for m in args.modules if m not in MODULES]
    if unknown:
        p.error(f"unknown module(s) {', '.join(unknown)}; choose from {', '.join(MODULES)}")
    try:
        import mutmut  # noqa: F401
    except ImportError:
        p.error("mutmut is not installed: pip install mutmut (the `mutation` extra)")

    deadline = time.monotonic() + 60 * args.minutes
    print(f"{'module':<12} {'mutants':>7} {'killed':>7} {'survived':>8} {'timeout':>7} "
          f"{'not run':>7} {'score':>7}")
    survivors = {}
    for name in args.modules:
        module, tests = MODULES[name]
        left = deadline - time.monotonic()
        if left <= 0:
            print(f"{name:<12} not run: the time budget ran out")
            continue
        dest = Path(tempfile.mkdtemp(prefix=f"minigpt-mutation-{name}-"))
        try:
            make_copy(module, tests, dest)
            finished = run_mutmut(dest, left, args.children, args.nice)
            results = read_results(dest, module)
            if not results:
                print(f"{name:<12} mutmut made no results; its log:")
                print((dest / "mutmut.log").read_text()[-3000:])
                continue
            counts = Counter(results.values())
            print(row(name, counts) + ("" if finished else "  (interrupted)"), flush=True)
            if finished and counts["not run"] == len(results):
                # mutmut stopped before the first mutant: a failing clean run, say; its words
                lines = (dest / "mutmut.log").read_text(errors="replace").replace("\r", "\n")
                said = [ln for ln in lines.splitlines()  # without the spinner's Braille frames
                        if ln.strip() and not "\u2800" <= ln[:1] <= "\u28ff"]
                print("\n".join(f"{'':<12} {ln}" for ln in said[-15:]))
            survivors[name] = [(m, diff_of(dest, m) if args.survivors else "")
                               for m, s in sorted(results.items()) if s == "survived"]
        finally:
            if args.keep:
                print(f"{'':<12} kept in {dest}")
            else:
                shutil.rmtree(dest, ignore_errors=True)
    for name, found in survivors.items():
        if found:
            print(f"\nsurvivors in {name}:")
        for mutant, diff in found:
            print(f"  {mutant}")
            if diff:
                print("\n".join("    " + line for line in diff.splitlines()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
