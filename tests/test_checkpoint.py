"""Tests for ctu.rl.checkpoint: round trips, sharded abstract restore, retention."""

import os
import shutil
import tempfile

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl.testing import absltest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ctu.rl import checkpoint


def _tempdir(test):
    # absltest's create_tempdir needs parsed absl flags, which pytest does not do.
    path = tempfile.mkdtemp()
    test.addCleanup(shutil.rmtree, path, ignore_errors=True)
    return path


class Mlp(nnx.Module):
    def __init__(self, *, rngs: nnx.Rngs):
        self.up = nnx.Linear(8, 16, rngs=rngs)
        self.down = nnx.Linear(16, 4, rngs=rngs)

    def __call__(self, x):
        return self.down(jax.nn.relu(self.up(x)))


def _model_and_optimizer(seed):
    model = Mlp(rngs=nnx.Rngs(seed))
    optimizer = nnx.Optimizer(model, optax.adamw(1e-2), wrt=nnx.Param)
    return model, optimizer


def _train(model, optimizer, steps):
    x = jnp.linspace(-1.0, 1.0, 8 * 8).reshape(8, 8)
    for _ in range(steps):
        grads = nnx.grad(lambda m: jnp.mean(m(x) ** 2))(model)
        optimizer.update(model, grads)


def _leaves(*objects):
    return [np.asarray(x) for o in objects for x in jax.tree.leaves(nnx.state(o))]


class CheckpointTest(chex.TestCase):
    def test_round_trip_restores_model_optimizer_rng_and_data(self):
        workdir = _tempdir(self)
        model, optimizer = _model_and_optimizer(0)
        _train(model, optimizer, 3)
        rng = jax.random.key(7)
        with checkpoint.Checkpointer(workdir) as ckpt:
            self.assertIsNone(ckpt.latest_step())
            self.assertTrue(
                ckpt.save(3, model=model, optimizer=optimizer, rng=rng, data_position={"batch": 5})
            )
        fresh_model, fresh_optimizer = _model_and_optimizer(1)
        with checkpoint.Checkpointer(workdir) as ckpt:
            self.assertEqual(ckpt.latest_step(), 3)
            restored = ckpt.restore(model=fresh_model, optimizer=fresh_optimizer)
        self.assertEqual(restored.step, 3)
        self.assertEqual(restored.data_position, {"batch": 5})
        np.testing.assert_array_equal(jax.random.key_data(restored.rng), jax.random.key_data(rng))
        for want, got in zip(
            _leaves(model, optimizer), _leaves(fresh_model, fresh_optimizer), strict=True
        ):
            np.testing.assert_array_equal(want, got)
        # The restored optimizer continues exactly like the original one.
        _train(model, optimizer, 1)
        _train(fresh_model, fresh_optimizer, 1)
        for want, got in zip(_leaves(model), _leaves(fresh_model), strict=True):
            np.testing.assert_array_equal(want, got)

    def test_restore_into_sharded_abstract_state(self):
        workdir = _tempdir(self)
        model, optimizer = _model_and_optimizer(0)
        _train(model, optimizer, 2)
        with checkpoint.Checkpointer(workdir) as ckpt:
            ckpt.save(2, model=model, optimizer=optimizer, rng=jax.random.key(0), data_position={})

        mesh = jax.make_mesh((8,), ("fsdp",))

        def shard(tree):
            def place(x):
                spec = P("fsdp") if x.ndim and x.shape[-1] % 8 == 0 else P()
                return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, spec))

            return jax.tree.map(place, tree)

        abstract_model = nnx.eval_shape(lambda: Mlp(rngs=nnx.Rngs(0)))
        abstract_optimizer = nnx.eval_shape(
            lambda: nnx.Optimizer(Mlp(rngs=nnx.Rngs(0)), optax.adamw(1e-2), wrt=nnx.Param)
        )
        nnx.update(abstract_model, shard(nnx.state(abstract_model)))
        nnx.update(abstract_optimizer, shard(nnx.state(abstract_optimizer)))
        with checkpoint.Checkpointer(workdir) as ckpt:
            ckpt.restore(model=abstract_model, optimizer=abstract_optimizer)
        kernel = abstract_model.up.kernel[...]
        self.assertIsInstance(kernel, jax.Array)
        self.assertEqual(kernel.sharding.spec, P("fsdp"))
        for want, got in zip(
            _leaves(model, optimizer), _leaves(abstract_model, abstract_optimizer), strict=True
        ):
            np.testing.assert_array_equal(want, got)

    def test_export_to_hugging_face_round_trips(self):
        from ctu.models import Qwen, from_hf
        from tests import resume_worker

        model = Qwen(resume_worker.tiny_model_config(), rngs=nnx.Rngs(3))
        out = os.path.join(_tempdir(self), "hf")
        checkpoint.export_to_hf(model, out)
        self.assertTrue(os.path.exists(os.path.join(out, "config.json")))
        loaded, config = from_hf(out)
        self.assertEqual(config.num_params(), model.config.num_params())
        for want, got in zip(_leaves(model), _leaves(loaded), strict=True):
            np.testing.assert_array_equal(got, want)

    def test_max_to_keep_interval_and_missing_step(self):
        workdir = _tempdir(self)
        model, optimizer = _model_and_optimizer(0)
        config = checkpoint.CheckpointConfig(max_to_keep=2, save_interval_steps=2)
        with checkpoint.Checkpointer(workdir, config) as ckpt:
            saved = [
                ckpt.save(
                    s,
                    model=model,
                    optimizer=optimizer,
                    rng=jax.random.key(s),
                    data_position={"step": s},
                )
                for s in range(1, 7)
            ]
            ckpt.wait_until_finished()
            # Orbax always saves the first step it sees, then every second one.
            self.assertEqual(saved, [True, True, False, True, False, True])
            self.assertEqual(ckpt.all_steps(), [4, 6])
            with self.assertRaisesRegex(FileNotFoundError, "available: \\[4, 6\\]"):
                ckpt.restore(model=model, optimizer=optimizer, step=2)
        self.assertFalse(any(".tmp" in name for name in os.listdir(workdir)))

    def test_rejects_raw_keys_and_bad_config(self):
        model, optimizer = _model_and_optimizer(0)
        with checkpoint.Checkpointer(_tempdir(self)) as ckpt:
            with self.assertRaisesRegex(TypeError, "typed key"):
                ckpt.save(
                    1, model=model, optimizer=optimizer, rng=jax.random.PRNGKey(0), data_position={}
                )
        with self.assertRaisesRegex(ValueError, "max_to_keep"):
            checkpoint.CheckpointConfig(max_to_keep=0)


if __name__ == "__main__":
    absltest.main()
