"""Watch Ray's autoscaler add GPU worker nodes for a generation job and remove them when idle.

    python -m benchmarks.autoscale_local [--prompts examples/prompts.txt] [--out benchmarks/results/autoscale_local.json]

Starts a one-machine cluster with Ray's fake multi-node provider (`cluster-local.yaml`: a head with
1 CPU for Ray Data's read tasks, and up to two fake worker nodes advertising {CPU: 1, GPU: 1}),
runs `jobs.generate --num-gpus-per-worker 1 --min-workers 2 --max-workers 2` against it, and
samples the number of live GPU nodes every second until the job has ended and its nodes are gone.
Prints the timeline with the autoscaler's own event lines and writes it all as JSON.

The cluster uses the GCS's default port 6379 (fake worker nodes connect there): the script refuses
to start if a Ray head already listens there. At the end it stops only the processes of the
cluster it started (those whose command line names its session or its GCS address), never other
Ray instances.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from socarrat.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
GCS_PORT = 6379


def gpu_nodes() -> int:
    import ray

    return sum(1 for n in ray.nodes() if n["Alive"] and n["Resources"].get("GPU", 0) > 0)


def _port_in_use(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _cluster_pids(marks: list[str]) -> list[int]:
    """Processes of one Ray cluster: Ray puts the session directory or the GCS address on the command
    line of every process it starts."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes() if proc.name.isdigit() else b""
        except OSError:
            continue
        if any(mark.encode() in cmdline for mark in marks):
            pids.append(int(proc.name))
    return pids


def stop_cluster(session_dir: str, gcs_address: str, timeout_s: float = 15.0) -> None:
    """SIGTERM, then SIGKILL, the processes of this cluster only (`ray stop` would kill every Ray
    instance on the machine, other people's included)."""
    marks = [session_dir, gcs_address]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in _cluster_pids(marks):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + timeout_s
        while _cluster_pids(marks) and time.monotonic() < deadline:
            time.sleep(0.2)
        if not _cluster_pids(marks):
            break
    # `ray start` records its address here for address="auto"; `ray stop` would remove it.
    current = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
    if current.exists() and current.read_text().strip() == gcs_address:
        current.unlink()


def autoscaler_events(session_dir: str) -> list[str]:
    """The autoscaler's one-line summaries ("Adding 2 node(s) of type gpu_worker.", ...)."""
    log = Path(session_dir) / "logs" / "monitor.log"
    lines = log.read_text(errors="replace").splitlines() if log.exists() else []
    return [line.split("\t", 1)[0][11:19] + "  " + line.split(":event_summary:", 1)[1]
            for line in lines if ":event_summary:" in line]


def idle_removals(events: list[str]) -> int:
    """GPU worker nodes the autoscaler's event summaries say it removed for being idle."""
    return sum(int(m.group(1)) for e in events if (m := re.search(r"Removing (\d+) nodes of type gpu_worker \(idle\)", e)))


def _removal_logged(session_dir: str, nodes: int, timeout_s: float = 20.0) -> list[str]:
    """The events once they record `nodes` idle removals: the monitor writes its summary a moment
    after the nodes are gone from the cluster's state (or whatever is logged by `timeout_s`)."""
    deadline = time.monotonic() + timeout_s
    while idle_removals(events := autoscaler_events(session_dir)) < nodes and time.monotonic() < deadline:
        time.sleep(0.5)
    return events


def run(prompts: str, timeout_s: float = 240.0) -> dict:
    """Start the fake cluster, run the job, record the GPU-node timeline; always stops the cluster."""
    import ray

    if _port_in_use(GCS_PORT):
        raise UserError(f"port {GCS_PORT} is taken (a Ray head already runs here?): the fake cluster needs it")
    tmp = Path(tempfile.mkdtemp(prefix="socarrat-autoscale-"))
    (tmp / "cluster.json").write_text(json.dumps(yaml.safe_load((ROOT / "cluster-local.yaml").read_text())))
    env = {**os.environ, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"}
    ray_bin = str(Path(sys.executable).parent / "ray")
    subprocess.run([ray_bin, "start", "--head", f"--port={GCS_PORT}", "--num-cpus=1", "--include-dashboard=false",
                    f"--autoscaling-config={tmp / 'cluster.json'}"], env=env, check=True, capture_output=True)
    ray_dir = Path(tempfile.gettempdir()) / "ray"
    gcs_address = (ray_dir / "ray_current_cluster").read_text().strip()
    session_dir = str((ray_dir / "session_latest").resolve())
    timeline, t0 = [], time.monotonic()
    try:
        # "auto" (the address `ray start` recorded): given the address itself, ray.init failed here
        # with InvalidAuthToken (Ray 2.60, token auth on by default).
        ray.init(address="auto", logging_level="ERROR")
        # The job's output goes to a file: Ray Data logs its progress to a non-interactive stdout,
        # and an undrained pipe fills up and blocks the job.
        with open(tmp / "job.log", "w") as job_log:
            job = subprocess.Popen(
                [sys.executable, "-m", "jobs.generate", "--prompts", prompts, "--out", str(tmp / "out"),
                 "--steps", "4", "--batch-size", "4", "--shard-size", "4",
                 "--num-gpus-per-worker", "1", "--min-workers", "2", "--max-workers", "2"],
                cwd=ROOT, env={**env, "RAY_ADDRESS": "auto"}, stdout=job_log, stderr=subprocess.STDOUT)
            job_end = _watch(job, timeline, t0, timeout_s)
        if job_end is None:
            job.kill()
            job.wait()
        events = _removal_logged(session_dir, max(p["gpu_nodes"] for p in timeline)) if job_end else autoscaler_events(session_dir)
    finally:
        ray.shutdown()
        stop_cluster(session_dir, gcs_address)
    peak = max(p["gpu_nodes"] for p in timeline)
    up = next((p["t_s"] for p in timeline if p["gpu_nodes"] == peak), None)
    down = next((p["t_s"] for p in timeline if job_end and p["t_s"] >= job_end and p["gpu_nodes"] == 0), None)
    summary = tmp / "out" / "summary.json"
    return {"images_generated": json.loads(summary.read_text())["images_generated"] if summary.exists() else 0,
            "peak_gpu_nodes": peak, "peak_at_s": up, "job_exit_code": job.returncode, "job_end_s": job_end,
            "all_removed_at_s": down, "autoscaler_events": events, "timeline": timeline,
            "job_output_tail": (tmp / "job.log").read_text(errors="replace")[-1500:]}


def _watch(job: subprocess.Popen, timeline: list[dict], t0: float, timeout_s: float) -> float | None:
    """Sample GPU nodes each second until the job has ended and they are all gone; returns the job's end."""
    job_end = None
    while time.monotonic() - t0 < timeout_s:
        now = time.monotonic() - t0
        if job_end is None and job.poll() is not None:
            job_end = round(now, 1)
        timeline.append({"t_s": round(now, 1), "gpu_nodes": gpu_nodes(), "job_running": job_end is None})
        if job_end is not None and timeline[-1]["gpu_nodes"] == 0:
            break
        time.sleep(1)
    return job_end


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", default=str(ROOT / "examples" / "prompts.txt"))
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "autoscale_local.json"))
    p.add_argument("--timeout-s", type=float, default=240.0)
    args = p.parse_args()
    try:
        result = run(args.prompts, args.timeout_s)
    except UserError as err:
        print(f"autoscale_local: error: {err}", file=sys.stderr)
        return 2
    print(f"{'t (s)':>6} {'GPU nodes':>9}  job")
    last = None
    for point in result["timeline"]:
        if (point["gpu_nodes"], point["job_running"]) != last:
            print(f"{point['t_s']:>6} {point['gpu_nodes']:>9}  {'running' if point['job_running'] else 'done'}")
            last = (point["gpu_nodes"], point["job_running"])
    print("\nautoscaler events (wall clock):", *result["autoscaler_events"], sep="\n  ")
    print(f"\npeak {result['peak_gpu_nodes']} GPU nodes at {result['peak_at_s']} s; job ended at {result['job_end_s']} s "
          f"(exit {result['job_exit_code']}); all GPU nodes gone at {result['all_removed_at_s']} s")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    ok = result["peak_gpu_nodes"] >= 1 and result["job_exit_code"] == 0 and result["all_removed_at_s"] is not None
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
