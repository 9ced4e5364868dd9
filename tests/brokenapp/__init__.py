"""An app whose ``spark.py`` registers a handler, then fails to import (test_registry)."""
