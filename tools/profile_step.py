"""Step profiler (same program as the ``tfmstep-profile`` console script; flags in tfmstep/cli/profile.py)."""

from tfmstep.cli.profile import run

if __name__ == "__main__":
    run()
