"""Generate text from a trained language model (see tfmstep/cli/generate.py for the flags)."""

from tfmstep.cli.generate import run

if __name__ == "__main__":
    run()
