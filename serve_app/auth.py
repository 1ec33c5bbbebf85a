"""The credential for sidecar writes: a bearer token from a file or the environment, compared in
constant time. Without a configured token the writes are off. The token is never logged or echoed."""

from __future__ import annotations

import hmac
import logging
import os
from pathlib import Path

from fastapi import HTTPException

log = logging.getLogger("skewless.serve")

TOKEN_ENV = "SKEWLESS_ADMIN_TOKEN"


class AdminAuth:
    def __init__(self, token_file: str | None, environ=os.environ):
        self._token: bytes | None = None
        self.source = "none"
        if token_file:
            try:
                token = Path(token_file).read_text().strip()
            except OSError as e:
                # writes stay off; serving must not crash-loop over a missing secret
                log.error(
                    "admin token file %s is unreadable (%s): sidecar writes are off",
                    token_file,
                    type(e).__name__,
                )
                return
            self.source = f"file {token_file}"
        else:
            token = environ.get(TOKEN_ENV, "").strip()
            self.source = f"${TOKEN_ENV}"
        if token:
            self._token = token.encode()
        else:
            self.source = "none"

    @property
    def enabled(self) -> bool:
        return self._token is not None

    def check(self, authorization: str | None) -> None:
        """Raise 403 when writes are off or the token is wrong, 401 when none was sent."""
        if self._token is None:
            raise HTTPException(
                403,
                f"sidecar writes are off on this deployment: configure an admin token (args.admin_token_file, or ${TOKEN_ENV} in the replicas' environment)",
            )
        scheme, _, credential = (authorization or "").partition(" ")
        if not authorization:
            raise HTTPException(
                401,
                "sidecar writes need 'Authorization: Bearer <admin token>'",
                headers={"WWW-Authenticate": "Bearer"},
            )
        if scheme.lower() != "bearer" or not hmac.compare_digest(credential.strip().encode(), self._token):
            raise HTTPException(403, "the admin token is not valid for sidecar writes")
