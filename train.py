"""Train a GPT-2 from scratch: python train.py configs/tiny.toml (--help for options)."""
import sys

from minigpt.cli import cmd_train, run

if __name__ == "__main__":
    sys.exit(run(cmd_train, sys.argv[1:]))
