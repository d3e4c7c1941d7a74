"""API-key check on gRPC metadata: `authorization: Bearer <key>` (compared in constant time)."""

from __future__ import annotations

import hmac
from collections.abc import Iterable


class Unauthenticated(PermissionError):
    """The call carries no key or a wrong one (gRPC UNAUTHENTICATED)."""


def bearer_token(metadata: Iterable[tuple[str, str]]) -> str | None:
    """The token of the first `authorization: Bearer …` entry, or None."""
    for key, value in metadata:
        if key.lower() == "authorization":
            scheme, _, token = str(value).partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
    return None


def check_api_key(expected: str | None, metadata: Iterable[tuple[str, str]]) -> None:
    """Raise Unauthenticated unless the metadata carries `expected` (no key configured: every call passes)."""
    if expected is None:
        return
    token = bearer_token(metadata)
    if token is None:
        raise Unauthenticated("this server needs an API key: send gRPC metadata `authorization: Bearer <key>`")
    if not hmac.compare_digest(token.encode(), expected.encode()):
        raise Unauthenticated("the API key in `authorization: Bearer <key>` is not valid for this server")
