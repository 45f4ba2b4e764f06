"""Everything physical: device meshes, logical → mesh axis rules, sharded state, expert
parallelism, memory plans. The model (dsv3_jax) names logical axes only and never builds a mesh.

  mesh.py             mesh from config.mesh (Auto axes, one -1 size), batch placement, multi-host
  rules.py            layouts dp / fsdp / zero1: logical axis → mesh axes, divisibility errors
  state.py            shardings of parameters and TrainStates, sharded init, tracing under a mesh
  expert_parallel.py  shard_map + all_to_all dispatch/combine (called by dsv3_jax.moe)
  plan.py             per-device bytes from abstract shapes: python -m sharding.plan
  collectives.py      collective kinds/bytes per step from compiled HLO

Submodules are imported explicitly (`from sharding import mesh`), so importing one does not pull
in the model.
"""
