"""The prepared GPU session script runs its stages (here: SMOKE=1, the CPU sizes), keeps to its
deadline and rejects unknown stages and families."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def session(tmp_path, *stages, env=None):
    env = {**os.environ, "SMOKE": "1", "OUT": str(tmp_path), "PYTHON": sys.executable,
           "PYTHONPATH": f"{ROOT / 'platform'}:{ROOT}", "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(["bash", str(ROOT / "benchmarks" / "device_session.sh"), *stages], env=env,
                          capture_output=True, text=True, timeout=600)


def test_a_stage_writes_its_results_under_out(tmp_path):
    done = session(tmp_path, "picard")
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "stages.txt").read_text().startswith("picard rc=0 ")
    assert json.loads((tmp_path / "picard.json").read_text())
    assert "torch" in (tmp_path / "machine.txt").read_text()


def test_an_unknown_stage_is_refused_before_any_stage_runs(tmp_path):
    done = session(tmp_path, "picard", "trian")
    assert done.returncode == 2 and "unknown stage trian" in done.stdout
    assert not (tmp_path / "stages.txt").exists()


def test_stages_past_the_deadline_are_skipped_with_a_line_saying_so(tmp_path):
    done = session(tmp_path, "picard", "tokens", env={"DEADLINE_S": "5"})
    assert done.returncode == 0, done.stdout + done.stderr
    lines = (tmp_path / "stages.txt").read_text().splitlines()  # the machine check takes a second or two
    assert [re.sub(r"\d+s left", "Ns left", line) for line in lines] == [
        "picard skipped: Ns left of DEADLINE_S", "tokens skipped: Ns left of DEADLINE_S"]
    assert not (tmp_path / "picard.json").exists()


def test_an_unknown_training_family_is_refused(tmp_path):
    done = session(tmp_path, "train", env={"TRAIN_FAMILIES": "gaussian unet"})
    assert done.returncode == 2 and "unknown family unet" in done.stdout
