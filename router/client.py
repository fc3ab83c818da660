"""A small client for the Generate API (used by the CLI, the benchmarks and the tests)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from protos import generation_pb2, generation_pb2_grpc
from protos.grpc_server import channel


def generate_request(prompt: str | Sequence[int], max_tokens: int = 16, temperature: float = 0.0,
                     top_p: float = 0.0, top_k: int = 0, seed: int | None = None,
                     stop: Sequence[str] = (), stop_token_ids: Sequence[int] = (),
                     ignore_eos: bool = False, request_id: str = ""
                     ) -> generation_pb2.GenerateRequest:
    sampling = generation_pb2.SamplingParams(
        max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
        stop=list(stop), stop_token_ids=list(stop_token_ids), ignore_eos=ignore_eos)
    if seed is not None:
        sampling.seed = seed
    request = generation_pb2.GenerateRequest(request_id=request_id, sampling=sampling)
    if isinstance(prompt, str):
        request.text = prompt
    else:
        request.token_ids.ids.extend(prompt)
    return request


class GenerationClient:
    def __init__(self, address: str, api_key: str | None = None, tls_ca: bytes | None = None):
        """``api_key``: the router's, when it requires one; ``tls_ca``: the CA certificate
        (PEM) to trust, for a router serving TLS."""
        self.channel = channel(address, api_key, tls_ca)
        self.stub = generation_pb2_grpc.GenerationStub(self.channel)

    def stream(self, request: generation_pb2.GenerateRequest, timeout: float | None = None
               ) -> Iterator[generation_pb2.GenerateResponse]:
        return self.stub.Generate(request, timeout=timeout)

    def complete(self, request: generation_pb2.GenerateRequest, timeout: float | None = None
                 ) -> tuple[list[int], str, generation_pb2.GenerateResponse]:
        """Run a request to the end: (token ids, text, last response)."""
        ids, text, last = [], [], None
        for last in self.stream(request, timeout):
            ids.extend(last.token_ids)
            text.append(last.text)
        return ids, "".join(text), last

    def close(self) -> None:
        self.channel.close()
