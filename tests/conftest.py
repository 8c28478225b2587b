"""Shared fixtures: a real S3 API server (moto) on loopback, fresh buckets, and one base URI per backend."""

import socket
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

_PLATFORM = str(Path(__file__).resolve().parents[1] / "platform")
if _PLATFORM not in sys.path:
    sys.path.insert(0, _PLATFORM)

from socarrat.config import ModelSpec  # noqa: E402  (after the path set-up above)

# The tiny Gaussian model of most tests: two levels, attention at the lower one, a 1-layer text tower.
TINY_SPEC = ModelSpec(channels=(16, 32), attention_levels=(1,), heads=2,
                      text={"width": 32, "embed_dim": 8, "layers": 1, "heads": 2})


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """A moto S3 server speaking HTTP on 127.0.0.1; boto3 finds it through AWS_ENDPOINT_URL."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    with pytest.MonkeyPatch.context() as env:
        env.setenv("AWS_ACCESS_KEY_ID", "testing")
        env.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        env.setenv("AWS_DEFAULT_REGION", "us-east-1")
        env.setenv("AWS_ENDPOINT_URL", endpoint)
        env.delenv("AWS_PROFILE", raising=False)
        env.delenv("AWS_SESSION_TOKEN", raising=False)
        try:
            yield endpoint
        finally:
            server.stop()


@pytest.fixture
def s3_bucket(s3_server: str) -> str:
    """A fresh, empty bucket on the moto server, as `s3://<bucket>`."""
    import boto3

    bucket = f"test-{uuid.uuid4().hex[:16]}"
    boto3.session.Session().client("s3").create_bucket(Bucket=bucket)
    return f"s3://{bucket}"


@pytest.fixture(params=["local", "s3"])
def store_uri(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty base URI on each backend, so one test checks that S3 == local."""
    if request.param == "local":
        return str(tmp_path / "store")
    return request.getfixturevalue("s3_bucket") + "/prefix"


def _randomise(model):
    """Re-draw every zero-initialised tensor so a random model's output depends on its inputs."""
    import torch

    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1 and not p.any():
                p.normal_(0, 0.2)
    return model


def _tiny(spec):
    """A seeded random model of `spec` whose output depends on every input (see `_randomise`)."""
    import torch

    from socarrat.models import build_model

    torch.manual_seed(0)
    return _randomise(build_model(spec)).eval()


def _saved(model, tmp_path_factory, name: str) -> str:
    """`model` saved as a checkpoint directory, for code that loads models by URI."""
    from socarrat.checkpoint import save_checkpoint

    path = tmp_path_factory.mktemp("checkpoints") / name
    save_checkpoint(model, str(path))
    return str(path)


@pytest.fixture(scope="session")
def tiny_model():
    """A tiny Gaussian model with random (non-zero) weights: fast, and sensitive to every input."""
    return _tiny(TINY_SPEC)


@pytest.fixture(scope="session")
def tiny_generator(tiny_model):
    from socarrat.generator import Generator

    return Generator(tiny_model, digest="0" * 64, name="tiny-test", device="cpu")


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_model, tmp_path_factory) -> str:
    return _saved(tiny_model, tmp_path_factory, "tiny")


@pytest.fixture(scope="session")
def tiny_token_model():
    """A tiny token-family model (VQ + denoiser, 32 px -> 8x8 tokens) with random non-zero weights."""
    from socarrat.config import ModelSpec

    return _tiny(ModelSpec(family="token", size_px=32, channels=(16, 32), attention_levels=(1,), heads=2,
                           token={"codebook_size": 16, "vq_channels": (8, 16), "embed_dim": 8},
                           text={"width": 32, "embed_dim": 8, "layers": 1, "heads": 2}))


@pytest.fixture(scope="session")
def token_generator(tiny_token_model):
    from socarrat.generator import Generator

    return Generator(tiny_token_model, digest="1" * 64, name="tiny-token", device="cpu")


@pytest.fixture(scope="session")
def tiny_token_checkpoint(tiny_token_model, tmp_path_factory) -> str:
    return _saved(tiny_token_model, tmp_path_factory, "tiny-token")


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a module: tiny models run fastest so, and leave the other cores alone."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
