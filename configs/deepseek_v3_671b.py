r"""DeepSeek-V3 671B with the paper's pre-training hyperparameters (arXiv 2412.19437 §4.2).

Not runnable on one machine: it needs the sharding package's meshes, e.g. (plan only)
  python -m sharding.plan --config=configs/deepseek_v3_671b.py --config.mesh.expert=64
and on a cluster
  python train.py --config=configs/deepseek_v3_671b.py --workdir=gs://… \
      --config.data.source=/data/tokens.bin --config.data.tokenizer=/data/tokenizer.json \
      --config.mesh.expert=64 --config.mesh.fsdp=-1

The paper's batch grows from 3072 to 15360 sequences over the first 469B tokens; a fixed
batch of 15360 is used here. MTP weight λ is 0.3 for the first 10T tokens, then 0.1; γ is 0.001,
then 0 for the last 500B tokens.
"""

from dsv3_jax.training.run_config import base_config


def get_config():
    c = base_config("deepseek-v3-671b")
    c.seq_len = 4096
    c.batch_size = 15360
    c.steps = 14_800_000_000_000 // (15360 * 4096)  # 14.8T tokens
    c.learning_rate = 2.2e-4
    c.end_lr_ratio = 2.2e-5 / 2.2e-4
    c.warmup_steps = 2000
    c.weight_decay = 0.1
    c.mtp_loss_weight = 0.3
    c.bias_update_rate = 1e-3
    c.balance_loss_alpha = 1e-4
    c.log_every = 10
    c.eval_every = 1000
    c.checkpoint_every = 1000
    c.data.source = "tokens.bin"  # pre-tokenized corpus (uint32 ids for the 129K vocab)
    c.data.token_dtype = "uint32"
    return c
