"""Watch Ray's autoscaler add GPU worker nodes for a generation job and remove them when idle.

    python -m benchmarks.autoscale_local [--prompts examples/prompts.txt] [--out benchmarks/results/autoscale_local.json]

Starts a one-machine cluster with Ray's fake multi-node provider (`cluster-local.yaml`: a head with
1 CPU and up to two fake worker nodes advertising {CPU: 1, GPU: 1}), submits `jobs.generate` with
`--num-gpus-per-worker 1 --min-workers 2`, and samples the number of live GPU nodes every second
until they have been removed again. Prints the timeline and writes it as JSON. It runs
`ray stop` at the end, which stops EVERY Ray process on the machine: run it with no other cluster.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def gpu_nodes() -> int:
    import ray

    return sum(1 for n in ray.nodes() if n["Alive"] and n["Resources"].get("GPU", 0) > 0)


def run(prompts: str, timeout_s: float = 300.0) -> dict:
    """Start the fake cluster, run the job, record the GPU-node timeline; always stops Ray."""
    import ray

    tmp = Path(tempfile.mkdtemp(prefix="socarrat-autoscale-"))
    (tmp / "cluster.json").write_text(json.dumps(yaml.safe_load((ROOT / "cluster-local.yaml").read_text())))
    env = {**os.environ, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"}
    ray_bin = str(Path(sys.executable).parent / "ray")
    subprocess.run([ray_bin, "start", "--head", "--num-cpus=1", "--include-dashboard=false",
                    f"--autoscaling-config={tmp / 'cluster.json'}"], env=env, check=True, capture_output=True)
    timeline, t0 = [], time.monotonic()
    try:
        ray.init(address="auto", logging_level="ERROR")
        job = subprocess.Popen(
            [sys.executable, "-m", "jobs.generate", "--prompts", prompts, "--out", str(tmp / "out"), "--steps", "4",
             "--batch-size", "4", "--shard-size", "4", "--num-gpus-per-worker", "1", "--min-workers", "2", "--max-workers", "2"],
            cwd=ROOT, env={**env, "RAY_ADDRESS": "auto"}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        job_end = None
        while time.monotonic() - t0 < timeout_s:
            now = time.monotonic() - t0
            if job_end is None and job.poll() is not None:
                job_end = now
            timeline.append({"t_s": round(now, 1), "gpu_nodes": gpu_nodes(), "job_running": job_end is None})
            if job_end is not None and timeline[-1]["gpu_nodes"] == 0 and max(p["gpu_nodes"] for p in timeline) > 0:
                break
            time.sleep(1)
        output = job.communicate()[0] if job_end is not None else "(still running at the timeout)"
    finally:
        ray.shutdown()
        subprocess.run([ray_bin, "stop", "--force"], capture_output=True)
    peak = max(p["gpu_nodes"] for p in timeline)
    up = next((p["t_s"] for p in timeline if p["gpu_nodes"] == peak), None)
    down = next((p["t_s"] for p in timeline if job_end and p["t_s"] >= job_end and p["gpu_nodes"] == 0), None)
    return {"peak_gpu_nodes": peak, "job_exit_code": job.returncode, "job_end_s": job_end, "peak_at_s": up,
            "all_removed_at_s": down, "timeline": timeline, "job_output_tail": output[-1500:]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", default=str(ROOT / "examples" / "prompts.txt"))
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "autoscale_local.json"))
    args = p.parse_args()
    result = run(args.prompts)
    print(f"{'t (s)':>6} {'GPU nodes':>9}  job")
    last = None
    for point in result["timeline"]:
        if (point["gpu_nodes"], point["job_running"]) != last:
            print(f"{point['t_s']:>6} {point['gpu_nodes']:>9}  {'running' if point['job_running'] else 'done'}")
            last = (point["gpu_nodes"], point["job_running"])
    print(f"\npeak {result['peak_gpu_nodes']} GPU nodes at {result['peak_at_s']} s; job ended at {result['job_end_s']} s "
          f"(exit {result['job_exit_code']}); all GPU nodes gone at {result['all_removed_at_s']} s")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    return 0 if result["peak_gpu_nodes"] >= 1 and result["all_removed_at_s"] is not None else 1


if __name__ == "__main__":
    sys.exit(main())
