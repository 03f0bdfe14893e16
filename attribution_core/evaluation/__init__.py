"""Checks and rankings built on the front door: how good the scores are, and which labels look wrong.

- lds: the linear datamodeling score against retraining on random subsets (reshuffled or order-keeping);
- counterfactual: remove a query's top proponents, retrain, watch its margin move;
- smoothness: whether first-order predictions hold for a run at all (random removals replayed);
- dynamics: per-example signals of the training record (early loss, AUM, forgetting, data maps);
- mislabel: rankings of the training set by how suspicious each label is.
"""

LAYERS = (("dynamics",), ("counterfactual",), ("*",), ("",))
"""This package's modules bottom up ("*": every module not named; "" is this __init__): each imports only from lower ones."""
