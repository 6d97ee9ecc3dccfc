"""The error a composition-service request is refused with: a gRPC status and a message for the caller.

Raised while a request is checked (``server.catalog.select_prompts``, ``server.service``)
and turned into the call's status by the servicer; its message never carries server paths.
"""

from __future__ import annotations

import grpc

__all__ = ["RequestError"]


class RequestError(Exception):
    """A request is refused with a gRPC status ``code`` and a message for the caller."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message

