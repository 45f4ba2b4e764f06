"""ModelConfig.dtype / param_dtype: every dtype idiom (strings, jnp/np scalar types, dtype
objects) is stored as its canonical name, and every consumer works with it: equality and
hashing, to_hf/from_hf, the model's parameters and activations, HF save/load, the run config
from the command line, and the workdir check on resume. Bad values name the field.

One tiny forward per distinct (dtype, param_dtype) combination, shared by every spelling."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import dsv3_jax
from dsv3_jax import DeepSeekV3, ModelConfig
from dsv3_jax.layers import dtype_of
from dsv3_jax.training import checkpoint, run_config

# (spelling, canonical name)
SPELLINGS = [
    ("bfloat16", "bfloat16"),
    ("float32", "float32"),
    (jnp.bfloat16, "bfloat16"),
    (jnp.float32, "float32"),
    (np.float32, "float32"),
    (jnp.dtype("bfloat16"), "bfloat16"),
    (np.dtype("float32"), "float32"),
]
FIELDS = ("dtype", "param_dtype")
# Strings must be the canonical names ("f4" and "bf16" too are refused): run configs are
# strings, saved beside the checkpoints and compared on resume, so one spelling per dtype.
BAD = ["int8", "float8", 3, "nonsense", "float64", np.int32, jnp.float8_e4m3fn, None, "f4",
       "bf16"]

spellings = pytest.mark.parametrize("spelling, name", SPELLINGS,
                                    ids=[f"{s!r}->{n}" for s, n in SPELLINGS])
fields = pytest.mark.parametrize("field", FIELDS)


def base() -> ModelConfig:
    # 1 dense + 1 MoE layer, no MTP module: every layer kind, a short compile.
    return dataclasses.replace(ModelConfig.preset("tiny"), num_hidden_layers=2,
                               num_nextn_predict_layers=0)


def with_dtype(field, value) -> ModelConfig:
    return dataclasses.replace(base(), **{field: value})


@fields
@spellings
def test_spelling_is_stored_as_the_canonical_name(field, spelling, name):
    c = with_dtype(field, spelling)
    assert getattr(c, field) == name and type(getattr(c, field)) is str
    other = "param_dtype" if field == "dtype" else "dtype"
    assert getattr(c, other) == "float32"
    by_name = with_dtype(field, name)
    assert c == by_name and hash(c) == hash(by_name)
    assert {c: 1}[by_name] == 1  # usable as a jit static argument / dict key
    json.dumps(dataclasses.asdict(c))  # JSON-able as it is
    assert dtype_of(getattr(c, field)) == jnp.dtype(name)
    # The constructor and .replace normalize too, not only dataclasses.replace.
    assert ModelConfig(**{field: spelling}) == ModelConfig(**{field: name})
    assert base().replace(**{field: spelling}) == by_name


@fields
@spellings
def test_to_hf_and_back(field, spelling, name):
    c = with_dtype(field, spelling)
    hf = json.loads(json.dumps(c.to_hf()))  # through JSON, like config.json
    assert hf["torch_dtype"] == c.param_dtype
    assert "dtype" not in hf and "param_dtype" not in hf
    numerics = dict(remat_policy=c.remat_policy, expert_block_size=c.expert_block_size)
    assert ModelConfig.from_hf(hf, dtype=c.dtype, param_dtype=c.param_dtype, **numerics) == c
    # from_hf overrides take any spelling too.
    assert ModelConfig.from_hf(hf, **{field: spelling}, **numerics) == c


def test_from_hf_takes_numerics_from_overrides_only():
    # transformers 5 writes "dtype" (the weights' storage dtype) into config.json: it is not
    # our compute dtype, and an HF dict never sets param_dtype either.
    hf = base().to_hf()
    hf.update(dtype="bfloat16", torch_dtype="bfloat16", param_dtype="bfloat16")
    c = ModelConfig.from_hf(hf)
    assert c.dtype == "float32" and c.param_dtype == "float32"
    assert ModelConfig.from_hf(hf, dtype=jnp.bfloat16).dtype == "bfloat16"


@fields
@pytest.mark.parametrize("bad", BAD, ids=repr)
def test_bad_dtypes_name_the_field(field, bad):
    with pytest.raises(ValueError, match=rf"ModelConfig\.{field}=.*allowed: 'float32', "
                                         r"'bfloat16', 'float16'"):
        with_dtype(field, bad)


_FORWARDS: dict = {}


@pytest.fixture(scope="module")
def forward():
    """config -> (abstract variables, variables, ModelOutput), once per (dtype, param_dtype).

    The initializer is traced abstractly (its dtypes are the model's; compiling it would cost
    more than everything else here); the forward runs on random values of those shapes/dtypes.
    """

    def run(config: ModelConfig):
        key = (config.dtype, config.param_dtype)
        if key not in _FORWARDS:
            abstract = jax.eval_shape(lambda k: dsv3_jax.init_variables(config, k),
                                      jax.random.key(0))
            rng = np.random.default_rng(0)
            variables = jax.tree.map(  # numpy (ml_dtypes) casts: nothing compiled
                lambda a: jnp.asarray(rng.normal(0.0, 0.02, a.shape).astype(a.dtype)), abstract)
            tokens = jnp.arange(16, dtype=jnp.int32).reshape(2, 8) % config.vocab_size
            out = jax.jit(lambda v, t: DeepSeekV3(config).apply(v, t))(variables, tokens)
            _FORWARDS[key] = (abstract, variables, out)
        return _FORWARDS[key]

    return run


@fields
@spellings
def test_forward_dtypes(forward, field, spelling, name):
    c = with_dtype(field, spelling)
    abstract, _, out = forward(c)
    params = jax.tree.leaves(abstract["params"])  # what init creates
    assert params and {x.dtype for x in params} == {jnp.dtype(c.param_dtype)}
    assert {x.dtype for x in jax.tree.leaves(abstract["moe_bias"])} == {jnp.dtype("float32")}
    assert out.hidden.dtype == jnp.dtype(c.dtype)  # activations in the compute dtype
    assert out.logits.dtype == jnp.float32  # the head returns float32 logits
    assert bool(jnp.isfinite(out.logits).all())


def test_hf_save_and_load_with_dtype_idioms(forward, tmp_path):
    c = with_dtype("param_dtype", jnp.bfloat16)
    _, variables, _ = forward(c)
    dsv3_jax.save_hf_checkpoint(tmp_path, c, variables)
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    for spelling, name in [(jnp.bfloat16, "bfloat16"), (np.float32, "float32"),
                           (np.dtype("float32"), "float32")]:
        config, loaded = dsv3_jax.load_hf_checkpoint(tmp_path, dtype=spelling)
        assert config.param_dtype == name
        assert {x.dtype for x in jax.tree.leaves(loaded["params"])} == {jnp.dtype(name)}
    with pytest.raises(ValueError, match=r"ModelConfig\.param_dtype="):
        dsv3_jax.load_hf_checkpoint(tmp_path, dtype="int8")


def test_run_config_from_the_command_line():
    # --config.model.dtype=bfloat16 sets the ConfigDict's string field.
    config = ml_collections.ConfigDict({"model": run_config.model_fields("tiny")})
    config.model.dtype = "bfloat16"
    config.model.param_dtype = "float32"
    model = run_config.model_config(config)
    assert model.dtype == "bfloat16" and model == ModelConfig.preset("tiny", dtype=jnp.bfloat16)
    config.model.dtype = "int8"
    with pytest.raises(run_config.ConfigError, match=r"config\.model: ModelConfig\.dtype="):
        run_config.model_config(config)


def test_workdir_check_compares_canonical_names(tmp_path):
    config = ml_collections.ConfigDict({"model": run_config.model_fields("tiny")})
    config.model.param_dtype = "bfloat16"
    (tmp_path / checkpoint.CHECKPOINT_DIR / "1").mkdir(parents=True)
    checkpoint.write_config(str(tmp_path), config)
    # The same model, param_dtype spelled as a scalar type or a dtype object: same model.
    for spelling in (jnp.bfloat16, jnp.dtype("bfloat16"), "bfloat16"):
        checkpoint.check_workdir(str(tmp_path), ModelConfig.preset("tiny", param_dtype=spelling))
    with pytest.raises(run_config.ConfigError, match="param_dtype"):
        checkpoint.check_workdir(str(tmp_path), ModelConfig.preset("tiny", param_dtype=np.float32))
