"""Command-line programs (thin absl mains; the work is in the library)."""

import contextlib
import sys

from absl import logging

from tfmstep.errors import UserError


@contextlib.contextmanager
def exit_on_user_error():
    """Bad input ends a tool with one ``error: ...`` line on stderr and exit code 2, no stack trace."""
    try:
        yield
    except UserError as e:
        logging.flush()
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def run_program(main, module_name: str, extra_help: str = "") -> None:
    """``app.run(main)`` for the program defined in ``module_name``, so that ``--help`` shows that
    module's docstring and flags (absl shows those of ``__main__``, which is a tools/ shim or a console-
    script wrapper here, so it would print only "Try --helpfull"), and a flag absl refuses (a missing
    required flag, a bad value) is one ``error:`` line with exit code 2 rather than absl's FATAL + exit 1."""
    from absl import app, flags

    program = sys.modules[module_name]
    sys.modules["__main__"].__doc__ = (program.__doc__ or "") + extra_help
    for flag in flags.FLAGS.get_flags_for_module(module_name):
        flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)

    def parse(argv):
        try:
            return flags.FLAGS(argv)
        except flags.Error as e:
            print(f"error: {e} (see --help)", file=sys.stderr)
            sys.exit(2)

    app.run(main, flags_parser=parse)


def models_help() -> str:
    """The registered models, their presets and config fields (name: type = default), for --help."""
    import dataclasses

    from tfmstep import registry

    lines = ["\nregistered models (--model), presets (--preset) and config fields (--config=field=value):"]
    for name in registry.list_models():
        spec = registry.get_spec(name)
        lines.append(f"  {name}: {spec.description}")
        lines.append(f"    presets: {', '.join(sorted(spec.presets))}")
        fields = [f"{f.name}: {getattr(f.type, '__name__', f.type)} = {f.default!r}"
                  for f in dataclasses.fields(spec.config_class)]
        lines.append("    fields: " + "; ".join(fields))
    return "\n".join(lines) + "\n"
