"""The training steps of the tiny configs, exported from this CPU host for TPU and GPU.

`jax.export` lowers the whole train step (forward, backward, optimizer) for
`platforms=('tpu', 'cuda')` on an abstract data=2 x expert=2 x model=2 mesh, with no device of
either kind, and the StableHLO is read for what an accelerator would run: grouped matmuls,
collectives and their sizes, loops. The only thing export refuses on its own is
`ragged_all_to_all` (a custom call without a compatibility guarantee), so that check is
disabled by name.
"""

import importlib
import re

import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from jax.sharding import AbstractMesh, AxisType

from moe_jax import optim, parallel, train_state
from moe_jax.config import DECODER_KINDS
from moe_jax.models import build_model
from moe_jax.steps import make_train_step

BATCH_FIELDS = {
    "decoder": ("inputs", "targets", "segment_ids", "positions", "weights"),
    "encoder_decoder": (
        "encoder_inputs",
        "decoder_inputs",
        "decoder_targets",
        "encoder_segment_ids",
        "decoder_segment_ids",
        "decoder_weights",
    ),
}


def _exported_train_step(family: str):
    config = importlib.import_module(f"configs.{family}").get_config("tiny")
    mesh = AbstractMesh((2, 2, 2), parallel.MESH_AXES, axis_types=(AxisType.Auto,) * 3)
    optimizer, schedule = optim.make_optimizer(config.train)
    model = nnx.eval_shape(lambda: build_model(config, rngs=nnx.Rngs(0)))
    kind = "decoder" if config.model.kind in DECODER_KINDS else "encoder_decoder"
    shape = (config.train.batch_size, config.train.seq_len)
    batch = {
        name: jax.ShapeDtypeStruct(shape, jnp.float32 if "weights" in name else jnp.int32)
        for name in BATCH_FIELDS[kind]
    }
    with jax.sharding.use_abstract_mesh(mesh):
        state, graphdef, rng_state = train_state.abstract_state(model, config, mesh, optimizer)
        step = make_train_step(graphdef, rng_state, optimizer, schedule, config)
        exported = jax.export.export(
            jax.jit(step),
            platforms=("tpu", "cuda"),
            disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("ragged_all_to_all")],
        )(state, batch, jax.ShapeDtypeStruct((), jax.random.key(0).dtype))
    return config, exported.mlir_module()


def _all_to_all_operands(text: str) -> set[str]:
    return set(re.findall(r'"stablehlo.all_to_all"\(%\w+\).*?: \((tensor<[^>]*>)\)', text))


@pytest.mark.parametrize("family", ["switch", "mixtral"])
def test_train_step_exports_for_tpu_and_gpu(family):
    config, text = _exported_train_step(family)
    moe = config.moe
    assert "stablehlo.all_gather" not in text  # nothing is gathered onto every device
    assert "stablehlo.all_reduce" in text  # gradients of replicated weights, losses
    loops = [line for line in text.splitlines() if "stablehlo.while(" in line]
    assert all("ui32" in line for line in loops), loops  # random-bit rounds only
    if family == "switch":
        # einsum backend: [E, G_local, C, M] out, [E / X, X * G_local, C, M] back, where
        # G_local = 16 * 128 / 128 groups / 4 batch devices = 4, C = 1.25 * 128 / 8 = 20
        assert moe.backend == "einsum" and moe.num_experts == 8
        assert _all_to_all_operands(text) == {
            "tensor<8x4x20x128xf32>",
            "tensor<4x8x20x128xf32>",
        }
        assert "chlo.ragged_dot" not in text and "ragged_all_to_all" not in text
    else:
        # dropless: rows by ragged_all_to_all into [X * S, M] buffers, ragged dots; only the
        # [X, E_local] row counts (and their transposes' sizes) use plain all_to_all
        assert moe.backend == "dropless" and moe.num_experts == 8 and moe.k == 2
        assert text.count("stablehlo.custom_call @ragged_all_to_all(") >= 4 * 2
        assert 'stablehlo.composite "chlo.ragged_dot"' in text
        # S = G_local * T * min(K, E_local) = 4 * 128 * 2 = 1024 rows per peer, X = 2 peers
        assert "tensor<2048x128xf32>" in text
        assert all("xi32>" in operand for operand in _all_to_all_operands(text))
