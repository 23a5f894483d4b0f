"""The sampler benchmark's bandwidth bound, checked against the model config's own counts."""

from unittest import mock

from absl.testing import absltest, parameterized

from ctu.bench import sampler
from ctu.models import ModelConfig


class DecodeBoundTest(parameterized.TestCase):
    @parameterized.parameters("qwen2p5_0p5b", "qwen3_0p6b")
    def test_bytes_per_step(self, preset):
        config = ModelConfig.preset(preset, param_dtype="bfloat16", dtype="bfloat16")
        got = sampler.decode_bound(config, batch=4, max_len=100, bandwidth=1e12)
        self.assertEqual(got["param_bytes"], 2 * config.num_params())
        kv = 2 * config.num_layers * 4 * 100 * config.num_kv_heads * config.head_dim * 2
        self.assertEqual(got["kv_bytes"], kv)
        self.assertAlmostEqual(got["bound_tokens_per_s"], 4 * 1e12 / (2 * config.num_params() + kv))

    def test_bandwidth_lookup(self):
        self.assertEqual(sampler.hbm_bandwidth("NVIDIA H100 80GB HBM3"), 3.35e12)
        self.assertEqual(sampler.hbm_bandwidth("NVIDIA H100 PCIe"), 2.0e12)
        self.assertEqual(sampler.hbm_bandwidth("NVIDIA H200"), 4.8e12)
        self.assertIsNone(sampler.hbm_bandwidth("cpu"))

    def test_transformers_runs_where_ours_does(self):
        import torch

        self.assertEqual(sampler.torch_device(), "cpu")  # the tests' CPU backend
        with mock.patch.object(sampler.jax, "default_backend", return_value="gpu"):
            for cuda, want in ((False, "cpu"), (True, "cuda")):
                with mock.patch.object(torch.cuda, "is_available", return_value=cuda):
                    self.assertEqual(sampler.torch_device(), want)


if __name__ == "__main__":
    absltest.main()
