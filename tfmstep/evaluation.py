"""Evaluate trained runs with their family's own evaluation (the registry's ``evaluate`` hook); the
library side of ``tfmstep-evaluate``."""

from __future__ import annotations

from tfmstep.errors import UserError


def evaluate(workdirs, labels=None, output_dir="", name="eval", **options) -> tuple[dict, str]:
    """Load each workdir's latest checkpoint and run its family's ``evaluate`` hook, which returns a
    report with a printable ``table``; -> (report, table)."""
    from tfmstep import trainer  # imported late: the trainer pulls in the whole package

    if not workdirs:
        raise UserError("give at least one --workdirs entry")
    runs = [(workdir, trainer.load_trained(workdir)) for workdir in workdirs]
    specs = {spec.name: spec for _, (_, _, spec) in runs}
    if len(specs) > 1:
        raise UserError(f"--workdirs mix model families ({', '.join(sorted(specs))}); evaluate one at a time")
    spec = next(iter(specs.values()))
    if spec.evaluate is None:
        raise UserError(f"model {spec.name!r} registers no evaluation (its training run's metrics.json has "
                        f"its eval metrics)")
    report = spec.evaluate(runs, labels or None, output_dir, name, **options)
    return report, report["table"]
