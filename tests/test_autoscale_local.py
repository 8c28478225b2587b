"""The autoscaler adds fake GPU worker nodes for a generation job and removes them once it is done.

Runs benchmarks/autoscale_local.py's cycle for real (about 75 s on 2 cores): Ray's fake multi-node
provider (`cluster-local.yaml`) on the GCS's default port 6379, `jobs.generate` asking for two
{CPU: 1, GPU: 1} actors. It fails with a message saying so if port 6379 is taken; it stops only the
processes of the cluster it started.
"""

from pathlib import Path

from benchmarks.autoscale_local import idle_removals, run

PROMPTS = Path(__file__).resolve().parents[1] / "examples" / "prompts.txt"


def test_gpu_nodes_come_for_the_job_and_go_after_it():
    result = run(str(PROMPTS), timeout_s=240)
    assert result["job_exit_code"] == 0, result["job_output_tail"]
    assert result["images_generated"] == 20
    # Scale-up: both GPU nodes were there while the job ran (the cluster starts with none).
    assert result["timeline"][0]["gpu_nodes"] == 0
    assert any(p["gpu_nodes"] == 2 and p["job_running"] for p in result["timeline"])
    # Scale-down: after the job, the autoscaler removed them for being idle.
    assert result["all_removed_at_s"] is not None
    assert idle_removals(result["autoscaler_events"]) == 2, result["autoscaler_events"]  # at once or one by one
    # Only GPU workers come and go: the head type is never launched as a worker (the churn that a
    # head type not named `ray.head.default` caused).
    changes = [e for e in result["autoscaler_events"] if "Adding" in e or "Removing" in e]
    assert changes and all("type gpu_worker" in e for e in changes), result["autoscaler_events"]
