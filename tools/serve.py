"""Serve exported models locally (see tfmstep/cli/serve.py for the flags)."""

from tfmstep.cli.serve import run

if __name__ == "__main__":
    run()
