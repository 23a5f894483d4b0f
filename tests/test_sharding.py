"""Mesh construction, dimension-named partition specs, and sharded == unsharded forward.

Needs the 8 simulated CPU devices that tests/conftest.py sets before JAX is imported.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ctu import sharding
from ctu.models import KVCache
from tests import toys

MESH_2X2X2 = {"data": 2, "fsdp": 2, "tensor": 2}


@nnx.jit
def forward(model, tokens):
    return model(tokens)


@nnx.jit
def forward_cached(model, tokens, positions, cache):
    return model(tokens, positions=positions, cache=cache)


class MeshTest(chex.TestCase):
    def setUp(self):
        super().setUp()
        self.assertGreaterEqual(jax.device_count(), 8, "tests/conftest.py sets 8 CPU devices")

    @parameterized.parameters(
        ({"data": 2, "fsdp": -1, "tensor": 2}, (2, 2, 2)),
        ({"data": -1, "fsdp": 1, "tensor": 1}, (8, 1, 1)),
        ({"data": 1, "fsdp": 4, "tensor": -1}, (1, 4, 2)),
    )
    def test_make_mesh(self, config, shape):
        mesh = sharding.make_mesh(config)
        self.assertEqual(mesh.axis_names, ("data", "fsdp", "tensor"))
        self.assertEqual(tuple(mesh.shape.values()), shape)

    @parameterized.parameters(
        ({"data": -1, "fsdp": -1, "tensor": 1}, "at most one -1"),
        ({"data": 3, "fsdp": 1, "tensor": 1}, "needs 3 devices"),
        ({"data": 3, "fsdp": -1, "tensor": 1}, "not a multiple of 3"),
    )
    def test_make_mesh_errors(self, config, message):
        with self.assertRaisesRegex(ValueError, message):
            sharding.make_mesh(config)

    def test_fit_spec_replicates_what_does_not_divide(self):
        mesh_shape = {"data": 2, "fsdp": 2, "tensor": 4}
        self.assertEqual(
            sharding.fit_spec(("fsdp", "tensor", None), (8, 4, 3), mesh_shape),
            P("fsdp", "tensor", None),
        )
        # Two kv heads cannot split four ways: that dimension stays whole.
        self.assertEqual(
            sharding.fit_spec(("fsdp", "tensor", None), (8, 2, 3), mesh_shape),
            P("fsdp", None, None),
        )
        # A batch of 2 keeps "data" and drops "fsdp".
        self.assertEqual(
            sharding.fit_spec((("data", "fsdp"), None), (2, 5), mesh_shape), P("data", None)
        )
        self.assertEqual(
            sharding.fit_spec((("data", "fsdp"), None), (4, 5), mesh_shape),
            P(("data", "fsdp"), None),
        )

    def test_batch_and_replicated(self):
        mesh = sharding.make_mesh(MESH_2X2X2)
        self.assertEqual(sharding.batch_sharding(mesh, 3).spec, P(("data", "fsdp"), None, None))
        self.assertEqual(sharding.replicated(mesh).spec, P())


class ShardedModelTest(chex.TestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.mesh = sharding.make_mesh(MESH_2X2X2)
        cls.config = toys.tiny_model_config(vocab_size=128)
        cls.model = sharding.create_sharded_model(cls.config, cls.mesh, nnx.Rngs(0))
        # The same parameters gathered onto one device: the unsharded reference.
        graphdef, state = nnx.split(cls.model)
        cls.reference = nnx.merge(graphdef, jax.tree.map(jnp.asarray, jax.device_get(state)))
        cls.tokens = jax.random.randint(jax.random.key(1), (4, 16), 0, 128)
        cls.want = forward(cls.reference, cls.tokens)

    def test_params_born_sharded(self):
        attn = self.model.layers[0].attn
        expected = {
            "embed": (self.model.embed, P("tensor", "fsdp"), (64, 64)),
            "q_proj": (attn.q_proj, P("fsdp", "tensor", None), (64, 2, 32)),
            "k_proj": (attn.k_proj, P("fsdp", "tensor", None), (64, 1, 32)),
            "o_proj": (attn.o_proj, P("tensor", None, "fsdp"), (2, 32, 64)),
            "down_proj": (self.model.layers[1].mlp.down_proj, P("tensor", "fsdp"), (192, 64)),
            "q_norm": (attn.q_norm.scale, P(None), (32,)),
        }
        for name, (param, spec, shard_shape) in expected.items():
            array = param[...]
            want = NamedSharding(self.mesh, spec)
            self.assertTrue(array.sharding.is_equivalent_to(want, array.ndim), name)
            self.assertEqual(array.addressable_shards[0].data.shape, shard_shape, name)
        self.assertLen(self.reference.embed[...].devices(), 1)

    def test_sharded_forward_equals_unsharded(self):
        with jax.set_mesh(self.mesh):
            tokens = jax.device_put(self.tokens, sharding.batch_sharding(self.mesh))
            got = forward(self.model, tokens)
        want_sharding = NamedSharding(self.mesh, P(("data", "fsdp"), None, "tensor"))
        self.assertTrue(got.sharding.is_equivalent_to(want_sharding, 3))
        np.testing.assert_allclose(got, self.want, atol=1e-5, rtol=0)

    def test_sharded_cache_prefill_and_chunk_equal_forward(self):
        cache = KVCache.init(self.config, batch=4, max_len=32)
        cache = jax.device_put(cache, sharding.kv_cache_shardings(self.mesh, cache))
        for layer in jax.tree.leaves(cache):
            self.assertEqual(layer.sharding.spec, P(("data", "fsdp"), "tensor", None, None))
        positions = jnp.broadcast_to(jnp.arange(16), (4, 16))
        with jax.set_mesh(self.mesh):
            first, cache = forward_cached(self.model, self.tokens[:, :10], positions[:, :10], cache)
            rest, cache = forward_cached(self.model, self.tokens[:, 10:], positions[:, 10:], cache)
        got = jnp.concatenate([first, rest], axis=1)
        np.testing.assert_allclose(got, self.want, atol=1e-4, rtol=0)


if __name__ == "__main__":
    absltest.main()
