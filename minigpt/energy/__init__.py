"""Energy: a run's joules in four layers (accounting), the run's own energy document, energy.json
(run_energy). Imports hardware, counting and the base modules.
"""
