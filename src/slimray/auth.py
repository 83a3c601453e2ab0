"""Ray token authentication for clients: where the token comes from and what a refusal means.

Ray looks for the token in ``RAY_AUTH_TOKEN``, then the file named by ``RAY_AUTH_TOKEN_PATH``, then
``~/.ray/auth_token``; slimray does the same (plus the token of a local cluster it started) and sends
it explicitly, so a client works whether or not ``RAY_AUTH_MODE=token`` is set in its environment.
"""

from __future__ import annotations

import os
from pathlib import Path


class AuthError(RuntimeError):
    """The cluster refused us: no token, or the wrong one."""


def read_token(*, extra_files: tuple[Path, ...] = ()) -> str | None:
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if token:
        return token
    candidates = []
    if os.environ.get("RAY_AUTH_TOKEN_PATH"):
        candidates.append(Path(os.environ["RAY_AUTH_TOKEN_PATH"]).expanduser())
    candidates += [*extra_files, Path.home() / ".ray" / "auth_token"]
    for path in candidates:
        try:
            text = path.read_text().strip()
        except OSError:
            continue
        if text:
            return text
    return None


def auth_headers(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


def explain_refusal(err: BaseException, *, address: str, token: str | None) -> AuthError | None:
    """Turn a 401/403 from Ray's dashboard into a message that says what to do, else None."""
    text = str(err)
    if "401" in text or "Missing authentication token" in text or "Unauthorized" in text:
        return AuthError(
            f"the Ray cluster at {address} requires a token and none was sent: set RAY_AUTH_TOKEN, or "
            "RAY_AUTH_TOKEN_PATH to a file holding it, or put it in ~/.ray/auth_token"
        )
    if "403" in text or "Invalid authentication token" in text or "Forbidden" in text:
        where = "RAY_AUTH_TOKEN" if os.environ.get("RAY_AUTH_TOKEN") else "the token file"
        return AuthError(f"the Ray cluster at {address} rejected the token from {where}: it is not this cluster's token")
    return None
