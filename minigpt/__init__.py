"""minigpt: a GPT-2 trained from scratch in NumPy, with every FLOP, byte and second counted.

The Python front: load a run and generate (load, Model), count what work costs (track, and the
Costs and Energy it gives), train (train -> Run), and carry the counts to full size (scale ->
Estimate). README's "From Python and in a notebook" shows each.

`minigpt.train` and `minigpt.scale` are functions although minigpt/train/ and minigpt/scale/ are
packages: the packages are imported first (importing a package sets its name on this module),
then the functions are bound, so the functions keep the names; import the packages' modules by
their full names (`from minigpt.scale import estimate`).
"""

import importlib

from minigpt.api import Model, load

for _package in ("minigpt.train", "minigpt.scale"):
    importlib.import_module(_package)
from minigpt.runs import Run, scale, train
from minigpt.tracking import CostRow, Costs, Energy, EnergyLayer, Estimate, Tracker, track

__all__ = ["CostRow", "Costs", "Energy", "EnergyLayer", "Estimate", "Model", "Run", "Tracker",
           "load", "scale", "track", "train"]
__version__ = "0.1.0"
