"""One error type for every service: a gRPC status code and a message saying what is wrong and allowed."""

from __future__ import annotations

import grpc


class ServiceError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"


def invalid(message: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.INVALID_ARGUMENT, message)


def not_found(message: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.NOT_FOUND, message)


def exhausted(message: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.RESOURCE_EXHAUSTED, message)


def unavailable(message: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.UNAVAILABLE, message)


_CODES = {c.value[0]: c for c in grpc.StatusCode}


def from_code(code: int, message: str) -> ServiceError:
    """An error as a peer reported it on the wire (a grpc.StatusCode value, as in ForwardResponse.code)."""
    return ServiceError(_CODES.get(code, grpc.StatusCode.UNKNOWN), message)
