"""How a run is made and kept: the noun (`Run`), its training record, and every way a run comes to exist.

- record: what every optimizer step trained on (batches, hyperparameters, per-example losses), written as training goes;
- run: `Run` (specs, recipe, trajectory, checkpoints) and `load_run`;
- training: tdx's own trainer (`train`, `fit_model`, `retrain`);
- recorder: a user's own PyTorch loop recorded as a run (`Recorder`);
- replay_engine: the recorded run as a differentiable function (exact replay, metagradients, order-keeping retrains);
- importing: finished checkpoints made a run (`tdx import`);
- demo: the demo workspace's runs.
"""

LAYERS = (("record",), ("run",), ("training",), ("replay_engine", "recorder"), ("importing", "demo"), ("",))
"""This package's modules bottom up ("" is this __init__): each imports only from lower ones here (tests/test_project.py)."""
