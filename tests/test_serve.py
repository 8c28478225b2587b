"""The Serve endpoint (deployments/text_to_image.py) through the real `openai` client and raw HTTP,
and Serve autoscaling of the model deployment.

One local Ray cluster and one Serve instance for the module, holding every application the tests
need (see `deployed`). The tiny model is loaded from a checkpoint directory; everything runs on the CPU.
"""

import asyncio
import base64
import io
import json
import os
import re
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import boto3
import numpy as np
import openai
import pytest
import ray
import requests
import torch
import yaml
from PIL import Image
from ray import serve
from ray.serve import RunTarget
from ray.serve.handle import DeploymentHandle
from ray.serve.schema import ApplicationStatus

from conftest import _free_port
from deployments.text_to_image import AppArgs, ImageAPI, ImageModel, _Job, build_app
from socarrat import storage
from socarrat.config import MAX_PROMPT_CHARS, GenerationRequest, SamplerSpec
from socarrat.errors import UserError

REPO = Path(__file__).resolve().parents[1]
MAX_N, MAX_STEPS = 4, 200
SLOW_STEPS = 100  # about a second per image on this CPU: long enough to pile requests up behind it
# Serve autoscaling of the app `autoscale` (min 1, max 3 replicas): the load test's settings.
AUTOSCALING = {"min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 1, "upscale_delay_s": 0,
               "downscale_delay_s": 2, "look_back_period_s": 1}


@dataclass
class Served:
    base: str  # http://127.0.0.1:<port>/<route>
    store_uri: str | None

    def client(self) -> openai.OpenAI:
        # No retries: the client would otherwise retry 503s by itself, honouring Retry-After.
        return openai.OpenAI(base_url=f"{self.base}/v1", api_key="dummy", max_retries=0)


@pytest.fixture(scope="module")
def serve_port(s3_server: str):
    """Serve on a free loopback port. Ray starts after the S3 server, so replicas inherit its AWS_*
    settings; one logical GPU lets serve_config.yaml's `num_gpus: 1` replica be placed (on the CPU).
    Logical CPUs: one per model replica of the five apps with a model, three for `group`'s
    replica and its two Picard actors, and 1.5 for `autoscale`'s up to three half-CPU replicas."""
    ray.init(address="local", num_cpus=10, num_gpus=1, include_dashboard=False)
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        yield port
    finally:
        serve.shutdown()
        ray.shutdown()


@dataclass
class Deployed:
    main: Served
    tight: Served
    token: Served
    group: Served
    lone: Served
    missing_model: Path
    serve_run: subprocess.Popen  # `serve run` of a copy of serve_config.yaml
    serve_run_log: Path
    yaml_config: dict


@pytest.fixture(scope="module")
def deployed(serve_port: int, tiny_checkpoint: str, tiny_token_checkpoint: str, tmp_path_factory) -> Deployed:
    """Every application of this module, submitted at once: replicas starting up take most of its time.

    `main`: generous limits, PNG URLs on the moto S3 server. `tight`: one request in the replica, one
    queued, Picard always "busy", PNG URLs in a local folder. `token`: a token-family model, for image
    edits. `group`: Picard on a group of two CPU actors. `lone`: an ingress whose model is the app
    `solo` (which a test deletes), storing PNGs in a bucket that does not exist. `autoscale`: a model
    deployment alone, autoscaled (AUTOSCALING). `broken`: a model path that does not exist.
    `socarrat`: serve_config.yaml through the `serve run` command line.
    """
    tmp = tmp_path_factory.mktemp("serve")
    missing = tmp / "no-such-model"
    # The model deployment alone, and one attempt at starting it instead of Serve's three.
    broken = ImageModel.options(max_constructor_retry_count=1, ray_actor_options={"num_cpus": 0})
    serve.run_many([RunTarget(broken.bind(AppArgs(model_uri=str(missing))), "broken", None)],
                   wait_for_ingress_deployment_creation=False, wait_for_applications_running=False)
    config = _serve_config_copy(serve_port, tiny_checkpoint, tmp)
    log = tmp / "serve_run.log"
    with log.open("w") as out:  # a file, not a pipe: nobody reads a pipe until the test does
        serve_run = subprocess.Popen(
            [str(Path(sys.executable).with_name("serve")), "run", str(tmp / "serve_config.yaml"), "--non-blocking",
             "--address", ray.get_runtime_context().gcs_address], cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    bucket = f"serve-{uuid.uuid4().hex[:12]}"
    boto3.session.Session().client("s3").create_bucket(Bucket=bucket)
    limits = {"model_uri": tiny_checkpoint, "num_gpus": 0, "max_n": MAX_N, "max_steps": MAX_STEPS}
    main = AppArgs(store_uri=f"s3://{bucket}/served", **limits)
    tight = AppArgs(store_uri=str(tmp / "images"), max_ongoing_requests=1, max_queued_requests=1,
                    picard_max_ongoing=0, **limits)
    token = AppArgs(**{**limits, "model_uri": tiny_token_checkpoint})
    group = AppArgs(picard_actors=2, picard_gpus_per_actor=0, **limits)
    lone = AppArgs(store_uri=f"s3://{bucket}-missing/served", **limits)
    autoscale = ImageModel.options(ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=4,
                                   autoscaling_config=AUTOSCALING)
    autoscale_args = {**limits, "num_cpus": 0, "max_n": 1, "max_batch_images": 1, "max_ongoing_requests": 4}
    serve.run_many([RunTarget(build_app(main), "main", "/main"), RunTarget(build_app(tight), "tight", "/tight"),
                    RunTarget(build_app(token), "token", "/token"), RunTarget(build_app(group), "group", "/group"),
                    RunTarget(ImageModel.bind(lone), "solo", None),
                    RunTarget(ImageAPI.bind(DeploymentHandle("ImageModel", "solo"), lone), "lone", "/lone"),
                    RunTarget(autoscale.bind(AppArgs(**autoscale_args)), "autoscale", None)])
    url = f"http://127.0.0.1:{serve_port}"
    try:
        yield Deployed(Served(f"{url}/main", main.store_uri), Served(f"{url}/tight", tight.store_uri),
                       Served(f"{url}/token", None), Served(f"{url}/group", None), Served(f"{url}/lone", lone.store_uri),
                       missing, serve_run, log, config)
    finally:
        if serve_run.poll() is None:
            serve_run.kill()


def _serve_config_copy(port: int, model_uri: str, folder: Path) -> dict:
    """serve_config.yaml with this module's HTTP port, the tiny model and a local store, in `folder`."""
    config = yaml.safe_load((REPO / "deployments" / "serve_config.yaml").read_text())
    config["http_options"]["port"] = port  # Serve is already up on it; its HTTP options stay as they are
    config["applications"][0]["args"] |= {"model_uri": model_uri, "store_uri": str(folder / "yaml-images")}
    (folder / "serve_config.yaml").write_text(yaml.safe_dump(config))
    return config


@pytest.fixture(scope="module")
def main(deployed: Deployed) -> Served:
    return deployed.main


@pytest.fixture(scope="module")
def tight(deployed: Deployed) -> Served:
    return deployed.tight


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)), dtype=int)


def b64_pixels(response) -> list[np.ndarray]:
    return [pixels(base64.b64decode(d.b64_json)) for d in response.data]


def metadata(response) -> dict:
    return response.model_extra["metadata"]


def test_openai_client_gets_pngs_with_seeds_and_metadata(main: Served):
    client = main.client()
    long = "a blue square " + "and a green triangle " * 6  # more than the model's 24 tokens
    response = client.images.generate(prompt="a red circle", n=2, size="32x16",
                                      extra_body={"seed": 7, "steps": 3, "negative_prompt": long})
    images = [Image.open(io.BytesIO(base64.b64decode(d.b64_json))) for d in response.data]
    assert [(im.format, im.size) for im in images] == [("PNG", (32, 16))] * 2
    assert [d.model_extra["seed"] for d in response.data] == [7, 8]
    assert json.loads(images[1].text["socarrat"])["seed"] == 8
    a, b = b64_pixels(response)
    assert not np.array_equal(a, b)
    meta = metadata(response)
    assert meta["mode"] == "sequential" and meta["spec"]["steps"] == 3 and meta["spec"]["width_px"] == 32
    assert meta["timings"]["batch_size"] == 2 and meta["timings"]["total_s"] >= meta["timings"]["sample_s"] > 0
    assert (meta["prompt_truncated"], meta["negative_prompt_truncated"]) == (False, True)
    assert meta["precision"] == "fp32"  # auto, on the CPU
    [model] = client.models.list().data
    assert model.id == meta["model"] and model.model_extra["digest"] == meta["model_digest"]
    assert requests.get(f"{main.base}/healthz").json() == {"status": "ok", "model": model.id}


def test_concurrent_burst_equals_unbatched(main: Served):
    client = main.client()
    jobs = [("a red circle" if i % 3 else "a blue square", 100 + i, "16x16" if i % 2 else "32x32") for i in range(32)]

    def ask(job):
        prompt, seed, size = job
        return client.images.generate(prompt=prompt, size=size, extra_body={"seed": seed, "steps": 2})

    with ThreadPoolExecutor(len(jobs)) as pool:
        burst = list(pool.map(ask, jobs))
    alone = [ask(job) for job in jobs]
    assert max(metadata(r)["timings"]["batch_size"] for r in burst) > 1
    assert all(metadata(r)["timings"]["batch_size"] == 1 for r in alone)
    for together, by_itself, (_, seed, _) in zip(burst, alone, jobs):
        assert together.data[0].model_extra["seed"] == by_itself.data[0].model_extra["seed"] == seed
        [x], [y] = b64_pixels(together), b64_pixels(by_itself)
        assert np.abs(x - y).max() <= 1  # float reassociation across batch sizes
    assert not np.array_equal(b64_pixels(burst[0])[0], b64_pixels(burst[6])[0])  # same prompt and size


BAD_INPUT = [
    ('{"prompt": "x",', None),
    ('{"prompt": "café"}'.encode("latin-1"), None),
    ([], None),
    ({"n": 1}, "prompt"),
    ({"prompt": "  "}, "prompt"),
    ({"prompt": "cat \ud83d"}, "prompt"),  # json.dumps writes the lone surrogate as a \ud83d escape
    ({"prompt": "x", "negative_prompt": "\udc00 dog"}, "negative_prompt"),
    ({"prompt": "x" * (MAX_PROMPT_CHARS + 1)}, "prompt"),
    ({"prompt": "x", "negative_prompt": "x" * (MAX_PROMPT_CHARS + 1)}, "negative_prompt"),
    ({"prompt": "x", "n": 0}, "n"),
    ({"prompt": "x", "n": MAX_N + 1}, "n"),
    ({"prompt": "x", "size": "33x32"}, "size"),
    ({"prompt": "x", "size": "1024x1024"}, "size"),
    ({"prompt": "x", "size": "large"}, "size"),
    ({"prompt": "x", "sampler": "euler"}, "sampler"),
    ({"prompt": "x", "sampler": "paella"}, "sampler"),
    ({"prompt": "x", "steps": MAX_STEPS + 1}, "steps"),
    ({"prompt": "x", "steps": 0}, "steps"),
    ({"prompt": "x", "guidance_scale": -1}, "guidance_scale"),
    ('{"prompt": "x", "guidance_scale": 1e999}', "guidance_scale"),  # inf
    ({"prompt": "x", "seed": -1}, "seed"),
    ({"prompt": "x", "response_format": "png"}, "response_format"),
    ({"prompt": "x", "model": "dall-e-3"}, "model"),
    ({"prompt": "x", "quality": "hd"}, "quality"),
    ({"prompt": "x", "window": 4}, "window"),
    ({"prompt": "x", "picard": True, "window": 1000, "steps": MAX_STEPS, "n": MAX_N}, "window"),
    ({"prompt": "x", "timeout_s": 10**6}, "timeout_s"),
]


@pytest.mark.parametrize("body, param", BAD_INPUT, ids=[str(b)[:60] for b, _ in BAD_INPUT])
def test_bad_input_gets_400_naming_the_field(main: Served, body, param):
    raw = body if isinstance(body, (str, bytes)) else json.dumps(body)
    response = requests.post(f"{main.base}/v1/images/generations", data=raw,
                             headers={"Content-Type": "application/json"})
    assert response.status_code == 400
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert error["param"] == param
    if param:
        assert error["message"].startswith(f"{param}: ")


def test_unknown_routes_and_methods_get_openais_error_shape(main: Served):
    for path, status, reason in (("/v1/nothing", 404, "Not Found"), ("/v1/images/generations", 405, "Method Not Allowed")):
        response = requests.get(f"{main.base}{path}")
        error = response.json()["error"]
        assert response.status_code == status and error["type"] == "invalid_request_error"
        assert error["message"] == f"{reason}: GET {urlparse(main.base).path}{path}"  # the app's route prefix too
    assert response.headers["allow"] == "POST"


def test_bad_input_through_the_openai_client_and_the_replica_keeps_serving(main: Served):
    client = main.client()
    with pytest.raises(openai.BadRequestError) as err:
        client.images.generate(prompt="x", extra_body={"sampler": "paella"})
    assert err.value.param == "sampler" and "does not apply to the gaussian-family model" in err.value.message
    assert len(client.images.generate(prompt="x", extra_body={"steps": 2}).data) == 1


def test_nulls_mean_the_defaults_and_openais_user_field_is_accepted(main: Served):
    response = main.client().images.generate(prompt="x", n=None, size=None, response_format=None, model=None,
                                             user="someone", extra_body={"steps": 2})
    [image] = b64_pixels(response)
    assert image.shape == (32, 32, 3)
    assert (metadata(response)["spec"]["width_px"], metadata(response)["spec"]["height_px"]) == (32, 32)  # "auto"


@pytest.mark.parametrize("app", ["main", "tight"], ids=["s3", "local"])
def test_url_responses_land_in_the_object_store(request: pytest.FixtureRequest, app: str):
    served: Served = request.getfixturevalue(app)
    client, fields = served.client(), {"seed": 5, "steps": 2}
    by_url = client.images.generate(prompt="a blue square", response_format="url", extra_body=fields)
    by_value = client.images.generate(prompt="a blue square", extra_body=fields)
    url = by_url.data[0].url
    if app == "main":  # S3: a presigned HTTP(S) URL that needs no credentials
        bucket = served.store_uri.removeprefix("s3://").split("/")[0]
        assert re.match(rf"{os.environ['AWS_ENDPOINT_URL']}/{bucket}/served/[0-9a-f]{{32}}/0\.png\?", url) and "Signature=" in url
        assert requests.get(url).status_code == 200
        got = requests.get(url).content
        assert requests.get(url.split("?")[0]).status_code == 403  # the object itself is not public
    else:
        assert re.fullmatch(rf"{storage.open_store(served.store_uri).uri}/[0-9a-f]{{32}}/0\.png", url)
        got = storage.read_bytes(url)
    assert np.array_equal(pixels(got), b64_pixels(by_value)[0])


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def test_token_model_serves_paella_and_edits_through_the_openai_client(deployed: Deployed):
    client = deployed.token.client()
    made = client.images.generate(prompt="a red circle", extra_body={"seed": 1})
    assert metadata(made)["spec"]["sampler"] == "paella" and metadata(made)["spec"]["steps"] == 12
    source = base64.b64decode(made.data[0].b64_json)
    opaque, clear = Image.new("RGBA", (32, 32), (0, 0, 0, 255)), Image.new("RGBA", (32, 32), (0, 0, 0, 0))

    def edit(mask: Image.Image, **fields):
        return client.images.edit(image=("src.png", source), mask=("mask.png", png(mask)), prompt="a blue square",
                                  extra_body=fields)

    for start_step in (0, 3):  # nothing marked
        with pytest.raises(openai.BadRequestError, match="would change nothing"):
            edit(opaque, start_step=start_step)
    fresh = [b64_pixels(edit(clear, seed=s))[0] for s in (1, 2)]  # all marked: a new image per seed
    assert not np.array_equal(*fresh)
    half = Image.new("RGBA", (32, 32), (0, 0, 0, 255))
    half.paste((0, 0, 0, 0), (0, 0, 16, 32))
    sequential = edit(half, seed=4, start_step=3)
    picard = edit(half, seed=4, start_step=3, picard=True, window=4)
    assert np.array_equal(b64_pixels(sequential)[0], b64_pixels(picard)[0]) and metadata(picard)["picard"]["rounds"] <= 9
    paletted = Image.new("P", (32, 32), 1)  # the same mask with its transparency in the palette (PNG tRNS)
    paletted.putpalette([0, 0, 0, 255, 255, 255])
    paletted.paste(0, (0, 0, 16, 32))
    paletted.info["transparency"] = 0
    assert np.array_equal(b64_pixels(edit(paletted, seed=4, start_step=3))[0], b64_pixels(sequential)[0])
    wide = Image.new("RGBA", (48, 32), (0, 0, 0, 0))  # outpainting: the transparent border is painted
    wide.paste(Image.open(io.BytesIO(source)).convert("RGBA"), (8, 0))
    grown = client.images.edit(image=("wide.png", png(wide)), prompt="a blue square", n=2)
    assert [Image.open(io.BytesIO(base64.b64decode(d.b64_json))).size for d in grown.data] == [(48, 32)] * 2


@pytest.mark.parametrize("files, fields, param, message", [
    ({}, {"prompt": "x"}, "image", "an image file is required"),
    ({"image": b"not a png"}, {"prompt": "x"}, None, "not a readable image"),
    ({"image": "32x32", "mask": "16x16"}, {"prompt": "x"}, None, "the mask is 16x16"),
    ({"image": "32x32"}, {"prompt": "x", "size": "16x16"}, None, "differs from the image's 32x32"),
    ({"image": "30x32"}, {"prompt": "x"}, "size", "the image is 30x32, but edits need each side a multiple of 8"),
    ({"image": "32x32"}, {"prompt": "x", "start_step": "12"}, None, "start_step must be below steps (12)"),
    ({"image": "32x32"}, {"prompt": "x", "sampler": "ddim"}, "sampler", "does not apply"),
])
def test_bad_edits_get_400(deployed: Deployed, files, fields, param, message):
    encoded = {k: (f"{k}.png", v if isinstance(v, bytes) else png(Image.new("RGBA", tuple(map(int, v.split("x"))))))
               for k, v in files.items()}
    response = requests.post(f"{deployed.token.base}/v1/images/edits", files=encoded, data=fields)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert message in error["message"] and (param is None or error["param"] == param)


def test_edits_need_a_token_model(main: Served):
    response = requests.post(f"{main.base}/v1/images/edits", files={"image": ("i.png", png(Image.new("RGB", (32, 32))))},
                             data={"prompt": "x"})
    assert response.status_code == 400 and "token-family model" in response.json()["error"]["message"]


def test_picard_in_replica_matches_sequential(main: Served):
    client, fields = main.client(), {"seed": 3, "steps": 8, "sampler": "ddpm"}
    picard = client.images.generate(prompt="x", extra_body={**fields, "picard": True, "window": 4, "tolerance": 0.0})
    sequential = client.images.generate(prompt="x", extra_body=fields)
    assert metadata(picard)["mode"] == "picard-replica" and metadata(sequential)["mode"] == "sequential"
    assert metadata(picard)["picard"]["rounds"] >= 2 and metadata(sequential).get("picard") is None
    assert np.abs(b64_pixels(picard)[0] - b64_pixels(sequential)[0]).max() <= 1


SEQUENTIAL_FIELDS = {"seed": 3, "steps": 8, "sampler": "ddpm"}
PICARD_FIELDS = {**SEQUENTIAL_FIELDS, "picard": True, "window": 4, "tolerance": 0.0}


def test_picard_on_an_actor_group_matches_in_replica_and_sequential(deployed: Deployed):
    client = deployed.group.client()
    grouped = client.images.generate(prompt="x", extra_body=PICARD_FIELDS)
    sequential = client.images.generate(prompt="x", extra_body=SEQUENTIAL_FIELDS)
    in_replica = deployed.main.client().images.generate(prompt="x", extra_body=PICARD_FIELDS)
    assert metadata(grouped)["mode"] == "picard-group" and metadata(in_replica)["mode"] == "picard-replica"
    assert metadata(grouped)["picard"]["rounds"] >= 2
    for other in (in_replica, sequential):  # float rounding: the actors evaluate other batch sizes
        assert np.abs(b64_pixels(grouped)[0] - b64_pixels(other)[0]).max() <= 1


def _picard_actors() -> list[tuple[str, str]]:
    """(name, namespace) of the Picard actors alive in the cluster: those of the `group` app's replica."""
    named = ray.util.list_named_actors(all_namespaces=True)
    return sorted((a["name"], a["namespace"]) for a in named if a["name"].startswith("picard-"))


def test_lost_group_actor_gets_503_and_the_group_replaces_it(deployed: Deployed):
    client = deployed.group.client()
    before = client.images.generate(prompt="x", extra_body=PICARD_FIELDS)
    victim, survivor = _picard_actors()
    ray.kill(ray.get_actor(*victim), no_restart=True)
    with pytest.raises(openai.APIStatusError) as err:
        client.images.generate(prompt="x", extra_body=PICARD_FIELDS)
    assert err.value.status_code == 503 and err.value.code == "worker_lost" and err.value.type == "server_error"
    assert err.value.response.headers["Retry-After"] == "1" and "retry it" in err.value.message
    after = client.images.generate(prompt="x", extra_body=PICARD_FIELDS)
    assert metadata(after)["mode"] == "picard-group"
    assert np.array_equal(b64_pixels(after)[0], b64_pixels(before)[0])
    actors = _picard_actors()
    assert len(actors) == 2 and survivor in actors and victim not in actors


def test_busy_replica_falls_back_to_batched_sequential(tight: Served):
    client, fields = tight.client(), {"seed": 3, "steps": 8, "sampler": "ddpm"}
    picard = client.images.generate(prompt="x", extra_body={**fields, "picard": True, "window": 4})
    sequential = client.images.generate(prompt="x", extra_body=fields)
    assert metadata(picard)["mode"] == "sequential-busy" and metadata(picard)["spec"]["picard"] is False
    assert np.array_equal(b64_pixels(picard)[0], b64_pixels(sequential)[0])


def test_overload_beyond_the_queue_gets_503_and_the_admitted_requests_their_images(tight: Served):
    client = tight.client()

    def ask(seed: int) -> int | openai.APIStatusError:
        try:
            return len(client.images.generate(prompt="x", extra_body={"seed": seed, "steps": SLOW_STEPS}).data)
        except openai.APIStatusError as err:
            return err

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, range(8)))
    rejected = [a for a in answers if isinstance(a, openai.APIStatusError)]
    admitted = [a for a in answers if not isinstance(a, openai.APIStatusError)]
    assert rejected and admitted and set(admitted) == {1}  # one image each
    for err in rejected:  # "overloaded" is the model queue's refusal on arrival, not a wait that timed out
        assert err.status_code == 503 and err.code == "overloaded" and err.type == "server_error"
        assert err.response.headers["Retry-After"] == "1"


def test_request_timeout_gets_504_and_the_replica_keeps_serving(tight: Served):
    client = tight.client()
    with pytest.raises(openai.APIStatusError) as err:  # a microsecond is shorter than any round trip to the model
        client.images.generate(prompt="x", extra_body={"steps": 2, "timeout_s": 1e-6})
    assert err.value.status_code == 504 and err.value.code == "timeout"
    assert len(client.images.generate(prompt="x", extra_body={"steps": 2}).data) == 1


def test_server_failures_get_500_in_openais_error_shape(deployed: Deployed):
    with pytest.raises(openai.InternalServerError) as err:  # the bucket for the PNGs does not exist
        deployed.lone.client().images.generate(prompt="x", response_format="url", extra_body={"steps": 2})
    assert err.value.status_code == 500 and err.value.type == "server_error"


def test_healthz_asks_the_model_each_time(deployed: Deployed):
    healthz = f"{deployed.lone.base}/healthz"
    assert requests.get(healthz).json()["status"] == "ok"
    serve.delete("solo")  # every model replica gone
    response = requests.get(healthz)
    # 503 once the ingress hears of the deletion; a request it already queued for a replica times out
    assert response.status_code in (503, 504) and response.json()["error"]["type"] == "server_error"


def test_requests_arriving_during_a_model_call_share_the_next_one(tiny_checkpoint: str):
    replica = ImageModel.func_or_class(AppArgs(model_uri=tiny_checkpoint, num_gpus=0))

    def request(seed: int) -> GenerationRequest:
        return GenerationRequest(prompts=["x"], seeds=[seed], spec=SamplerSpec(steps=2))

    async def scenario() -> list:
        first = asyncio.create_task(replica.generate(request(0)))
        while not replica.queue:  # the first request is queued ...
            await asyncio.sleep(0)
        while replica.queue:  # ... and taken: its model call runs in a thread now
            await asyncio.sleep(0)
        cancelled = asyncio.create_task(replica.generate(request(1)))
        rest = [asyncio.create_task(replica.generate(request(seed))) for seed in (2, 3, 4)]
        await asyncio.sleep(0)
        cancelled.cancel()
        return await asyncio.gather(first, *rest)

    answers = asyncio.run(scenario())
    assert [a.metadata.timings["batch_size"] for a in answers] == [1, 3, 3, 3]
    assert [a.results[0].metadata["seed"] for a in answers] == [0, 2, 3, 4]


def test_a_picard_request_reports_its_own_rounds_and_evaluations_in_a_shared_call(tiny_checkpoint: str):
    replica = ImageModel.func_or_class(AppArgs(model_uri=tiny_checkpoint, num_gpus=0))
    spec = SamplerSpec(sampler="ddpm", steps=12, picard=True, window=4)

    def job(prompts: list[str], seeds: list[int]) -> _Job:
        return _Job(GenerationRequest(prompts=prompts, seeds=seeds, spec=spec), "picard-replica", 0.0, answer=None)

    mine = job(["a red circle", "a red circle"], [1, 2])
    [alone] = replica._run(spec, [mine])
    shared, _ = replica._run(spec, [mine, job(["two blue squares", "a green triangle"], [3, 4])])
    assert shared.metadata.timings["batch_size"] == 4 and shared.metadata.picard == alone.metadata.picard
    assert alone.metadata.picard["evaluations"] == sum(r.metadata["picard"]["evaluations"] for r in alone.results)


def test_a_model_call_holds_at_most_max_batch_images_counting_picard_windows_and_never_stalls(tiny_checkpoint: str):
    replica = ImageModel.func_or_class(AppArgs(model_uri=tiny_checkpoint, num_gpus=0, max_batch_images=8))
    loop = asyncio.new_event_loop()

    def queue(*jobs: tuple[int, SamplerSpec]) -> None:
        replica.queue.extend(_Job(GenerationRequest(prompts=["x"] * n, seeds=list(range(n)), spec=spec), "sequential",
                                  0.0, loop.create_future()) for n, spec in jobs)

    picard = SamplerSpec(sampler="ddpm", steps=12, picard=True, window=4)  # 4 states per image each round
    queue((1, picard), (1, picard), (1, picard))
    assert len(replica._take_batch()) == 2 and len(replica.queue) == 1  # 8 states: a third would make 12
    replica.queue.clear()
    queue((1, picard.model_copy(update={"steps": 2})), (1, picard), (2, SamplerSpec(steps=2)))
    assert len(replica._take_batch()) == 3  # a round of 2 steps holds 2 states, not the window's 4: 2 + 4 + 2
    replica.queue.clear()
    queue((12, SamplerSpec(steps=2)), (1, SamplerSpec(steps=2)))  # over the cap: a caller bypassed the ingress
    assert [len(job.request.prompts) for job in replica._take_batch()] == [12]  # taken alone, not stuck at the head
    loop.close()


def test_check_health_reports_non_finite_weights(tiny_checkpoint: str):
    replica = ImageModel.func_or_class(AppArgs(model_uri=tiny_checkpoint, num_gpus=0))
    replica.check_health()
    with torch.no_grad():
        next(replica.generator.model.parameters()).fill_(float("nan"))
    with pytest.raises(RuntimeError, match="non-finite weights"):
        replica.check_health()


def test_builder_args_from_the_command_line_are_validated():
    assert AppArgs.model_validate({"num_gpus": "0", "max_n": "2"}).num_gpus == 0
    with pytest.raises(ValueError, match="max_n=32 exceeds max_batch_images=16"):
        AppArgs.model_validate({"max_n": "32"})
    with pytest.raises(ValueError, match="num_gpu"):
        AppArgs.model_validate({"num_gpu": "0"})
    with pytest.raises(ValueError, match="precision"):
        AppArgs.model_validate({"precision": "fp16"})
    with pytest.raises(UserError, match=r"^unknown model 'shapes-gausian': not a path, not an s3:// URI, and not bundled"):
        build_app(AppArgs(model_uri="shapes-gausian"))  # at build time: `serve run` stops with it


def test_a_bf16_replica_computes_and_reports_bf16(tiny_checkpoint: str):
    replica = ImageModel.func_or_class(AppArgs(model_uri=tiny_checkpoint, num_gpus=0, precision="bf16"))
    spec = SamplerSpec(steps=3)
    [answer] = replica._run(spec, [_Job(GenerationRequest(prompts=["a red circle"], seeds=[1], spec=spec),
                                        "sequential", 0.0, answer=None)])
    assert answer.metadata.precision == "bf16" and replica.generator.precision == "bf16"


def _wait_until_deployed(name: str, timeout_s: float = 150) -> ApplicationStatus:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        app = serve.status().applications.get(name)
        if app and app.status not in (ApplicationStatus.NOT_STARTED, ApplicationStatus.DEPLOYING):
            return app.status
        time.sleep(0.5)  # polling Serve's own status: it offers no event to wait on
    return ApplicationStatus.DEPLOYING


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


def test_autoscaled_replicas_follow_the_load(deployed: Deployed):
    """The model deployment grows past 1 replica under load and shrinks back to 1 once it is gone."""
    handle = serve.get_deployment_handle("ImageModel", "autoscale")
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


def test_missing_model_fails_to_deploy_naming_the_path(deployed: Deployed):
    try:
        assert _wait_until_deployed("broken") == ApplicationStatus.DEPLOY_FAILED
        model = serve.status().applications["broken"].deployments["ImageModel"]
        assert f"NotFoundError: no checkpoint at {deployed.missing_model}" in model.message
    finally:
        serve.delete("broken")


def test_serve_config_yaml_deploys_with_serve_run(deployed: Deployed, serve_port: int):
    returncode = deployed.serve_run.wait(timeout=120)
    [app] = deployed.yaml_config["applications"]
    try:
        assert returncode == 0, deployed.serve_run_log.read_text()[-3000:]
        # Scaling down lets requests in flight finish: both deployments wait up to request_timeout_s for the model.
        assert all(d["graceful_shutdown_timeout_s"] > app["args"]["request_timeout_s"] for d in app["deployments"])
        assert _wait_until_deployed(app["name"]) == ApplicationStatus.RUNNING, serve.status().applications[app["name"]]
        served = Served(f"http://127.0.0.1:{serve_port}", app["args"]["store_uri"])
        response = served.client().images.generate(prompt="x", response_format="url", extra_body={"steps": 2})
        assert pixels(storage.read_bytes(response.data[0].url)).shape == (32, 32, 3)
    finally:
        serve.delete(app["name"])
