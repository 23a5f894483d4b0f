"""Exact resume: a run killed with SIGKILL and restarted matches an uninterrupted run."""

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
from absl.testing import absltest

from ctu import metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(REPO, "tests", "resume_worker.py")
STEPS = 8
SAVE_EVERY = 2


def _start(workdir, step_sleep_s, cache_dir):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
    env.pop("XLA_FLAGS", None)  # One CPU device: the worker's mesh is data=-1.
    command = [
        sys.executable,
        WORKER,
        f"--workdir={workdir}",
        f"--steps={STEPS}",
        f"--save_every={SAVE_EVERY}",
        f"--step_sleep_s={step_sleep_s}",
        f"--compilation_cache_dir={cache_dir}",
    ]
    return subprocess.Popen(
        command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )


def _committed_steps(workdir):
    directory = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(directory):
        return []
    # Orbax renames `<step>.orbax-checkpoint-tmp-*` to `<step>` only once committed.
    return [int(name) for name in os.listdir(directory) if re.fullmatch(r"\d+", name)]


def _wait(process, timeout=180):
    _, stderr = process.communicate(timeout=timeout)
    if process.returncode != 0:
        raise AssertionError(f"worker failed ({process.returncode}):\n{stderr[-3000:]}")


class ResumeTest(absltest.TestCase):
    def test_sigkill_then_resume_matches_uninterrupted_run(self):
        root = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, root, ignore_errors=True)
        reference_dir = os.path.join(root, "uninterrupted")
        killed_dir = os.path.join(root, "killed")

        cache_dir = os.path.join(root, "compilation_cache")

        # The uninterrupted run compiles; the others load its executables from the cache.
        reference = _start(reference_dir, step_sleep_s=0.0, cache_dir=cache_dir)
        deadline = time.monotonic() + 180
        while not _committed_steps(reference_dir) and reference.poll() is None:
            self.assertLess(time.monotonic(), deadline)
            time.sleep(0.05)
        victim = _start(killed_dir, step_sleep_s=0.5, cache_dir=cache_dir)
        while not _committed_steps(killed_dir):
            if victim.poll() is not None or time.monotonic() > deadline:
                _wait(victim)
                self.fail("the worker ended before it committed a checkpoint")
            time.sleep(0.05)
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        self.assertEqual(victim.returncode, -signal.SIGKILL)
        self.assertFalse(
            os.path.exists(os.path.join(killed_dir, "final_params.npz")),
            "the run finished before it was killed; the test proves nothing",
        )
        killed_at = max(_committed_steps(killed_dir))
        self.assertLess(killed_at, STEPS)

        _wait(_start(killed_dir, step_sleep_s=0.0, cache_dir=cache_dir))
        _wait(reference)

        want = np.load(os.path.join(reference_dir, "final_params.npz"))
        got = np.load(os.path.join(killed_dir, "final_params.npz"))
        self.assertEqual(sorted(want.files), sorted(got.files))
        for name in want.files:
            np.testing.assert_allclose(got[name], want[name], rtol=0, atol=1e-6, err_msg=name)

        want_rows = metrics.read_jsonl(os.path.join(reference_dir, metrics.METRICS_FILE))
        got_rows = metrics.read_jsonl(os.path.join(killed_dir, metrics.METRICS_FILE))
        self.assertEqual([row["step"] for row in got_rows], list(range(1, STEPS + 1)))
        for want_row, got_row in zip(want_rows, got_rows, strict=True):
            self.assertEqual(want_row.keys(), got_row.keys())
            for name, value in want_row.items():
                self.assertAlmostEqual(got_row[name], value, places=6, msg=name)


if __name__ == "__main__":
    absltest.main()
