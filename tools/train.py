"""Train a registered model (same program as the ``tfmstep-train`` console script).

  python tools/train.py --flagfile=models/cnn_digits.flags
"""

from tfmstep.cli.train import run

if __name__ == "__main__":
    run()
