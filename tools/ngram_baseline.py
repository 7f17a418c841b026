"""Kneser-Ney n-gram baseline for the LSTM LM (see tfmstep/cli/ngram_baseline.py for the flags)."""

from tfmstep.cli.ngram_baseline import run

if __name__ == "__main__":
    run()
