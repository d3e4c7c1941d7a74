"""A small Python client for the Generation service."""

from __future__ import annotations

import time
from typing import Iterator

import grpc

from protos.grpc.health.v1 import health_pb2, health_pb2_grpc
from protos.rayquant.v1 import generation_pb2 as pb
from protos.rayquant.v1 import generation_pb2_grpc


class GenerationClient:
    """client = GenerationClient("localhost:9000"); client.generate("Hello", max_new_tokens=20, temperature=0)"""

    def __init__(self, address: str, application: str | None = None, timeout_s: float = 300,
                 api_key: str | None = None) -> None:
        self.channel = grpc.insecure_channel(address)
        self.stub = generation_pb2_grpc.GenerationStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)
        metadata = [("application", application)] if application else []
        if api_key:
            metadata.append(("authorization", f"Bearer {api_key}"))
        self.metadata = tuple(metadata) or None
        self.timeout_s = timeout_s

    @staticmethod
    def request(prompt: str = "", messages: list[dict[str, str]] | None = None, stop: list[str] | None = None,
                **sampling) -> pb.GenerateRequest:
        """sampling: max_new_tokens, temperature, top_p, top_k, seed."""
        return pb.GenerateRequest(prompt=prompt, messages=[pb.Message(**m) for m in messages or []],
                                  stop=stop or [], **sampling)

    def generate(self, prompt: str = "", timeout_s: float | None = None, **kwargs) -> pb.GenerateResponse:
        """timeout_s: this call's deadline (default: the client's); the server stops work on it when it passes."""
        return self.stub.Generate(self.request(prompt, **kwargs), metadata=self.metadata,
                                  timeout=timeout_s or self.timeout_s)

    def stream(self, prompt: str = "", timeout_s: float | None = None, **kwargs) -> Iterator[pb.GenerateChunk]:
        return self.stub.GenerateStream(self.request(prompt, **kwargs), metadata=self.metadata,
                                        timeout=timeout_s or self.timeout_s)

    def model_info(self) -> pb.ModelInfoResponse:
        return self.stub.ModelInfo(pb.ModelInfoRequest(), metadata=self.metadata, timeout=self.timeout_s)

    def healthy(self) -> bool:
        response = self.health.Check(health_pb2.HealthCheckRequest(), metadata=self.metadata, timeout=10)
        return response.status == health_pb2.HealthCheckResponse.SERVING

    def wait_healthy(self, timeout_s: float = 180) -> None:
        """Block until the server answers SERVING (replicas can take a while to load a model)."""
        deadline = time.time() + timeout_s
        while True:
            try:
                if self.healthy():
                    return
            except grpc.RpcError:
                if time.time() > deadline:
                    raise
            time.sleep(0.5)

    def close(self) -> None:
        self.channel.close()
