"""Run configuration: the ConfigDict every `configs/*.py` file starts from, and its checks.

`base_config(preset)` holds every field train.py reads, with defaults; a config file changes a
few. `config.model` is a ConfigDict of `ModelConfig` fields filled from a preset, so any
architecture field can be overridden from the command line (`--config.model.num_hidden_layers=4`);
`model_config()` turns it back into a validated `ModelConfig`; `model.vocab_size=0` sizes the
vocabulary from `data.tokenizer` (its ids, padded to a multiple of 128). All input checks that
can run before compilation live here and raise `ConfigError` with a one-line message naming the
field.
"""

from __future__ import annotations

import dataclasses
import difflib
import glob
import importlib.util
import math
import os

import jax
import ml_collections
from ml_collections import config_dict

from dsv3_jax.config import ModelConfig, YarnScaling
from dsv3_jax.training import tokenizer as tokenizer_lib
from sharding import mesh as mesh_lib
from sharding import pipeline, rules
from sharding.pipeline import stages

MESH_AXES = mesh_lib.AXES  # data, fsdp, expert, tensor, pipe
_SCALAR_TYPES = {"int": int, "float": float}


class ConfigError(ValueError):
    """Bad input detected before compilation: train.py prints it on one line, exit status 2."""


def model_fields(preset: str) -> ml_collections.ConfigDict:
    """A ConfigDict of every ModelConfig field, filled from `ModelConfig.preset(preset)`."""
    model = ModelConfig.preset(preset)
    fields = {}
    for f in dataclasses.fields(ModelConfig):
        value = getattr(model, f.name)
        base, _, nullable = str(f.type).partition(" | ")
        if nullable == "None" and base in _SCALAR_TYPES:
            # A typed reference keeps an optional field overridable from flags even when None.
            value = config_dict.FieldReference(value, field_type=_SCALAR_TYPES[base])
        elif isinstance(value, YarnScaling):
            value = ml_collections.ConfigDict(dataclasses.asdict(value))
        fields[f.name] = value
    return ml_collections.ConfigDict(fields)


def base_config(preset: str) -> ml_collections.ConfigDict:
    """Every run field with its default; `configs/*.py` files adjust a few."""
    c = ml_collections.ConfigDict()
    c.steps = 1000
    c.batch_size = 16  # global batch, in sequences
    c.seq_len = 256
    c.seed = 0
    # Optimizer: AdamW, linear warm-up then cosine decay to end_lr_ratio · learning_rate.
    c.learning_rate = 3e-3
    c.end_lr_ratio = 0.1
    c.warmup_steps = 50
    c.weight_decay = 0.1  # matrices only
    c.adam_b1 = 0.9
    c.adam_b2 = 0.95
    c.grad_clip_norm = 1.0
    # DeepSeek-V3 losses and balancing.
    c.mtp_loss_weight = 0.3  # λ
    c.balance_loss_alpha = 1e-4  # α
    c.bias_update_rate = 1e-3  # γ of the sign rule
    # Logging, evaluation, checkpoints.
    c.log_every = 10
    c.eval_every = 200
    c.eval_batches = 8  # batches per periodic evaluation (0: the whole held-out split)
    c.final_eval_batches = 0  # the final evaluation (0: the whole held-out split)
    c.checkpoint_every = 200
    c.keep_checkpoints = 3
    c.stop_after = 0  # >0: stop (and checkpoint) after this step; the schedule still uses steps
    c.peak_flops_per_device = 0.0  # for MFU; 0: look the device up (unknown → MFU not logged)
    c.model = model_fields(preset)
    c.data = ml_collections.ConfigDict(dict(
        source="stdlib",  # "stdlib", a text-file glob, or a .npy/.bin token file
        # "byte", "bpe:N" (a byte-level BPE of N ids trained on the training split, cached in
        # the workdir) or a path to a Hugging Face tokenizer.json
        tokenizer="byte",
        heldout_fraction=0.02,
        heldout_max_tokens=1 << 20,  # token files: cap on the held-out tail
        token_dtype="uint16",  # .bin token files
    ))
    # Device mesh sizes (one may be -1) and the sharding layout (sharding/rules.py: dp, fsdp,
    # zero1). Expert parallelism switches on with mesh.expert > 1.
    c.mesh = ml_collections.ConfigDict({**{axis: 1 for axis in MESH_AXES}, "layout": "fsdp"})
    # Pipeline parallelism (mesh.pipe > 1; sharding/pipeline): the schedule, the micro-batches
    # per step (each batch_size / microbatches sequences) and, optionally, the decoder layers
    # of each stage (None: the balanced split of sharding.pipeline.stages.split_layers).
    c.pipeline = ml_collections.ConfigDict(dict(
        schedule="1f1b", microbatches=0,
        layers_per_stage=config_dict.placeholder(tuple)))
    return c


def tokenizer_vocab(config: ml_collections.ConfigDict):
    """What `config.data.tokenizer` names, as far as is known before training (a "bpe:N" spec
    is N ids): `.name`, `.vocab_size`, `.padded_vocab_size`. ConfigError for a bad spec."""
    try:
        return tokenizer_lib.spec_vocab(config.data.tokenizer)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def model_config(config: ml_collections.ConfigDict) -> ModelConfig:
    """The validated ModelConfig of `config.model` (vocab_size 0: the tokenizer's padded vocab);
    ConfigError on an invalid field."""
    fields = config.model.to_dict()
    if fields.get("vocab_size") == 0:
        fields["vocab_size"] = tokenizer_vocab(config).padded_vocab_size
    try:
        return ModelConfig.from_dict(fields)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config.model: {e}") from None


def _positive_int(config, name):
    value = config[name]
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"config.{name}={value!r} is invalid: must be a positive integer")


def check_run(config: ml_collections.ConfigDict) -> None:
    """Checks the run fields (not the model, data or mesh)."""
    for name in ("steps", "batch_size", "seq_len", "log_every", "eval_every",
                 "checkpoint_every", "keep_checkpoints"):
        _positive_int(config, name)
    for name in ("warmup_steps", "stop_after", "eval_batches", "final_eval_batches"):
        if not isinstance(config[name], int) or config[name] < 0:
            raise ConfigError(f"config.{name}={config[name]!r} is invalid: must be an integer "
                              ">= 0")
    for name in ("learning_rate", "grad_clip_norm"):
        if not (config[name] > 0 and math.isfinite(config[name])):
            raise ConfigError(f"config.{name}={config[name]!r} is invalid: must be > 0")
    for name in ("weight_decay", "mtp_loss_weight", "balance_loss_alpha", "bias_update_rate",
                 "end_lr_ratio"):
        if not config[name] >= 0:
            raise ConfigError(f"config.{name}={config[name]!r} is invalid: must be >= 0")
    if not 0.0 < config.data.heldout_fraction < 1.0:
        raise ConfigError(f"config.data.heldout_fraction={config.data.heldout_fraction!r} is "
                          "invalid: must be in (0, 1)")
    if (tokenizer_vocab(config).name.startswith("bpe:")
            and config.data.source.endswith((".npy", ".bin"))):
        raise ConfigError(f"data.tokenizer={config.data.tokenizer!r} trains on text, but "
                          f"data.source={config.data.source!r} is a token file; use "
                          "data.tokenizer='byte' or the tokenizer.json that made the file")


def check_model_fits(config: ml_collections.ConfigDict, model: ModelConfig, tokenizer) -> None:
    """seq_len within the model's positions; the tokenizer's ids within its vocabulary."""
    if config.seq_len > model.max_position_embeddings:
        raise ConfigError(f"config.seq_len={config.seq_len} exceeds the model's "
                          f"max_position_embeddings={model.max_position_embeddings}")
    if tokenizer.vocab_size > model.vocab_size:
        raise ConfigError(f"data.tokenizer {tokenizer.name!r} has {tokenizer.vocab_size} tokens, "
                          f"more than config.model.vocab_size={model.vocab_size} (use "
                          f"--config.model.vocab_size={tokenizer.padded_vocab_size}, or 0 to "
                          "size it from the tokenizer)")


def check_same_tokenizer(config: ml_collections.ConfigDict, workdir: str,
                         saved: ml_collections.ConfigDict | None) -> None:
    """A workdir's checkpoints and cached BPE belong to one tokenizer: ConfigError when `saved`
    (the workdir's config.json) names another tokenizer or, for "bpe:N", other training data."""
    if saved is None or "data" not in saved:
        return
    fields = ["tokenizer"]
    if config.data.tokenizer.startswith("bpe:"):
        fields += ["source", "heldout_fraction"]  # what the cached BPE was trained on
    for name in fields:
        if saved.data.get(name) != config.data[name]:
            raise ConfigError(f"workdir {workdir!r} was trained with data.{name}="
                              f"{saved.data.get(name)!r}, not {config.data[name]!r}; use that "
                              "or a new --workdir")


def device_memory_bytes(device) -> int | None:
    """What one device may hold: its allocator's limit (TPU, GPU), or for CPU devices (emulated
    ones share the host) the host's physical memory over the local CPU devices; None unknown."""
    stats = device.memory_stats() or {}
    if "bytes_limit" in stats:
        return int(stats["bytes_limit"])
    if device.platform == "cpu" and hasattr(os, "sysconf"):
        try:
            ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError):
            return None
        return ram // len(jax.local_devices(backend="cpu"))
    return None


def check_state_fits(abstract_state, device, limit: int | None = None) -> None:
    """The sharded train state and one set of gradients fit in one device's memory (`limit`,
    default `device_memory_bytes`); ConfigError otherwise, before anything is allocated (a
    too-large model or vocabulary fails here, not as an allocator error inside the first step).
    `abstract_state` is a TrainState of ShapeDtypeStructs carrying their shardings; a leaf's
    bytes per device are those of its shard. Activations come on top: passing is necessary,
    not sufficient."""
    limit = device_memory_bytes(device) if limit is None else limit
    if limit is None:
        return

    def per_device(tree) -> int:
        def shard(leaf):  # a leaf without a sharding is whole on every device
            sharding = getattr(leaf, "sharding", None)
            return leaf.shape if sharding is None else sharding.shard_shape(leaf.shape)

        return sum(math.prod(shard(leaf)) * leaf.dtype.itemsize
                   for leaf in jax.tree.leaves(tree))

    need = per_device(abstract_state) + per_device(abstract_state.params)  # + gradients
    if need > limit:
        gib = 2 ** 30
        raise ConfigError(
            f"the train state and its gradients need {need / gib:.1f} GiB per device, more "
            f"than the {limit / gib:.1f} GiB a {device.platform} device has here: use a smaller "
            "config.model (layers, vocab_size, data.tokenizer bpe:N), or split the state over "
            "more devices (config.mesh.fsdp, expert, tensor)")


def check_mesh(config: ml_collections.ConfigDict, num_devices: int,
               model: ModelConfig | None = None) -> None:
    """The mesh covers the devices (one size may be -1), names a known layout, and splits the
    model and the batch evenly (`sharding.mesh`, `sharding.rules`)."""
    unknown = set(config.mesh.keys()) - set(MESH_AXES) - {"layout"}
    if unknown:
        raise ConfigError(f"config.mesh has unknown fields {sorted(unknown)}; allowed: "
                          f"{MESH_AXES} and layout")
    sizes = {axis: config.mesh[axis] for axis in MESH_AXES}
    try:
        shape = mesh_lib.mesh_shape(sizes, num_devices)
        rules.get_layout(config.mesh.layout)
        if model is not None:
            rules.check_model_fits(model, shape)
    except ValueError as e:
        raise ConfigError(f"config.mesh: {e}") from None
    shards = math.prod(shape[a] for a in mesh_lib.BATCH_AXES)
    if config.batch_size % shards:
        raise ConfigError(f"config.batch_size={config.batch_size} must be divisible by the "
                          f"{shards} batch shards of config.mesh (data x fsdp x expert)")
    if shape["pipe"] > 1:
        pipeline_plan(config, shape["pipe"], model, shards)


def pipeline_microbatches(config: ml_collections.ConfigDict, pipe: int) -> int:
    """config.pipeline.microbatches, or its default 2·pipe when 0."""
    m = config.pipeline.microbatches
    if not isinstance(m, int) or isinstance(m, bool) or m < 0:
        raise ConfigError(f"config.pipeline.microbatches={m!r} is invalid: must be an integer "
                          ">= 0 (0: 2 x mesh.pipe)")
    return m or 2 * pipe


def pipeline_plan(config: ml_collections.ConfigDict, pipe: int, model: ModelConfig | None,
                  batch_shards: int = 1):
    """The validated (schedule, stage plan) of a run with mesh.pipe = `pipe` > 1 (the plan is
    None without a model); ConfigError naming the field otherwise."""
    unknown = set(config.pipeline.keys()) - {"schedule", "microbatches", "layers_per_stage"}
    if unknown:
        raise ConfigError(f"config.pipeline has unknown fields {sorted(unknown)}; allowed: "
                          "schedule, microbatches, layers_per_stage")
    m = pipeline_microbatches(config, pipe)
    try:
        sched = pipeline.schedule(config.pipeline.schedule, pipe, m)
        pipeline.validate(sched)
    except ValueError as e:
        raise ConfigError(f"config.pipeline: {e}") from None
    if config.batch_size % (m * batch_shards):
        raise ConfigError(f"config.batch_size={config.batch_size} must be divisible by "
                          f"config.pipeline.microbatches={m} x the {batch_shards} batch shards "
                          "(each micro-batch is split over data x fsdp x expert)")
    if model is None:
        return sched, None
    if model.fp8 == "delayed":
        raise ConfigError("config.model.fp8='delayed' is not supported with mesh.pipe > 1 (its "
                          "scaling state is per step, a pipeline runs the step in micro-batches);"
                          " use fp8='blockwise' or 'none'")
    layers = config.pipeline.layers_per_stage
    try:
        plan = stages.plan_stages(model, sched.num_stages,
                                  None if layers is None else tuple(layers))
    except ValueError as e:
        raise ConfigError(f"config.{e}") from None
    return sched, plan


def load_config_file(path: str) -> ml_collections.ConfigDict:
    """`get_config()` of a config file, as config_flags loads it ("file.py:arg" allowed)."""
    path, _, arg = path.partition(":")
    spec = importlib.util.spec_from_file_location("_run_config_file", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


def config_file_arg(argv: list[str], default_file: str) -> str:
    """The config file a command line names (the last `--config=`/`--config FILE`), else the
    default."""
    config_file = default_file
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            config_file = arg.partition("=")[2]
        elif arg == "--config" and i + 1 < len(argv):
            config_file = argv[i + 1]
    return config_file


def check_config_file(path: str, configs_dir: str) -> None:
    """ConfigError naming `path` (and the config files there are) unless it loads.

    `path` may carry config_flags' ":arg" suffix; relative paths are relative to the current
    directory, as config_flags reads them.
    """
    file = path.partition(":")[0]
    if not os.path.isfile(file):
        available = []
        for candidate in sorted(glob.glob(os.path.join(configs_dir, "*.py"))):
            rel = os.path.relpath(candidate)
            available.append(candidate if rel.startswith("..") else rel)
        what = "is not a file" if os.path.exists(file) else "does not exist"
        raise ConfigError(f"config file {file!r} {what}; available: {', '.join(available)}")
    try:
        load_config_file(path)
    except Exception as e:  # anything a config file can raise
        lines = str(e).strip().splitlines()
        raise ConfigError(f"config file {file!r} failed to load: {type(e).__name__}"
                          f"{': ' + lines[0] if lines else ''}") from None


def unknown_field_message(path: list[str], node) -> str:
    """'unknown config field …; did you mean …? (fields of …: …)' for `path`, whose last key
    is missing from `node` (the ConfigDict at `path[:-1]`)."""
    where = "config" + "".join("." + k for k in path[:-1])
    if not isinstance(node, ml_collections.ConfigDict):
        return (f"unknown config field {'config.' + '.'.join(path)!r} ({where} is "
                f"{type(node).__name__}, not a ConfigDict)")
    close = difflib.get_close_matches(path[-1], list(node.keys()), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return (f"unknown config field {'config.' + '.'.join(path)!r}{hint} (fields of {where}: "
            f"{', '.join(sorted(node.keys()))})")


def describe_override_error(error: Exception, argv: list[str], default_file: str) -> str:
    """One line for a failed flag parse, naming an unknown `--config.…` field if that was it
    (with the closest known field)."""
    try:
        config = load_config_file(config_file_arg(argv, default_file))
    except Exception:  # the config file itself is broken: absl's message says how
        config = None
    for arg in argv:
        if not arg.startswith("--config.") or config is None:
            continue
        path = arg[2:].partition("=")[0].split(".")[1:]
        node = config
        for i, key in enumerate(path):
            if not isinstance(node, ml_collections.ConfigDict) or key not in node:
                return unknown_field_message(path[:i + 1], node)
            node = node[key]
    message = str(error).strip().splitlines()
    return message[0] if message else type(error).__name__
