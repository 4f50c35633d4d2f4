"""pytest plugin (entry point ``nitro_harness``): fixtures, markers and YAML scenario items.

Filled in by the scenario/plugin work; kept importable so installing the package never breaks
pytest.
"""
