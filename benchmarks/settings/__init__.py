"""One settings module per package under test; both share :mod:`benchmarks.settings.base`."""
