"""Everything physical: device meshes, logical → mesh axis rules, placement of state, expert
parallelism, memory plans, TPU compiles. A placement library: it knows nothing of training, and
the model (dsv3_jax) names logical axes only, never builds a mesh and never imports it.

  mesh.py             mesh from config.mesh (Auto axes, one -1 size), batch placement, multi-host
  rules.py            layouts dp / fsdp / zero1: logical axis → mesh axes, divisibility errors
  placement.py        shardings of parameters and states, sharded init, tracing under a mesh
                      (`use_mesh` hands the expert-parallel strategy down to the model)
  expert_parallel.py  shard_map + all_to_all dispatch/combine of tokens to their experts
  plan.py             per-device bytes from abstract shapes; python -m sharding.plan
  tpu.py              TPU topologies without a TPU; memory/FLOPs/roofline of a compiled program
  hlo_stats.py        collectives and matmul FLOPs of compiled HLO, loop trip counts applied
  aot.py              python -m sharding.aot: an entry point composing train.py's step
                      (dsv3_jax.training) with tpu.py; nothing here imports it

Submodules are imported explicitly (`from sharding import mesh`), so importing one does not pull
in the model.
"""
