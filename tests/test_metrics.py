"""Tests for ctu.metrics: JSONL resume semantics, TensorBoard events, config, MFU."""

import dataclasses
import json
import os
import shutil
import tempfile

import jax
import numpy as np
from absl.testing import absltest

from ctu import metrics


def _tempdir(test):
    # absltest's create_tempdir needs parsed absl flags, which pytest does not do.
    path = tempfile.mkdtemp()
    test.addCleanup(shutil.rmtree, path, ignore_errors=True)
    return path


class JsonlWriterTest(absltest.TestCase):
    def test_rows_are_appended_and_values_json_safe(self):
        path = os.path.join(_tempdir(self), "metrics.jsonl")
        writer = metrics.JsonlWriter(path)
        writer.write_scalars(
            1,
            {
                "loss": jax.numpy.float32(0.5),
                "perf/mfu": None,
                "grad_norm": np.float32("nan"),
                "n": np.int32(3),
            },
        )
        writer.close()
        self.assertEqual(
            metrics.read_jsonl(path),
            [{"step": 1, "loss": 0.5, "perf/mfu": None, "grad_norm": None, "n": 3}],
        )

    def test_rows_reach_the_file_before_close(self):
        """A run killed without closing its writer keeps every row written: scalars and
        texts alike are on disk as soon as they are written."""
        path = os.path.join(_tempdir(self), "metrics.jsonl")
        texts = path.replace("metrics", "texts")
        writer = metrics.JsonlWriter(path, texts_path=texts)
        writer.write_scalars(1, {"loss": 0.5})
        writer.write_texts(1, {"example": "hello"})
        self.assertEqual(metrics.read_jsonl(path), [{"step": 1, "loss": 0.5}])
        self.assertEqual(metrics.read_jsonl(texts), [{"step": 1, "example": "hello"}])
        writer.close()

    def test_resume_drops_rows_after_the_restored_step_and_torn_lines(self):
        path = os.path.join(_tempdir(self), "metrics.jsonl")
        writer = metrics.JsonlWriter(path)
        for step in range(1, 6):
            writer.write_scalars(step, {"loss": float(step)})
        writer.close()
        with open(path, "a") as f:
            f.write('{"step": 6, "lo')  # Killed mid-write.
        writer = metrics.JsonlWriter(path, start_step=3)
        writer.write_scalars(4, {"loss": 40.0})
        writer.close()
        rows = metrics.read_jsonl(path)
        self.assertEqual([r["step"] for r in rows], [1, 2, 3, 4])
        self.assertEqual(rows[-1]["loss"], 40.0)

    def test_fresh_start_in_an_old_workdir_drops_every_step(self):
        path = os.path.join(_tempdir(self), "metrics.jsonl")
        writer = metrics.JsonlWriter(path)
        writer.write_scalars(0, {"val/success": 0.0})
        writer.write_scalars(1, {"loss": 1.0})
        writer.close()
        metrics.JsonlWriter(path, start_step=0).close()
        self.assertEqual(metrics.read_jsonl(path), [])


class CreateWriterTest(absltest.TestCase):
    def test_writes_jsonl_tensorboard_and_config(self):
        @dataclasses.dataclass(frozen=True)
        class Config:
            learning_rate: float = 1e-3
            name: str = "smoke"

        workdir = _tempdir(self)
        writer = metrics.create_writer(workdir, config=Config())
        writer.write_scalars(1, {"loss": 2.0, "clip_ratio/high": 0.1})
        writer.write_texts(1, {"sample": "hello"})
        writer.close()
        self.assertEqual(
            metrics.read_jsonl(os.path.join(workdir, metrics.TEXTS_FILE)),
            [{"step": 1, "sample": "hello"}],
        )
        with open(os.path.join(workdir, metrics.CONFIG_FILE)) as f:
            self.assertEqual(json.load(f), {"learning_rate": 1e-3, "name": "smoke"})
        self.assertEqual(
            metrics.read_jsonl(os.path.join(workdir, metrics.METRICS_FILE))[0],
            {"step": 1, "loss": 2.0, "clip_ratio/high": 0.1},
        )

        from tensorboard.backend.event_processing import event_accumulator

        events = event_accumulator.EventAccumulator(os.path.join(workdir, metrics.TENSORBOARD_DIR))
        events.Reload()
        self.assertIn("clip_ratio/high", events.Tags()["scalars"])
        self.assertAlmostEqual(events.Scalars("loss")[0].value, 2.0)

    def test_tensorboard_drops_steps_after_the_restored_one(self):
        from tensorboard.backend.event_processing import event_accumulator

        logdir = _tempdir(self)
        writer = metrics.TensorBoardWriter(logdir)
        for step in range(1, 5):
            writer.write_scalars(step, {"loss": float(step)})
        writer.close()
        writer = metrics.TensorBoardWriter(logdir, start_step=2)
        writer.write_scalars(3, {"loss": 30.0})
        writer.close()
        events = event_accumulator.EventAccumulator(logdir)
        events.Reload()
        self.assertEqual(
            [(e.step, e.value) for e in events.Scalars("loss")], [(1, 1.0), (2, 2.0), (3, 30.0)]
        )

    def test_config_must_be_serialisable(self):
        with self.assertRaisesRegex(TypeError, "ConfigDict, a dataclass or a mapping"):
            metrics.save_config(_tempdir(self), object())


class MfuTest(absltest.TestCase):
    def test_flops_per_token_follows_palm(self):
        flops = metrics.train_flops_per_token(
            num_params=100, num_layers=2, num_heads=4, head_dim=8, seq_len=16
        )
        self.assertEqual(flops, 600 + 12 * 2 * 4 * 8 * 16)

    def test_mfu_is_null_on_cpu_unless_a_peak_is_configured(self):
        self.assertIsNone(metrics.peak_flops_per_device(jax.devices("cpu")[0]))
        peak = metrics.peak_flops_per_device(jax.devices("cpu")[0], override=1e12)
        self.assertEqual(
            metrics.mfu(tokens_per_s=1e3, flops_per_token=1e8, num_devices=2, peak_flops=peak), 0.05
        )
        self.assertIsNone(
            metrics.mfu(tokens_per_s=1.0, flops_per_token=1.0, num_devices=1, peak_flops=None)
        )

    def test_known_accelerators_have_a_peak(self):
        class FakeDevice:
            platform = "gpu"
            device_kind = "NVIDIA H100 80GB HBM3"

        self.assertEqual(metrics.peak_flops_per_device(FakeDevice()), 989e12)
        FakeDevice.device_kind = "TPU v5 lite"
        self.assertEqual(metrics.peak_flops_per_device(FakeDevice()), 197e12)


if __name__ == "__main__":
    absltest.main()
