"""Python client of the coordinator: what programs use instead of raw stubs."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import grpc

from splitllm.protos import coordinator_pb2 as pb
from splitllm.protos import coordinator_pb2_grpc as pb_grpc
from splitllm.services.common.grpc_util import CHANNEL_OPTIONS, READ_STREAMS_IN_CALLER

DEFAULT_COORDINATOR = "127.0.0.1:50051"


@dataclass
class Completion:
    text: str
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = ""
    usage: pb.Usage | None = None


class Client:
    def __init__(self, address: str = DEFAULT_COORDINATOR) -> None:
        self.channel = grpc.insecure_channel(address, CHANNEL_OPTIONS + READ_STREAMS_IN_CALLER)
        self.stub = pb_grpc.CoordinatorStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @staticmethod
    def request(prompt: str | None = None, messages: list[dict] | None = None, token_ids: list[int] | None = None,
                system: str = "", max_tokens: int = 0, temperature: float = 0.0, top_k: int = 0, top_p: float = 0.0,
                min_p: float = 0.0, repetition_penalty: float = 0.0, seed: int | None = None,
                stop: list[str] | None = None, stop_token_ids: list[int] | None = None) -> pb.GenerateRequest:
        req = pb.GenerateRequest(system=system, max_tokens=max_tokens, stop=stop or [],
                                 stop_token_ids=stop_token_ids or [])
        if prompt is not None:
            req.prompt = prompt
        elif messages is not None:
            req.chat.messages.extend(pb.ChatMessage(role=m["role"], content=m["content"]) for m in messages)
        elif token_ids is not None:
            req.token_ids.ids.extend(token_ids)
        s = req.sampling
        s.temperature, s.top_k, s.top_p, s.min_p, s.repetition_penalty = (
            temperature, top_k, top_p, min_p, repetition_penalty)
        if seed is not None:
            s.seed = seed
        return req

    def stream(self, timeout: float | None = None, **kwargs: object) -> Iterator[pb.GenerateResponse]:
        """Generate, one message per token as it comes; see `request` for the arguments."""
        yield from self.stub.Generate(self.request(**kwargs), timeout=timeout)  # type: ignore[arg-type]

    def generate(self, timeout: float | None = None, **kwargs: object) -> Completion:
        out = Completion("")
        parts = []
        for msg in self.stream(timeout=timeout, **kwargs):
            parts.append(msg.text)
            out.token_ids.extend(msg.token_ids)
            if msg.finish_reason:
                out.finish_reason = pb.FinishReason.Name(msg.finish_reason)
                out.usage = msg.usage
        out.text = "".join(parts)
        return out

    def tokenize(self, text: str) -> list[int]:
        return list(self.stub.Tokenize(pb.TokenizeRequest(text=text)).ids)

    def model_info(self) -> pb.ModelInfoResponse:
        return self.stub.ModelInfo(pb.ModelInfoRequest())
