"""`minigpt <command>`: train, generate and the cost and model tools, one module each:

    training.py    train (train.py at the top of the repository wraps it)
    generation.py  generate (generate.py wraps it)
    costs.py       costs, report, calibrate, hardware, scale
    models.py      quantize, eval, import, export, init
    serving.py     serve (the OpenAI-compatible server, minigpt.serve)

Bad input of any kind ends in one line on stderr and exit code 2; see minigpt.errors.
"""

import sys

from minigpt.cli.common import EXIT_BAD_INPUT
from minigpt.cli.costs import cmd_calibrate, cmd_costs, cmd_hardware, cmd_report, cmd_scale
from minigpt.cli.generation import cmd_generate
from minigpt.cli.models import cmd_eval, cmd_export, cmd_import, cmd_init, cmd_quantize
from minigpt.cli.serving import cmd_serve
from minigpt.cli.training import cmd_train
from minigpt.errors import MiniGPTError

COMMANDS = {
    "train": (cmd_train, "train a model from a TOML config"),
    "generate": (cmd_generate, "write text with a trained model"),
    "costs": (cmd_costs, "FLOPs, bytes and seconds by layer, op or phase (measured or predicted)"),
    "report": (cmd_report, "write a run's report.html (loss, cost per layer, roofline, energy)"),
    "calibrate": (cmd_calibrate, "measure this machine's matmul FLOP/s and memory bandwidth"),
    "hardware": (cmd_hardware, "list hardware profiles, or show one with its sources"),
    "scale": (cmd_scale, "training and serving cost, energy and carbon of a model at full size"),
    "quantize": (cmd_quantize, "write an int8 checkpoint of a run"),
    "eval": (cmd_eval, "validation loss, perplexity, and int8 against fp32"),
    "import": (cmd_import, "a Hugging Face GPT-2 folder (safetensors) -> a run folder"),
    "export": (cmd_export, "a run folder -> a Hugging Face GPT-2 folder"),
    "init": (cmd_init, "a run folder of GPT-2-initialised weights for a config (no training)"),
    "serve": (cmd_serve, "an OpenAI-compatible server with each request's joules"),
}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        lines = ["usage: minigpt <command> [options]   (minigpt <command> --help for each)", "", "commands:"]
        lines += [f"  {name:10s} {help_}" for name, (_, help_) in COMMANDS.items()]
        if argv and argv[0] not in ("-h", "--help"):
            print(f"minigpt: unknown command {argv[0]!r}\n" + "\n".join(lines), file=sys.stderr)
            return EXIT_BAD_INPUT
        print("\n".join(lines))
        return 0 if argv else EXIT_BAD_INPUT
    return run(COMMANDS[argv[0]][0], argv[1:])


def run(command, argv) -> int:
    """Run a command; bad input becomes one line on stderr and exit code 2."""
    from minigpt.train.trainer import TrainingDiverged

    try:
        return command(argv)
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except MiniGPTError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except MemoryError:
        print("error: out of memory: this machine cannot hold what the command asked for (a model, "
              "batch or file too large); try a smaller one (minigpt costs --config CONFIG --memory "
              "estimates a training run)", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("aborted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`... | head`): stop quietly
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except OSError as e:  # a writer outside safeio (a plot, a prompt file): still one line
        from minigpt.safeio import reason

        print(f"error: {e.filename or 'a file'}: {reason(e)}", file=sys.stderr)
        return EXIT_BAD_INPUT
