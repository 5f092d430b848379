"""Ray Job entry points (one file per experiment); ``_support`` is their shared body."""
