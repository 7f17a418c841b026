"""Shim kept for the README's commands: the main is tfmstep/cli/evaluate.py (``tfmstep-evaluate``)."""

from tfmstep.cli.evaluate import run

if __name__ == "__main__":
    run()
