"""Command-line programs (thin absl mains; the work is in the library)."""

import contextlib
import os
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


def _verbose() -> bool:
    return any(a.startswith(("--verbosity", "-verbosity", "--v=", "-v=")) for a in sys.argv[1:])


class _QuietImport:
    """Meta-path finder: TensorFlow's C++ start-up lines (oneDNN, CUDA probing, absl's "before
    InitializeLog" warning) are written to file descriptor 2 while ``import tensorflow`` runs, which no
    log level setting stops in TF 2.21; so that one import runs with fd 2 sent to a temporary file, which is
    replayed if the import fails. Installed by this package (every tool imports it first) unless
    ``--verbosity`` is given."""

    def find_spec(self, name, path=None, target=None):
        if name != "tensorflow":
            return None
        sys.meta_path.remove(self)
        import importlib.util

        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        loader_exec = spec.loader.exec_module

        def exec_module(module):
            import tempfile

            sys.stderr.flush()
            saved = os.dup(2)
            with tempfile.TemporaryFile() as captured:
                os.dup2(captured.fileno(), 2)
                try:
                    loader_exec(module)
                except BaseException:
                    os.dup2(saved, 2)
                    captured.seek(0)
                    sys.stderr.write(captured.read().decode(errors="replace"))
                    raise
                finally:
                    os.dup2(saved, 2)
                    os.close(saved)

        spec.loader.exec_module = exec_module
        return spec


if "tensorflow" not in sys.modules and not _verbose():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TF's later C++ info lines
    sys.meta_path.insert(0, _QuietImport())


_LIBRARY_DIRS = (f"{os.sep}tensorflow{os.sep}", f"{os.sep}keras{os.sep}", f"{os.sep}tf_keras{os.sep}")


def _no_library_info(record) -> bool:
    """Log filter: INFO records from TensorFlow's or Keras' own modules are dropped; warnings stay."""
    return record.levelno >= 30 or not any(d in record.pathname for d in _LIBRARY_DIRS)


HELP_FLAGS = ("--help", "-help", "-h", "--helpshort", "-helpshort", "--helpfull", "-helpfull", "-?")


def run_program(main, module_name: str, extra_help="") -> None:
    """``app.run(main)`` for the program defined in ``module_name``, so that ``--help`` shows that
    module's docstring and flags (absl shows those of ``__main__``, which is a tools/ shim or a console-
    script wrapper here, so it would print only "Try --helpfull"), and a flag absl refuses (a missing
    required flag, a bad value) is one ``error:`` line with exit code 2 rather than absl's FATAL + exit 1.
    ``extra_help``: text, or a function computing it (called only for --help: it may import TensorFlow).
"""
    from absl import app, flags

    if not _verbose():  # TF's own INFO lines (checkpoint sharding, ...) would drown the progress lines
        import logging as python_logging

        python_logging.getLogger("tensorflow").setLevel(python_logging.WARNING)
        logging.get_absl_handler().addFilter(_no_library_info)  # TF modules also log through absl
    program = sys.modules[module_name]
    if callable(extra_help):
        extra_help = extra_help() if any(a in HELP_FLAGS for a in sys.argv[1:]) else ""
    sys.modules["__main__"].__doc__ = (program.__doc__ or "") + extra_help
    for flag in flags.FLAGS.get_flags_for_module(module_name):
        flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)

    def parse(argv):
        try:
            return flags.FLAGS(argv)
        except flags.Error as e:
            print(f"error: {e} (see --help)", file=sys.stderr)
            sys.exit(2)

    try:
        app.run(main, flags_parser=parse)
    except SystemExit as e:
        if e.code == 1 and any(a in HELP_FLAGS for a in sys.argv[1:]):
            sys.exit(0)  # absl ends --help with exit code 1; asking for help is not a failure
        raise


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
