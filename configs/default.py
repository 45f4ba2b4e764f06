r"""The run `python train.py` does with no flags: about 10 minutes on a 2-core CPU.

  python train.py                         # workdir runs/default
  python -m dsv3_jax.sample --workdir=runs/default --prompt="def "
  python train.py --workdir=runs/byte --config.data.tokenizer=byte   # the byte tokenizer

The small preset's architecture (MLA with q/kv compression, 1 dense + MoE layers with a shared
expert and group-limited sigmoid routing, YaRN, one MTP module) narrowed to what two CPU cores
train in minutes: width 192, 4 layers, 16 experts of which 2 are active. Tokens: a byte-level
BPE of 4,096 ids trained on the training split at start (seconds; WORKDIR/tokenizer.json), about
3.6 bytes per token on the held-out files; the model's vocabulary is sized from it
(model.vocab_size=0). The preset itself (52M parameters, 10.8M activated) runs at ~600 tokens/s
on two cores; this one (5.1M parameters, 2.7M activated) at 2,500-2,850 tokens/s: 300 steps of
16 × 256 tokens in about 9 minutes with start-up and evaluations.

Measured (CPython 3.11 stdlib, 16 of 734 files held out: 122,029 bytes, 34,261 BPE tokens):
held-out 1.589 bits/byte after 300 steps (1.2M tokens, ~4.4M bytes); xz -9e reaches 1.906 on the
same held-out bytes. Three runs, bit-identical: 9.1 min wall on 2 cores with little else running
(2,510 tokens/s on average), 11.0 and 11.5 min shared with other jobs (load 2-5 for most of
it). At step 100 1.972, at 200 1.676. The byte tokenizer (the previous default: 500 steps, the
same model with a 384-id vocabulary) reached 2.15 in ~9.5 min.
Tried and worse: bpe:2048 at equal CPU (train-loss bits/byte ~2.14 at step 80 of 149 against
bpe:4096's ~1.97 at step 60 of 120, the same cost); with the byte tokenizer, learning_rate 1e-2
with bias_update_rate 1e-2 (2.70 vs 2.52 bits/byte at step 300), batch 8 at learning_rate 1e-2.
"""

from dsv3_jax.training.run_config import base_config


def get_config():
    c = base_config("small")
    c.model.update(dict(
        hidden_size=192, intermediate_size=512, moe_intermediate_size=96, num_hidden_layers=4,
        num_attention_heads=4, q_lora_rank=96, kv_lora_rank=64, n_routed_experts=16,
        num_experts_per_tok=2, n_group=4, topk_group=2, expert_block_size=64))
    c.model.vocab_size = 0  # from data.tokenizer: 4,096
    c.data.tokenizer = "bpe:4096"
    c.steps = 300
    c.batch_size = 16
    c.seq_len = 256
    c.learning_rate = 5e-3
    c.warmup_steps = 30
    c.log_every = 25
    c.eval_every = 100
    c.eval_batches = 8
    c.final_eval_batches = 0  # the whole held-out split
    c.checkpoint_every = 100
    return c
