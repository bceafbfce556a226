"""Who may see the web view: the login cookie and the cross-site check of its forms.

With ``ORCHESTRATOR_TOKEN`` set a browser signs in once with the token (a form, never a
URL) and gets a cookie that is HttpOnly (no script reads it), ``SameSite=Strict`` (no
other site's page sends it) and scoped to ``/ui``. The cookie holds an HMAC of the
token, not the token: a copied cookie opens the web view but is no bearer token for the
API. A request with the API's ``Authorization: Bearer`` header is let in too.

Every form that changes something (Cancel, sign-in, sign-out) carries a token derived
from a secret of this server process, and a request whose ``Origin`` or
``Sec-Fetch-Site`` says it comes from another site is refused whatever it carries.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

from starlette.requests import Request

UI_PREFIX = "/ui"
COOKIE_NAME = "meshq_ui"
COOKIE_MAX_AGE_S = 12 * 3600
_SESSION_LABEL = b"meshq-ui-session-v1"


class UiSession:
    """The sign-in and cross-site rules of one server process (``token`` empty: no sign-in)."""

    def __init__(self, token: str) -> None:
        self.token = token.encode()
        self._form_secret = secrets.token_bytes(32)  # new forms after a restart; nothing stored

    @property
    def required(self) -> bool:
        return bool(self.token)

    def cookie_value(self) -> str:
        return hmac.new(self.token, _SESSION_LABEL, hashlib.sha256).hexdigest()

    def token_matches(self, given: str) -> bool:
        return bool(self.token) and hmac.compare_digest(given.strip().encode(), self.token)

    def signed_in(self, request: Request) -> bool:
        """True without a token; else a valid cookie or bearer header."""
        if not self.token:
            return True
        cookie = request.cookies.get(COOKIE_NAME, "")
        if cookie and hmac.compare_digest(cookie.encode(), self.cookie_value().encode()):
            return True
        scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and self.token_matches(credentials)

    def form_token(self) -> str:
        return hmac.new(self._form_secret, b"meshq-ui-form", hashlib.sha256).hexdigest()

    def same_site(self, request: Request, form_token: str) -> bool:
        """A form post from one of our own pages: the right form token, and no sign that
        the browser sent it from another site."""
        fetch_site = request.headers.get("sec-fetch-site")
        if fetch_site is not None and fetch_site not in ("same-origin", "none"):
            return False
        origin = request.headers.get("origin")
        if origin is not None and origin != f"{request.url.scheme}://{request.headers.get('host', '')}":
            return False
        return hmac.compare_digest(form_token.encode(), self.form_token().encode())
