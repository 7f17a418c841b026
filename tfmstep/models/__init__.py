"""The built-in model families, one module or folder each (registered through the ``tfmstep.families``
entry points in setup.cfg)."""
