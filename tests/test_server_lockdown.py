"""The server fails closed: the proxy hooks that bind the configured address replace private Ray Serve
functions, so they run only on the Ray versions they were tested on, and the server serves only once every
proxy has reported them in place with the configured address. A missing hook, an untested Ray, or a Serve
that already runs without the hooks: nothing is served and the error says why. Stopping removes only our
application."""

import re
from pathlib import Path

import grpc
import pytest
import ray
from ray import serve

import serving.deployment as deployment
import serving.proxy_hooks as proxy_hooks
from bench.common import free_port
from quantizer.errors import ConfigError
from serving.client import GenerationClient
from serving.config import ServeConfig
from serving.proxy_hooks import TESTED_RAY_VERSIONS, listening_addresses, private_api_problem
from tests.test_serving import quantized_tiny  # noqa: F401  (module fixture)


def config_for(model, **settings) -> ServeConfig:
    return ServeConfig(model=str(model), engine="transformers", grpc_port=free_port(), http_port=free_port(),
                       autoscaling={"min_replicas": 1, "max_replicas": 1}, **settings)


def test_pyproject_admits_only_the_ray_the_hooks_were_tested_on():
    text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    pins = re.findall(r'"ray\[serve\]==([0-9.]+)"', text)
    assert pins and set(pins) <= set(TESTED_RAY_VERSIONS) and ray.__version__ in TESTED_RAY_VERSIONS


def test_hooks_refuse_an_untested_ray(monkeypatch):
    from ray.serve._private import default_impl, proxy

    assert private_api_problem() is None  # the pinned Ray
    assert "Ray 2.61.0 is not a version" in private_api_problem("2.61.0")
    monkeypatch.setattr(ray, "__version__", "2.61.0")
    before = (default_impl.add_grpc_address, proxy.get_grpc_response_status)
    with pytest.raises(RuntimeError, match="rayquant proxy hooks refused: Ray 2.61.0"):
        proxy_hooks.install()
    assert (default_impl.add_grpc_address, proxy.get_grpc_response_status) == before  # nothing patched
    with pytest.raises(ConfigError, match="refusing to serve: Ray 2.61.0"):
        deployment.start_server(config_for("unused"))


def test_a_missing_hook_refuses_to_serve(quantized_tiny, ray_local, monkeypatch):  # noqa: F811
    """The proxies start without the callback (as if the hook had been dropped): the server refuses, and
    nothing listens on the port afterwards."""
    monkeypatch.setattr(deployment, "proxy_env", lambda host: {})
    monkeypatch.setattr(deployment, "LOCKDOWN_WAIT_S", 5.0)  # proxies without hooks never report them
    config = config_for(quantized_tiny)
    with pytest.raises(ConfigError, match="not locked down .*has no rayquant hooks"):
        deployment.start_server(config)
    assert listening_addresses(config.grpc_port) == set()
    assert not serve.status().applications


def test_serve_already_running_without_hooks_is_refused(quantized_tiny, ray_local):  # noqa: F811
    from ray.serve.config import gRPCOptions

    from serving.config import GRPC_SERVICER_FUNCTIONS

    config = config_for(quantized_tiny)
    serve.start(http_options={"host": "127.0.0.1", "port": config.http_port},
                grpc_options=gRPCOptions(port=config.grpc_port, grpc_servicer_functions=GRPC_SERVICER_FUNCTIONS))
    try:
        with pytest.raises(ConfigError, match="Serve already runs on this cluster without rayquant's proxy hooks"):
            deployment.start_server(config)
        assert config.app_name not in serve.status().applications
    finally:
        serve.shutdown()


@serve.deployment
class Other:
    def __call__(self, request) -> str:
        return "other"


def test_stopping_removes_only_our_application(quantized_tiny, ray_local):  # noqa: F811
    config = config_for(quantized_tiny)
    started = deployment.start_server(config)
    try:
        assert started and listening_addresses(config.grpc_port) == {"127.0.0.1"}
        serve.run(Other.bind(), name="other", route_prefix="/other")
        client = GenerationClient(f"127.0.0.1:{config.grpc_port}", application=config.app_name)
        assert client.generate("hi", max_new_tokens=2, temperature=0).usage.completion_tokens >= 1
        client.close()
        deployment.stop_server(config, started)
        assert set(serve.status().applications) == {"other"}  # Serve and the other app stay
        client = GenerationClient(f"127.0.0.1:{config.grpc_port}", application=config.app_name)
        with pytest.raises(grpc.RpcError):
            client.generate("hi", max_new_tokens=2)
        client.close()
    finally:
        serve.shutdown()
