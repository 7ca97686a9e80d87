"""atheris harness for the scenario target (tests/fuzz/targets.py); see tests/fuzz/runner.py.

    PYTHONPATH=. python tests/fuzz/fuzz_scenario.py -runs=20000
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from runner import main

if __name__ == "__main__":
    main("scenario")
