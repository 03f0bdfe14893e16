"""Long work as jobs: a queue in the workspace (queue.py), what each kind computes (kinds.py), the workers that
run them beside the app (worker.py), and what the first pages need, queued when a run is trained (ready.py).

The app submits a job instead of computing in a page, shows its progress, and reads the stored
result once the job is done; `tdx jobs` lists and runs the queue from the command line.
"""

LAYERS = (("queue",), ("kinds",), ("ready",), ("worker",), ("",))
"""This package's modules bottom up ("" is this __init__): each imports only from lower ones here (tests/test_project.py)."""
