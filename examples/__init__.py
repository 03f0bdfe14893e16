"""Examples of tda-explorer used from your own code.

A regular package (not a namespace one), so that `examples.own_training_loop`, the import path the example's runs
name, is found in this repository wherever it comes first on the path: a namespace package loses to any regular package
of the same name, and kronfluence installs a top-level `examples` package of its own.
"""
