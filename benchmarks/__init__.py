"""Side-by-side benchmarks of spark_decl and django-spark 0.3.0 (issue 3, item 6).

Run ``make bench`` (or ``python3.11 benchmarks/run.py``); see ``benchmarks/README.md``.
"""
