"""What every command shares: the argument parser whose usage errors are bad input like any other,
and the exit code bad input gets."""

import argparse

from minigpt.errors import ConfigError

EXIT_BAD_INPUT = 2


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is a ConfigError like any other bad input."""

    def error(self, message):
        raise ConfigError(f"{self.prog}: {message}")
