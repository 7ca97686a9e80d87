"""Write text with a trained model: python generate.py out/tiny --prompt "def " (--help for options)."""
import sys

from minigpt.cli import cmd_generate, run

if __name__ == "__main__":
    sys.exit(run(cmd_generate, sys.argv[1:]))
