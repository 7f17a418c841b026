"""Export a trained model (same program as the ``tfmstep-export`` console script; flags in tfmstep/cli/export.py)."""

from tfmstep.cli.export import run

if __name__ == "__main__":
    run()
