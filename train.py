r"""Trains a DeepSeek-V3-style model end to end: data, AdamW, MTP, aux-loss-free balancing,
checkpoints, evaluation, metrics.

  python train.py                                   # configs/default.py: ~10 min on a 2-core CPU
  python train.py --workdir=runs/tiny --config=configs/tiny.py --config.steps=200 \
      --config.model.num_hidden_layers=4            # any config field from the command line
  python -m dsv3_jax.sample --workdir=runs/default --prompt="def "

A workdir holding checkpoints is resumed from its latest one; a finished one says so and exits
0. SIGTERM or Ctrl-C finishes the current step (or start-up stage: nothing is interrupted
inside a compile), saves and exits with status 128 + the signal (130 for Ctrl-C, 143 for
SIGTERM), so `train.py && …` stops there; run the same command again to continue. A second
signal exits at once, keeping the latest complete checkpoint. Bad input (unknown config field
or file, mesh/device mismatch, a model the mesh cannot split, empty data glob, seq_len beyond
the model's positions, a malformed data.tokenizer, a tokenizer larger than the vocabulary, a
workdir of a different model or tokenizer) stops with a one-line error and exit status 2 before
anything is compiled or written. `data.tokenizer="bpe:N"` trains a byte-level BPE on the
training split at start and keeps it in WORKDIR/tokenizer.json for resuming and sampling.

The logic lives in `dsv3_jax/training/`; this file is the linear story of one run.
"""

import os
import signal
import sys

_PROG = "train.py"
# Until main() installs the real handler (dsv3_jax.training.signals): record, never raise. A
# KeyboardInterrupt inside a compile or under orbax's threads ended in a segfault.
_EARLY_SIGNALS: list[int] = []
if __name__ == "__main__":
    for _sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(_sig, lambda signum, frame: _EARLY_SIGNALS.append(signum))


def _emulate_cpu_devices(argv: list[str]) -> None:
    """--cpu_devices=N: N emulated CPU devices. XLA reads this when jax starts, so it is
    handled here, before anything imports jax (the config files do)."""
    for i, arg in enumerate(argv):
        if arg.startswith("--cpu_devices"):
            value = arg.partition("=")[2] or (argv[i + 1] if i + 1 < len(argv) else "")
            if not value.isdigit() or int(value) < 1:
                print(f"{_PROG}: error: --cpu_devices={value!r}: must be a positive integer",
                      file=sys.stderr)
                sys.exit(2)
            kept = [f for f in os.environ.get("XLA_FLAGS", "").split()
                    if not f.startswith("--xla_force_host_platform_device_count")]
            os.environ["XLA_FLAGS"] = " ".join(
                kept + [f"--xla_force_host_platform_device_count={value}"])
            os.environ["JAX_PLATFORMS"] = "cpu"


_emulate_cpu_devices(sys.argv)

import math  # noqa: E402
import time  # noqa: E402

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from dsv3_jax import cli  # noqa: E402
from dsv3_jax.training import run_config  # noqa: E402

_HERE = os.path.dirname(os.path.abspath(__file__))
_CONFIGS_DIR = os.path.join(_HERE, "configs")
_DEFAULT_CONFIG = os.path.join(_CONFIGS_DIR, "default.py")


def _describe_parse_error(error: Exception, argv: list[str]) -> str:
    return run_config.describe_override_error(error, argv, _DEFAULT_CONFIG)


def _check_config_file(argv: list[str]) -> None:
    run_config.check_config_file(run_config.config_file_arg(argv, _DEFAULT_CONFIG), _CONFIGS_DIR)


try:
    _CONFIG = config_flags.DEFINE_config_file(
        "config", _DEFAULT_CONFIG, "Run config file (configs/*.py).", lock_config=True)
except Exception as e:  # config_flags raises many exception types
    # Without --config, config_flags loads the default file and resolves the --config.…
    # overrides right here, at definition: an unknown field fails before any parser runs.
    cli.fail(_PROG, _describe_parse_error(e, sys.argv))
_WORKDIR = flags.DEFINE_string("workdir", None,
                               "Where checkpoints and metrics go (default: runs/<config name>).")
flags.DEFINE_integer("cpu_devices", None, "Emulate this many CPU devices (sets XLA_FLAGS).")
# Multi-host: every process runs this same command with its own --process_id.
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host runs).")
flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host runs).")
flags.DEFINE_integer("process_id", None, "This process's index (multi-host runs).")


def main(argv):
    del argv
    from dsv3_jax.training.signals import StopRequest

    # First, before anything compiles: a signal only sets a flag, polled below at each stage.
    stop = StopRequest(second_message=lambda name: (
        f"{_PROG}: second {name}: exiting now without saving; the latest complete checkpoint "
        "is kept")).install()
    for signum in _EARLY_SIGNALS:
        stop.record(signum)
    if not flags.FLAGS["verbosity"].present:  # orbax logs every save at INFO; --verbosity=0
        logging.set_verbosity(logging.WARNING)
    import jax
    import jax.numpy as jnp

    from dsv3_jax.accounting import flops_per_token
    from dsv3_jax.training import checkpoint, data, metrics, state, step
    from dsv3_jax.training import tokenizer as tokenizer_lib
    from dsv3_jax.training.placed_step import place_train_step
    from sharding import mesh as mesh_lib
    from sharding import placement

    try:
        config = _CONFIG.value
    except Exception as e:  # the parser loaded it once already: unlikely
        cli.fail(_PROG, f"config file: {cli.first_line(e)}")
    config_name = os.path.splitext(os.path.basename(config_flags.get_config_filename(
        flags.FLAGS["config"])))[0]
    workdir = _WORKDIR.value or os.path.join("runs", config_name)
    t_start = time.time()

    # ---------------- Config and input checks: nothing is compiled or written before ---------
    try:
        mesh_lib.initialize_distributed(flags.FLAGS.coordinator_address,
                                        flags.FLAGS.num_processes, flags.FLAGS.process_id)
        run_config.check_run(config)
        model = run_config.model_config(config)
        config.model.vocab_size = model.vocab_size  # 0 (from the tokenizer) made concrete
        run_config.check_model_fits(config, model, run_config.tokenizer_vocab(config))
        run_config.check_mesh(config, jax.device_count(), model)
        checkpoint.check_workdir(workdir, model)
        bpe_cache = os.path.join(workdir, tokenizer_lib.CACHE_FILE)
        run_config.check_same_tokenizer(config, workdir, checkpoint.load_config(workdir) if (
            checkpoint.saved_steps(workdir) or os.path.isfile(bpe_cache)) else None)
        # Mesh, state shardings (abstract shapes only) and the jitted step, not yet compiled:
        # every parameter or optimizer leaf the mesh cannot split is an error here.
        mesh = mesh_lib.make_mesh({axis: config.mesh[axis] for axis in mesh_lib.AXES})
        try:
            placed = place_train_step(model, config, mesh)  # optimizer, shardings, step
        except ValueError as e:
            raise run_config.ConfigError(f"config.mesh: {e}") from None
        run_config.check_state_fits(placed.abstract_state, jax.local_devices()[0])
        # "bpe:N": trained here on the training split, or the workdir's from a previous start.
        documents = data.read_documents(config.data)
        t_tokenizer = time.perf_counter()
        tokenizer, new_tokenizer = tokenizer_lib.run_tokenizer(
            config.data.tokenizer, workdir,
            lambda: documents.train_texts(config.data.heldout_fraction),
            resuming=bool(checkpoint.saved_steps(workdir)))
        t_tokenizer = time.perf_counter() - t_tokenizer
        corpus = data.load_corpus(config.data, tokenizer, documents)
        train_ds = data.train_dataset(
            corpus.train, seq_len=config.seq_len, global_batch=config.batch_size,
            seed=config.seed, process_index=jax.process_index(),
            process_count=jax.process_count())
    except ValueError as e:  # ConfigError and the data/tokenizer checks
        cli.fail(_PROG, str(e))
    print(f"data: {corpus.description}; {len(corpus.train):,} train tokens, "
          f"{len(corpus.heldout):,} held-out tokens", flush=True)
    if new_tokenizer:
        print(f"tokenizer: {tokenizer.name} trained on the training split in {t_tokenizer:.1f} s "
              f"({tokenizer.vocab_size:,} ids; {1 / corpus.heldout_tokens_per_byte:.2f} held-out "
              f"bytes per token)", flush=True)
    if stop.requested:
        print(f"stopped before starting ({stop.signal_name} received); nothing was written",
              flush=True)
        return stop.exit_status

    # ---------------- Workdir: checkpoints, config beside them, metrics -----------------------
    os.makedirs(workdir, exist_ok=True)
    checkpointer = checkpoint.Checkpointer(workdir, config.keep_checkpoints)
    # Multi-host: process 0 writes the run's metrics; the others log beside them.
    log_dir = workdir if jax.process_index() == 0 else os.path.join(
        workdir, f"process_{jax.process_index()}")
    on_mesh = lambda fn: placement.on_mesh(fn, mesh, config.mesh.layout)

    # ---------------- Train state: restored if the workdir has one, else created -------------
    train_iter = data.train_iterator(train_ds)
    train_state, start_step = checkpointer.restore(
        placed.abstract_state, train_iter, warn=lambda m: print(m, file=sys.stderr))
    finished = (metrics.eval_record(log_dir, start_step)
                if start_step >= config.steps else None)
    if finished is not None:  # nothing to train or evaluate: no compile
        checkpointer.close()
        print(f"already complete at step {start_step} (held-out "
              f"{finished['eval_bits_per_byte']:.3f} bits/byte); raise --config.steps to "
              "continue", flush=True)
        return 0
    if jax.process_index() == 0:  # one writer per run (multi-host: all share the workdir)
        checkpoint.write_config(workdir, config)
        if new_tokenizer:  # a resumed run reads this one back: the same ids
            tokenizer.save(bpe_cache)
    if train_state is not None:
        print(f"model: {model_summary(model)}; resumed from step {start_step}", flush=True)
    elif not stop.requested:  # created shard by shard: no full copy on any one device
        train_state = on_mesh(jax.jit(lambda rng: state.create_state(model, placed.tx, rng),
                                      out_shardings=placed.shardings))(
            jax.random.key(config.seed))
        print(f"model: {model_summary(model)}; starting from scratch", flush=True)
    os.makedirs(log_dir, exist_ok=True)
    writer = metrics.MetricWriter(log_dir, resume_step=start_step)

    # ---------------- Update and evaluation steps --------------------------------------------
    last_step = min(config.steps, config.stop_after or config.steps)
    train_step = None
    if train_state is not None and start_step < last_step and not stop.requested:
        # Compiled here, not on the first call, so a stop during the compile trains nothing.
        batch_shape = jax.ShapeDtypeStruct((config.batch_size, config.seq_len + 1), jnp.int32,
                                           sharding=placed.batch_sharding)
        with placement.use_mesh(mesh, config.mesh.layout):
            train_step = placed.step.lower(train_state, batch_shape).compile()
    eval_step = on_mesh(jax.jit(step.make_eval_step(model)))
    tokens_per_step = config.batch_size * config.seq_len
    model_flops = flops_per_token(model, config.seq_len) * tokens_per_step
    peak = (config.peak_flops_per_device
            or metrics.peak_flops(jax.devices()[0].device_kind)) * jax.device_count()
    xz_bpb = data.xz_bits_per_byte(corpus.heldout_text)

    def evaluate(at_step: int, max_batches: int) -> dict:
        nats, count = jnp.zeros(()), jnp.zeros(())
        for x, mask in data.eval_batches(corpus.heldout, seq_len=config.seq_len,
                                         batch_size=config.batch_size, max_batches=max_batches):
            n, c = eval_step(train_state.params, train_state.moe_bias,
                             mesh_lib.batch_from_global(x, mesh),
                             mesh_lib.batch_from_global(mask, mesh), train_state.fp8)
            nats, count = nats + n, count + c
        loss = float(nats / count)
        return writer.write(at_step, {
            "eval_loss": loss,
            "eval_bits_per_byte": loss / math.log(2) * corpus.heldout_tokens_per_byte,
            "xz_bits_per_byte": xz_bpb, "eval_tokens": int(count)})

    # ---------------- Training loop ---------------------------------------------------------
    progress = metrics.Progress(total=config.steps, initial=start_step)
    throughput = metrics.Throughput()
    current = start_step
    while train_step is not None and current < last_step and not stop.requested:
        batch = next(train_iter)
        train_state, step_metrics = train_step(train_state, mesh_lib.global_batch(batch, mesh))
        current += 1
        # Waits for the step. Non-finite gradients would poison the params even at a finite
        # loss, so both are checked before anything of this step is saved.
        total_loss, grad_norm = map(float, jax.device_get(
            (step_metrics["total_loss"], step_metrics["grad_norm"])))
        if not (math.isfinite(total_loss) and math.isfinite(grad_norm)):
            checkpointer.close()
            writer.close()
            last_good = max(checkpoint.saved_steps(workdir), default=None)
            what = (f"loss ({total_loss})" if not math.isfinite(total_loss)
                    else f"gradient norm ({grad_norm})")
            cli.fail(_PROG, f"non-finite {what} at step {current}; last good checkpoint: "
                     f"{last_good if last_good is not None else 'none'} in {workdir}", status=1)
        progress.update()
        if current == start_step + 1:
            throughput.reset()  # the first step's figures include the data pipeline's start
        else:
            throughput.add(tokens_per_step)
        if current % config.log_every == 0 or current == last_step:
            tok_s = throughput.tokens_per_sec()
            extra = {"tokens_per_sec": tok_s,
                     "model_flops_per_sec": tok_s / tokens_per_step * model_flops}
            if peak:
                extra["mfu"] = extra["model_flops_per_sec"] / peak
            progress.log(current, writer.write(current, {**step_metrics, **extra}))
            throughput.reset()
        if current % config.eval_every == 0 and current < config.steps:
            t = time.perf_counter()
            record = evaluate(current, config.eval_batches)
            progress.print(f"eval @ {current}: loss {record['eval_loss']:.4f}, "
                           f"{record['eval_bits_per_byte']:.3f} bits/byte (xz -9e {xz_bpb:.3f})")
            throughput.pause(time.perf_counter() - t)
        if current % config.checkpoint_every == 0:
            checkpointer.save(current, train_state, train_iter)
    progress.close()

    # ---------------- Final checkpoint and evaluation, where the results are -----------------
    if current > start_step:
        checkpointer.save(current, train_state, train_iter)
    final = None
    if current >= config.steps and not stop.requested:
        final = evaluate(current, config.final_eval_batches)
        print(f"final held-out: loss {final['eval_loss']:.4f} nats/token, "
              f"{final['eval_bits_per_byte']:.3f} bits/byte (xz -9e: {xz_bpb:.3f}) over "
              f"{final['eval_tokens']:,} tokens", flush=True)
    checkpointer.close()
    writer.close()
    if final is None:  # stopped: by a signal (exit 128 + signal) or by config.stop_after (0)
        why = f"{stop.signal_name} received" if stop.requested else "config.stop_after reached"
        if current == start_step and stop.requested:
            why += " during start-up"
        saved = (f"checkpoint saved in {workdir}" if current > start_step
                 else f"nothing new to save in {workdir}")
        print(f"stopped at step {current} of {config.steps} ({why}); {saved}. Run the same "
              "command to resume.", flush=True)
        return stop.exit_status
    minutes = (time.time() - t_start) / 60
    print(f"done: {current} steps in {minutes:.1f} min. Results in {workdir}: metrics.jsonl, "
          f"TensorBoard (tensorboard --logdir {workdir}), checkpoints/. Sample with: "
          f"python -m dsv3_jax.sample --workdir={workdir} --prompt=\"def \"", flush=True)
    return 0


def model_summary(model) -> str:
    from dsv3_jax.accounting import count_params

    counts = count_params(model)
    return (f"{counts['total'] / 1e6:.1f}M parameters ({counts['activated'] / 1e6:.1f}M "
            f"activated, MTP {counts['mtp'] / 1e6:.1f}M)")


if __name__ == "__main__":
    app.run(main, flags_parser=cli.flags_parser(_PROG, _describe_parse_error,
                                                check=_check_config_file))
