"""Fuzzing the parsers that read outside input (docs/fuzzing.md): one target per parser in
:mod:`fuzz.targets`, the verdict on one input in :mod:`fuzz.verdict`, the atheris worker in
``fuzz/worker.py`` and the table in ``fuzz/run.py``."""
