"""Default configuration files shipped with the package (read with :mod:`importlib.resources`)."""
