"""Hugging Face parity and import/export round trips on tiny random transformers models."""

import json
import os
import shutil
import tempfile

import chex
import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers
from absl.testing import absltest, parameterized
from flax import nnx

from ctu import sharding
from ctu.models import ModelConfig, from_hf, to_hf
from tests import toys

# Different families, head counts, GQA ratios (1, 2, 3, 4), head_dim != hidden/heads, tying.
CASES = {
    "qwen2_gqa2_tied": dict(family="qwen2", num_heads=4, num_kv_heads=2),
    "qwen2_gqa3_untied": dict(
        family="qwen2", num_heads=6, num_kv_heads=2, hidden_size=48, tie_word_embeddings=False
    ),
    "qwen3_mha_tied": dict(family="qwen3", num_heads=4, num_kv_heads=4, head_dim=24),
    "qwen3_gqa4_untied": dict(
        family="qwen3", num_heads=8, num_kv_heads=2, head_dim=16, tie_word_embeddings=False
    ),
}
PARITY_ATOL = 1e-4


@nnx.jit
def forward(model, tokens):
    return model(tokens)


def _tokens(batch=2, length=13, vocab=97, seed=0):
    return np.random.default_rng(seed).integers(0, vocab, (batch, length)).astype(np.int32)


def _torch_logits(model, tokens):
    with torch.no_grad():
        return model(torch.from_numpy(tokens).long()).logits.float().numpy()


def _leaves(model):
    return {
        tuple(path): np.asarray(node.get_value())
        for path, node in nnx.iter_graph(model)
        if isinstance(node, nnx.Variable)
    }


class HFParityTest(chex.TestCase):
    def setUp(self):
        super().setUp()
        self.dir = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.dir, ignore_errors=True)

    @parameterized.named_parameters(*((name, name) for name in CASES))
    def test_parity_and_round_trip(self, name):
        hf_dir, ours_dir = os.path.join(self.dir, "hf"), os.path.join(self.dir, "ours")
        hf_model = toys.tiny_hf_checkpoint(hf_dir, **CASES[name])
        tokens = _tokens()
        want = _torch_logits(hf_model, tokens)
        self.assertGreater(np.abs(want).max(), 1.0)  # far from a degenerate all-zero output

        model, config = from_hf(hf_dir)
        self.assertEqual(config.family, CASES[name]["family"])
        got = np.asarray(forward(model, jnp.asarray(tokens)))
        error = np.abs(got - want).max()
        print(f"parity {name}: max abs logits error {error:.3g}")
        self.assertLess(error, PARITY_ATOL)

        # Export -> import is bit-exact, and transformers reloads our export unchanged.
        to_hf(model, config, ours_dir)
        again, config_again = from_hf(ours_dir)
        self.assertEqual(config_again, config)
        for path, value in _leaves(model).items():
            np.testing.assert_array_equal(_leaves(again)[path], value, err_msg=str(path))
        reloaded = transformers.AutoModelForCausalLM.from_pretrained(ours_dir)
        reloaded.eval()
        np.testing.assert_array_equal(_torch_logits(reloaded, tokens), want)

    def test_smear_round_trips_through_our_loader(self):
        config = toys.tiny_model_config(vocab_size=97, smear=2)
        model = toys.tiny_model(config)
        model.smear.set_value(jnp.linspace(-1.0, 1.0, 2 * config.hidden_size).reshape(2, -1))
        path = os.path.join(self.dir, "smear")
        to_hf(model, config, path)
        hf_config = json.loads(open(os.path.join(path, "config.json")).read())
        self.assertEqual((hf_config["ctu_smear"], hf_config["model_type"]), (2, "ctu_smear_qwen3"))
        # transformers has no gates: it refuses the folder instead of loading another model.
        with self.assertRaisesRegex(ValueError, "ctu_smear_qwen3"):
            transformers.AutoModelForCausalLM.from_pretrained(path)
        with self.assertRaisesRegex(ValueError, "without ctu_smear >= 1: the folder is damaged"):
            ModelConfig.from_hf_dict({**hf_config, "ctu_smear": 0})
        again, config_again = from_hf(path)
        self.assertEqual(config_again, config)
        for leaf, value in _leaves(model).items():
            np.testing.assert_array_equal(_leaves(again)[leaf], value, err_msg=str(leaf))

    def test_sharded_index_both_ways(self):
        hf_dir, ours_dir = os.path.join(self.dir, "hf"), os.path.join(self.dir, "ours")
        hf_model = toys.tiny_hf_checkpoint(hf_dir, family="qwen2", max_shard_size="20KB")
        self.assertTrue(os.path.exists(os.path.join(hf_dir, "model.safetensors.index.json")))
        tokens = _tokens()
        want = _torch_logits(hf_model, tokens)
        model, config = from_hf(hf_dir)
        np.testing.assert_allclose(forward(model, tokens), want, atol=PARITY_ATOL, rtol=0)

        to_hf(model, config, ours_dir, max_shard_bytes=16_000)
        with open(os.path.join(ours_dir, "model.safetensors.index.json")) as f:
            self.assertGreater(len(set(json.load(f)["weight_map"].values())), 1)
        reloaded = transformers.AutoModelForCausalLM.from_pretrained(ours_dir)
        np.testing.assert_array_equal(_torch_logits(reloaded.eval(), tokens), want)

    def test_export_replaces_folder_atomically(self):
        hf_dir, ours_dir = os.path.join(self.dir, "hf"), os.path.join(self.dir, "ours")
        toys.tiny_hf_checkpoint(hf_dir, family="qwen3")
        model, config = from_hf(hf_dir)
        os.makedirs(ours_dir)
        with open(os.path.join(ours_dir, "stale.txt"), "w") as f:
            f.write("old")
        to_hf(model, config, ours_dir, dtype=jnp.bfloat16)
        self.assertCountEqual(os.listdir(ours_dir), ["config.json", "model.safetensors"])
        self.assertEqual(sorted(os.listdir(self.dir)), ["hf", "ours"])  # no temp left
        half, half_config = from_hf(ours_dir, dtype=jnp.bfloat16)
        self.assertEqual(half_config.param_dtype, "bfloat16")
        self.assertEqual(half.embed[...].dtype, jnp.bfloat16)

    def test_sharded_load_onto_mesh(self):
        hf_dir = os.path.join(self.dir, "hf")
        hf_model = toys.tiny_hf_checkpoint(hf_dir, family="qwen3", num_heads=4, num_kv_heads=2)
        mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
        model, _ = from_hf(hf_dir, mesh=mesh)
        q_proj = model.layers[0].attn.q_proj[...]
        self.assertEqual(q_proj.sharding.spec, jax.sharding.PartitionSpec("fsdp", "tensor", None))
        self.assertEqual(q_proj.addressable_shards[0].data.shape, (32, 2, 16))
        tokens = _tokens(batch=4)
        with jax.set_mesh(mesh):
            got = forward(model, jax.device_put(tokens, sharding.batch_sharding(mesh)))
        np.testing.assert_allclose(got, _torch_logits(hf_model, tokens), atol=PARITY_ATOL, rtol=0)

    def test_missing_files_are_named(self):
        with self.assertRaisesRegex(FileNotFoundError, "config.json"):
            from_hf(tempfile.mkdtemp(dir=self.dir))
        hf_dir = os.path.join(self.dir, "hf")
        toys.tiny_hf_checkpoint(hf_dir, family="qwen2")
        with open(os.path.join(hf_dir, "config.json")) as f:
            hf_config = json.load(f)
        with open(os.path.join(hf_dir, "config.json"), "w") as f:
            json.dump(dict(hf_config, intermediate_size=80), f)
        with self.assertRaisesRegex(ValueError, "mlp.gate_proj.weight.*does not fit"):
            from_hf(hf_dir)
        os.remove(os.path.join(hf_dir, "model.safetensors"))
        with self.assertRaisesRegex(FileNotFoundError, "model.safetensors"):
            from_hf(hf_dir)


if __name__ == "__main__":
    absltest.main()
