"""How a run is made and kept: the noun (`Run`), its training record, and every way a run comes to exist.

- record: what every optimizer step trained on (batches, hyperparameters, per-example losses), written as training goes;
- threads: small models train on one CPU thread;
- run: `Run` (specs, recipe, trajectory, checkpoints, the training function that made it) and `load_run`;
- recorder: a user's own PyTorch loop recorded as a run (`Recorder`);
- session: a training loop written as a function of a `TrainingSession`, which tdx can call again;
- training: tdx's own trainer as a training function, `record_run`, `train`, and `retrain` (the one way to train a run again);
- replay_engine: the recorded run as a differentiable function (exact replay, metagradients);
- capabilities: what a run supports (retraining, order-keeping retrains, replay), asked before a button is offered;
- importing: finished checkpoints made a run (`tdx import`);
- demo: the demo workspace's runs.
"""

LAYERS = (("record", "threads"), ("run",), ("recorder",), ("session",), ("training",), ("replay_engine",),
          ("capabilities", "importing", "demo"), ("",))
"""This package's modules bottom up ("" is this __init__): each imports only from lower ones here (tests/test_project.py)."""
