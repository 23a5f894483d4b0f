"""Tests for ctu.backend: the platform check and the XLA:CPU flags."""

from unittest import mock

from absl.testing import absltest

from ctu import backend


class BackendTest(absltest.TestCase):
    def test_backend_is_checked(self):
        backend.initialize_backend("cpu")  # What the tests run on: accepted.
        with self.assertRaisesRegex(ValueError, "use one of"):
            backend.initialize_backend("cuda")

    def test_gpu_backend_leaves_the_plugin_choice_to_jax(self):
        # jax_platforms="gpu" means "cuda,rocm", which fails where only one is installed.
        with (
            mock.patch.object(backend.jax.config, "update") as update,
            mock.patch.object(backend.jax, "default_backend", return_value="gpu"),
        ):
            backend.initialize_backend("gpu")
            update.assert_not_called()
        with (
            mock.patch.object(backend.jax.config, "update") as update,
            mock.patch.object(backend.jax, "default_backend", return_value="tpu"),
        ):
            backend.initialize_backend("tpu")
            update.assert_called_once_with("jax_platforms", "tpu")
        with (
            mock.patch.object(backend.jax.config, "update") as update,
            mock.patch.object(backend.jax, "default_backend", return_value="cpu"),
            self.assertRaisesRegex(RuntimeError, "backend='gpu' was requested"),
        ):
            backend.initialize_backend("gpu")

    def test_cpu_xla_flags_follow_the_jaxlib_version_and_keep_the_users(self):
        import jaxlib

        flag = "--xla_cpu_experimental_ynn_fusion_type=-reduce,-eltwise"
        with mock.patch.object(jaxlib, "__version__", "0.10.2"):
            env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
            self.assertEqual(backend.add_cpu_xla_flags(env), (flag,))
            self.assertEqual(env["XLA_FLAGS"], f"--xla_force_host_platform_device_count=8 {flag}")
            self.assertEqual(backend.add_cpu_xla_flags(env), ())  # already there
            mine = {"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=dot"}
            self.assertEqual(backend.add_cpu_xla_flags(mine), ())
            self.assertEqual(mine["XLA_FLAGS"], "--xla_cpu_experimental_ynn_fusion_type=dot")
            # Devices on request; the user's own count (8 above) wins.
            self.assertEqual(backend.add_cpu_xla_flags(env, devices=2), ())
            self.assertIn("device_count=8", env["XLA_FLAGS"])
            self.assertNotIn("device_count=2", env["XLA_FLAGS"])
        with mock.patch.object(jaxlib, "__version__", "0.11.0"):
            env = {}
            self.assertEqual(backend.add_cpu_xla_flags(env), ())  # not measured there
            self.assertEqual(env, {})
            count = "--xla_force_host_platform_device_count=3"
            self.assertEqual(backend.add_cpu_xla_flags(env, devices=3), (count,))
            self.assertEqual(env["XLA_FLAGS"], count)


if __name__ == "__main__":
    absltest.main()
