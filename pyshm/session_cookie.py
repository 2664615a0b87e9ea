"""The HTTP session cookie: its name, signing and verifying.

    pyshm_session=<32 hex id>.<43 base64url HMAC-SHA256(secret, id)>

The manager verifies the cookie a request carries (so it can place the
request by its session) and hands the worker the verified id; the worker
signs the cookie of a session it creates.  Neither side parses the other's
work again.  Imports nothing of the C core."""
from __future__ import annotations

import base64
import hmac

COOKIE = "pyshm_session"
COOKIE_BYTES = COOKIE.encode()
_REMEMBERED = 4096           # verified cookie values kept (the secret does not change while a process runs)


def cookie_value(header: bytes) -> bytes | None:
    """The session cookie's value in a Cookie header (RFC 6265: pairs
    separated by "; "), without SimpleCookie's cost."""
    for pair in header.split(b";"):
        key, sep, value = pair.strip().partition(b"=")
        if sep and key == COOKIE_BYTES:
            return value.strip(b'"')
    return None


class CookieSigner:
    """Signs and verifies the session cookies of one suite: its key is
    derived from the instance secret and the suite's index, so a cookie of
    one suite opens no session of another."""

    def __init__(self, secret: bytes, suite: int = 0) -> None:
        self.key = hmac.digest(secret, b"pyshm session cookie, suite %d" % suite, "sha256")
        self._verified: dict[bytes, bytes] = {}

    def sign(self, sid: bytes) -> str:
        mac = hmac.digest(self.key, sid, "sha256")    # the one-shot C path
        return f"{sid.hex()}.{base64.urlsafe_b64encode(mac).rstrip(b'=').decode()}"

    def verify(self, value: bytes) -> bytes | None:
        """The 16-byte session id a cookie value carries, or None if this
        secret did not sign it.  Verified values are remembered, so a
        returning client costs one dict lookup."""
        sid = self._verified.get(value)
        if sid is not None:
            return sid
        hexid, _, _ = value.partition(b".")
        try:
            sid = bytes.fromhex(hexid.decode("ascii"))
        except (ValueError, UnicodeDecodeError):
            return None
        if len(sid) != 16 or not hmac.compare_digest(self.sign(sid).encode(), value):
            return None
        if len(self._verified) >= _REMEMBERED:
            self._verified.clear()
        self._verified[value] = sid
        return sid
