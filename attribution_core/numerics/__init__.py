"""The numerical machinery the methods share, in one place: nothing here knows a run, a method or a page.

- inputs: `AttributionInputs` (what every method receives: models, training data, task, chunking) and `batches`;
- linalg: a damped inverse of a symmetric curvature or Gram matrix;
- segments: SOURCE's plan of segments over checkpoints, and each optimizer step's weight (η / (1 − momentum));
- gradients: per-layer capture of activations and output gradients (per-example gradients as outer products);
- projection: projectors of per-example gradients (dense, Kronecker-factored per layer);
- projected_gradients: a data set's projected gradients (N, k), chunk by chunk, sharded over ranks;
- curvature: K-FAC / EK-FAC factors and the streamed products of preconditioned gradients.
"""

LAYERS = (("inputs", "linalg", "segments", "gradients"), ("projection",), ("projected_gradients",), ("curvature",), ("",))
"""This package's modules bottom up ("" is this __init__): each imports only from lower ones here (tests/test_project.py)."""
