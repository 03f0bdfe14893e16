"""Examples of tda-explorer used from your own code (a regular package, so that examples.own_training_loop is found here
before a namespace of the same name; kronfluence installs a top-level `examples` package of its own)."""
