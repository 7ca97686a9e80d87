"""minigpt: a GPT-2 trained from scratch in NumPy, with every FLOP, byte and second counted."""

from minigpt.api import Model, load

__all__ = ["Model", "load"]
__version__ = "0.1.0"
