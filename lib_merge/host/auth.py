"""HTTP basic auth for our routes: the WebUI's --api-auth logins, or the standalone app's --auth."""
from __future__ import annotations


def basic_auth(logins: list[tuple[str, str]]):
    """A FastAPI dependency that answers 401 unless the request carries one of `logins` (constant-time compare)."""
    import secrets

    from fastapi import Depends, HTTPException
    from fastapi.security import HTTPBasic
    security = HTTPBasic(auto_error=False)

    # no annotation on `credentials`: with postponed annotations it would be a string FastAPI cannot resolve here
    # (so routes were not registered at all when the WebUI had --api-auth)
    def check(credentials=Depends(security)):
        ok = credentials is not None and any(
            secrets.compare_digest(credentials.username, u) & secrets.compare_digest(credentials.password, p)
            for u, p in logins)
        if not ok:
            raise HTTPException(status_code=401, detail="Log in: this Merge Lab app requires a user and password.",
                                headers={"WWW-Authenticate": "Basic"})
    return Depends(check)
