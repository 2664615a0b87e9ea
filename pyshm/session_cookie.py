"""The HTTP session cookie: its name, signing and verifying.

    pyshm_session=<32 hex id><8 hex owner><8 hex secondary>.<43 base64url HMAC-SHA256(key, those 24 bytes)>

The owner is the number of the cluster node holding the session (0 on a
node outside any cluster), the secondary the node holding its replica (0:
none); both are signed with the id, so a client can move neither.

The manager verifies the cookie a request carries (so it can place the
request by its session) and hands the worker the verified id; the worker
signs the cookie of a session it creates.  Neither side parses the other's
work again.  Imports nothing of the C core."""
from __future__ import annotations

import base64
import hmac
import struct
from dataclasses import dataclass

COOKIE = "pyshm_session"
COOKIE_BYTES = COOKIE.encode()
_COOKIE_EQ = COOKIE_BYTES + b"="
_REMEMBERED = 4096           # verified cookie values kept (the secret does not change while a process runs)
_NODES = struct.Struct(">II")
_HEX = 48                    # hex digits before the "."


@dataclass(frozen=True, slots=True)
class Claim:
    """What a verified cookie says."""
    sid: bytes
    owner: int = 0
    secondary: int = 0


def cookie_value(header: bytes) -> bytes | None:
    """The session cookie's value in a Cookie header (RFC 6265: pairs
    separated by "; "), without SimpleCookie's cost."""
    start = header.find(_COOKIE_EQ)
    while start >= 0:
        # Only at the start of a pair (after ";" and blanks): in
        # "xpyshm_session=" or "a= pyshm_session=" it is not the name.
        before = header[:start].rstrip(b" \t")
        if not before or before.endswith(b";"):
            end = header.find(b";", start)
            return header[start + len(_COOKIE_EQ):end if end >= 0 else len(header)].strip().strip(b'"')
        start = header.find(_COOKIE_EQ, start + 1)
    return None


class CookieSigner:
    """Signs and verifies the session cookies of one suite: its key is
    derived from the instance secret and the suite's index, so a cookie of
    one suite opens no session of another."""

    def __init__(self, secret: bytes, suite: int = 0) -> None:
        self.key = hmac.digest(secret, b"pyshm session cookie, suite %d" % suite, "sha256")
        self._verified: dict[bytes, bytes] = {}

    def sign(self, sid: bytes, owner: int = 0, secondary: int = 0) -> str:
        signed = sid + _NODES.pack(owner, secondary)
        mac = hmac.digest(self.key, signed, "sha256")    # the one-shot C path
        return f"{signed.hex()}.{base64.urlsafe_b64encode(mac).rstrip(b'=').decode()}"

    def verify(self, value: bytes) -> Claim | None:
        """What a cookie value says, or None if this secret did not sign
        it.  Verified values are remembered, so a returning client costs
        one dict lookup."""
        claim = self._verified.get(value)
        if claim is not None:
            return claim
        hexpart, _, _ = value.partition(b".")
        if len(hexpart) != _HEX:
            return None
        try:
            signed = bytes.fromhex(hexpart.decode("ascii"))
        except (ValueError, UnicodeDecodeError):
            return None
        owner, secondary = _NODES.unpack_from(signed, 16)
        claim = Claim(signed[:16], owner, secondary)
        if not hmac.compare_digest(self.sign(claim.sid, owner, secondary).encode(), value):
            return None
        if len(self._verified) >= _REMEMBERED:
            self._verified.clear()
        self._verified[value] = claim
        return claim
