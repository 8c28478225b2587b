"""Serve autoscaling (min 1, max 3 replicas): under load the model deployment grows past 1 replica, and shrinks
back to 1 once the load is gone. Real Ray and Serve on the CPU, tiny model."""

import asyncio
import time

import pytest
import ray
from ray import serve

from deployments.text_to_image import AppArgs, ImageModel
from socarrat.config import GenerationRequest, SamplerSpec

AUTOSCALING = {"min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 1, "upscale_delay_s": 0,
               "downscale_delay_s": 2, "look_back_period_s": 1}


def running_replicas() -> int:
    status = serve.status().applications["autoscale"].deployments["ImageModel"]
    return status.replica_states.get("RUNNING", 0)


def wait_for(condition, timeout_s: float, what: str) -> float:
    """Poll `condition` until true; returns the seconds it took (fails the test at the timeout)."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout_s:
            pytest.fail(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.5)
    return time.monotonic() - start


@pytest.fixture(scope="module")
def handle(tiny_checkpoint):
    args = AppArgs(model_uri=tiny_checkpoint, num_gpus=0, num_cpus=0, max_n=1, max_batch_images=1, max_ongoing_requests=4)
    model = ImageModel.options(ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=4,
                               autoscaling_config=AUTOSCALING).bind(args)
    ray.init(address="local", num_cpus=3, include_dashboard=False)
    try:
        yield serve.run(model, name="autoscale", route_prefix=None)
    finally:
        serve.shutdown()
        ray.shutdown()


def test_replicas_follow_the_load(handle):
    assert running_replicas() == 1
    request = GenerationRequest(prompts=["a red circle"], seeds=[0], spec=SamplerSpec(steps=40))

    async def load(stop: asyncio.Event) -> int:
        """Keep 12 requests in flight until `stop`; returns how many were answered."""
        answered = 0

        async def client():
            nonlocal answered
            while not stop.is_set():
                await handle.generate.remote(request)
                answered += 1

        await asyncio.gather(*(client() for _ in range(12)))
        return answered

    async def scenario() -> tuple[int, int]:
        stop = asyncio.Event()
        task = asyncio.create_task(load(stop))
        start, peak = time.monotonic(), 1
        while time.monotonic() - start < 120 and peak < 2:
            await asyncio.sleep(0.5)
            peak = max(peak, running_replicas())
        stop.set()
        return peak, await task

    t0 = time.monotonic()
    peak, answered = asyncio.run(scenario())
    print(f"peak {peak} replicas, {answered} answered, load phase {time.monotonic() - t0:.1f} s")
    assert peak >= 2 and answered > 0, (peak, answered)
    down_s = wait_for(lambda: running_replicas() == 1, 120, "scale-down to 1 replica")
    print(f"back to 1 replica {down_s:.1f} s after the load stopped")
