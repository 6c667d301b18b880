"""Bearer-token auth of the Serve apps."""

from __future__ import annotations

import hmac
from typing import Optional


def check_bearer(authorization: Optional[str], token: Optional[str]) -> bool:
    """True when auth is off (no token) or the header is ``Bearer <token>`` (constant-time comparison)."""
    if not token:
        return True
    if not authorization:
        return False
    scheme, _, cred = authorization.partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(cred.strip().encode("utf-8"), token.encode("utf-8"))
