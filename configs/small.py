r"""The small preset (~60M parameters, ~12M activated) on the standard-library corpus.

  python train.py --config=configs/small.py --workdir=runs/small
"""

from dsv3_jax.training.run_config import base_config


def get_config():
    c = base_config("small")
    c.steps = 2000
    c.batch_size = 16
    c.seq_len = 256
    c.learning_rate = 3e-3
    c.warmup_steps = 100
    c.log_every = 10
    c.eval_every = 250
    c.eval_batches = 8
    c.checkpoint_every = 250
    return c
