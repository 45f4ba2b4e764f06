"""The training job's logic (train.py is its linear story): run config, data, state, step,
checkpoints, metrics, graceful stop."""
