"""From flags to a better model: a cleaning plan, its predicted effect, the run retrained with it, and the cleaned data.

- plan: which examples to relabel, remove or keep, made from the run's flags and a ranking's top k, edited and stored;
- predict: each test margin's predicted change under the plan, from a method's stored scores (before any retraining);
- export: the cleaned data set as an npz or an image folder, with the plan beside it;
- experiment: the run retrained with the plan and with a random control of the same size, over seeds, and the cleaned
  data kept as a new run;
- command: `tdx clean RUN`.
"""

LAYERS = (("plan",), ("predict", "export"), ("experiment",), ("command",), ("",))
"""This package's modules bottom up ("" is this __init__): each imports only from lower ones here (tests/test_project.py)."""
