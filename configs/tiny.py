r"""The tiny preset: every code path (dense + MoE layers, q_lora, group-limited routing, YaRN,
MTP) in a model that trains in about a minute on a laptop CPU.

  python train.py --config=configs/tiny.py --workdir=runs/tiny
  python train.py --config=configs/tiny.py --workdir=runs/tiny4 --config.steps=50 \
      --config.model.num_hidden_layers=4
"""

from dsv3_jax.training.run_config import base_config


def get_config():
    c = base_config("tiny")
    c.steps = 200
    c.batch_size = 8
    c.seq_len = 128
    c.learning_rate = 3e-3
    c.warmup_steps = 20
    c.log_every = 10
    c.eval_every = 100
    c.eval_batches = 4
    c.final_eval_batches = 16
    c.checkpoint_every = 100
    return c
