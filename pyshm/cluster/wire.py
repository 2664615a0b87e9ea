"""The node link's protocol, sans-IO: bytes in, events out.

One TCP connection joins two nodes.  Both ends run this same machine; the
first frame each sends is its HELLO, so neither waits for the other to
speak first.  Its whole state, in one table:

    state   on receiving                      sends            then
    ------  --------------------------------  ---------------  -----------------------------
    HELLO   a HELLO for our cluster, another  PROOF            PROOF
            node, our protocol version
    PROOF   the peer's PROOF, valid for our   (keys derived)   OPEN    -> Opened(peer hello)
            nonce and the cluster secret
    OPEN    a sealed frame that opens         -                OPEN    -> Message(msg)
    any     anything else, or a REFUSED       REFUSED (clear,  CLOSED  -> Closed(reason)
                                              when we refuse)
    CLOSED  anything                          -                CLOSED  (nothing is read)

Frames: a 4-byte big-endian length, then that many bytes.  Before OPEN a
frame is a clear msgpack map of one key (hello, proof, refused) and at most
HANDSHAKE_MAX bytes; from OPEN on, every frame is sealed with
ChaCha20-Poly1305 under a key for its direction, its nonce the frame's
number in that direction: a frame replayed, reordered, dropped or changed
fails to open, and the link closes.  Sealed frames hold a msgpack array
(the message: its kind first, see the constants below) of at most max_frame
bytes.

Authentication is mutual challenge-response over the cluster secret: each
side's PROOF is an HMAC over the other's fresh nonce, its own nonce and its
node id, so it proves the secret without revealing it and cannot be
replayed on another connection.  The keys of the two directions are derived
from the secret and both nonces: session state never crosses the LAN in
clear, and a node that does not hold the secret can neither read nor write
a frame.
"""
from __future__ import annotations

import hmac
import os
import struct
from dataclasses import dataclass
from typing import Any, Union

import msgpack
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

PROTOCOL = 1            # the link protocol's version, in HELLO (and in the zeroconf TXT record)
NONCE_BYTES = 32
HANDSHAKE_MAX = 4096    # bytes of a clear frame
TAG_BYTES = 16
_LEN = struct.Struct(">I")
_SEQ = struct.Struct(">4xQ")   # the AEAD nonce: 4 zero bytes, then the frame number

# The states.
HELLO, PROOF, OPEN, CLOSED = "hello", "proof", "open", "closed"

# Message kinds (the first element of a sealed message).
PING = 1        # [PING, t]: a heartbeat; answered by [PONG, t]
PONG = 2
FORWARD = 3     # [FORWARD, id, suite, payload, route, session, hops, label, client]: run this request here
ANSWER = 4      # [ANSWER, id, body, error]: the answer to FORWARD id (error: None or a front-end error kind)
HANDOFF = 5     # [HANDOFF, id, session id, kind, suite, created, last access, expires, state]: become its owner
TAKEN = 6       # [TAKEN, id, why]: the answer to HANDOFF id (why: None when taken)
MOVED = 7       # [MOVED, [[session id, node], ...]]: these sessions have a new owner
LEAVING = 8     # [LEAVING]: this node's sessions moved on: forward nothing more to it (not a death)
GOODBYE = 9     # [GOODBYE]: the answer to LEAVING: nothing more is forwarded on this link
DRAINING = 10   # [DRAINING]: this node drains: hand it no session


@dataclass(frozen=True)
class Hello:
    """What a node says of itself before it is trusted."""
    cluster: str
    node: str
    epoch: int          # its boot epoch: a restarted node has a new one
    link_port: int      # where it accepts links (0: it accepts none)
    version: int = PROTOCOL


@dataclass(frozen=True)
class Send:
    """Bytes to write to the peer now."""
    data: bytes


@dataclass(frozen=True)
class Opened:
    """The peer proved it holds the secret: the link is open."""
    peer: Hello


@dataclass(frozen=True)
class Message:
    msg: list


@dataclass(frozen=True)
class Closed:
    """The link is over: `reason` says why (a refusal is logged with it)."""
    reason: str
    refused: bool = False        # the peer is not one of ours (wrong secret, cluster, version)


Event = Union[Send, Opened, Message, Closed]


def derive(secret: bytes, label: bytes) -> bytes:
    """A 32-byte key for one purpose, derived from the cluster secret."""
    return hmac.digest(secret, b"pyshm cluster key: " + label, "sha256")


class Link:
    """One end of one link.  Call start() once and write what it returns,
    feed every byte read to receive(), write each Send it yields, and seal
    messages with send() once Opened."""

    def __init__(self, secret: bytes, me: Hello, *, max_frame: int = 64 << 20, nonce: bytes | None = None) -> None:
        self.me = me
        self.max_frame = max_frame
        self.state = HELLO
        self.peer: Hello | None = None
        self._auth = derive(secret, b"link auth, cluster " + me.cluster.encode())
        self._nonce = nonce or os.urandom(NONCE_BYTES)
        self._peer_nonce = b""
        self._buf = bytearray()
        self._seal: ChaCha20Poly1305 | None = None
        self._open: ChaCha20Poly1305 | None = None
        self._sent = 0          # sealed frames sent (the next one's number)
        self._received = 0      # sealed frames opened

    # -- out ------------------------------------------------------------------------------

    def start(self) -> bytes:
        """The HELLO frame: the first bytes this end writes."""
        me = self.me
        return _clear({"hello": {"v": me.version, "cluster": me.cluster, "node": me.node, "epoch": me.epoch,
                                 "link": me.link_port, "nonce": self._nonce}})

    def send(self, msg: list) -> bytes:
        """A message sealed for the peer (the link must be open)."""
        if self.state != OPEN:
            raise RuntimeError(f"the link is {self.state}, not open")
        plain = msgpack.packb(msg, use_bin_type=True)
        if len(plain) > self.max_frame:
            raise ValueError(f"a link message holds at most {self.max_frame} bytes, not {len(plain)}")
        sealed = self._seal.encrypt(_SEQ.pack(self._sent), plain, None)
        self._sent += 1
        return _LEN.pack(len(sealed)) + sealed

    @property
    def link_id(self) -> bytes:
        """The same bytes at both ends of this link (its two nonces, in
        order), once the HELLOs crossed: a tie-breaker both ends agree on."""
        return min(self._nonce, self._peer_nonce) + max(self._nonce, self._peer_nonce)

    def refuse(self, reason: str) -> list[Event]:
        """Ends the link from this side (before OPEN the peer hears why)."""
        events: list[Event] = [Send(_clear({"refused": reason}))] if self.state in (HELLO, PROOF) else []
        self.state = CLOSED
        self._buf.clear()
        return events + [Closed(reason, refused=True)]

    # -- in -------------------------------------------------------------------------------

    def receive(self, data: bytes) -> list[Event]:
        if self.state == CLOSED:
            return []
        self._buf += data
        events: list[Event] = []
        while self.state != CLOSED:
            frame = self._next_frame()
            if frame is None:
                break
            if isinstance(frame, Closed):
                events.append(frame)
                break
            events += self._on_frame(frame)
        return events

    def _next_frame(self) -> bytes | Closed | None:
        """The next whole frame, None for more bytes, or Closed for a length
        no frame of this state may have."""
        if len(self._buf) < 4:
            return None
        (n,) = _LEN.unpack_from(self._buf)
        limit = self.max_frame + TAG_BYTES if self.state == OPEN else HANDSHAKE_MAX
        if n > limit:
            return self._close(f"a frame of {n} bytes (at most {limit} here)")
        if len(self._buf) < 4 + n:
            return None
        frame = bytes(self._buf[4:4 + n])
        del self._buf[:4 + n]
        return frame

    def _on_frame(self, frame: bytes) -> list[Event]:
        if self.state == OPEN:
            return self._on_sealed(frame)
        try:
            msg = msgpack.unpackb(frame, raw=False, max_bin_len=HANDSHAKE_MAX, max_str_len=HANDSHAKE_MAX,
                                  max_map_len=16, max_array_len=16, strict_map_key=True)
        except Exception:   # msgpack raises many kinds for garbage: all are garbage here
            return [self._close("garbage during the handshake")]
        if not isinstance(msg, dict) or len(msg) != 1:
            return [self._close("garbage during the handshake")]
        if "refused" in msg:
            why = msg["refused"] if isinstance(msg["refused"], str) else "no reason given"
            self.state = CLOSED      # (the peer's words, quoted: they may hold anything, newlines too)
            return [Closed(f"the peer refused this node: {why[:200]!r}", refused=True)]
        if self.state == HELLO and "hello" in msg:
            return self._on_hello(msg["hello"])
        if self.state == PROOF and "proof" in msg:
            return self._on_proof(msg["proof"])
        return [self._close(f"unexpected {next(iter(msg))!r} in state {self.state}")]

    def _on_hello(self, h: Any) -> list[Event]:
        try:
            peer = Hello(h["cluster"], h["node"], h["epoch"], h["link"], h["v"])
            nonce = h["nonce"]
        except (TypeError, KeyError):
            return [self._close("a malformed hello")]
        if not (isinstance(peer.cluster, str) and isinstance(peer.node, str) and peer.node
                and isinstance(peer.epoch, int) and isinstance(peer.link_port, int)
                and isinstance(peer.version, int) and isinstance(nonce, bytes) and len(nonce) == NONCE_BYTES):
            return [self._close("a malformed hello")]
        if peer.version != self.me.version:
            return self.refuse(f"link protocol {peer.version}; this node speaks {self.me.version}")
        if peer.cluster != self.me.cluster:
            return self.refuse(f"node {peer.node[:64]!r} belongs to cluster {peer.cluster[:64]!r}, "
                               f"not {self.me.cluster!r}")
        if peer.node == self.me.node:
            return self.refuse(f"node id {peer.node!r} is this node's own (two nodes with one id?)")
        if nonce == self._nonce:
            return self.refuse("the peer echoed this node's nonce")
        self.peer, self._peer_nonce = peer, nonce
        self.state = PROOF
        return [Send(_clear({"proof": self._proof(self._peer_nonce, self._nonce, self.me.node)}))]

    def _on_proof(self, proof: Any) -> list[Event]:
        expected = self._proof(self._nonce, self._peer_nonce, self.peer.node)
        if not isinstance(proof, bytes) or not hmac.compare_digest(proof, expected):
            return self.refuse(f"node {self.peer.node[:64]!r} does not hold this cluster's secret")
        mine = self._key(self._nonce, self._peer_nonce, self.me.node)
        theirs = self._key(self._peer_nonce, self._nonce, self.peer.node)
        self._seal, self._open = ChaCha20Poly1305(mine), ChaCha20Poly1305(theirs)
        self.state = OPEN
        return [Opened(self.peer)]

    def _on_sealed(self, frame: bytes) -> list[Event]:
        try:
            plain = self._open.decrypt(_SEQ.pack(self._received), frame, None)
        except InvalidTag:
            return [self._close(f"sealed frame {self._received} did not open (tampered, replayed or reordered)")]
        self._received += 1
        try:
            msg = msgpack.unpackb(plain, raw=False, strict_map_key=False)
        except Exception:   # (only a peer holding the secret gets here: a bug, not an attack)
            return [self._close("a sealed frame that is not msgpack")]
        if not isinstance(msg, list) or not msg or not isinstance(msg[0], int):
            return [self._close("a sealed frame that is not a message")]
        return [Message(msg)]

    # -- helpers ----------------------------------------------------------------------------------

    def _proof(self, verifier_nonce: bytes, prover_nonce: bytes, prover: str) -> bytes:
        return hmac.digest(self._auth, b"proof|" + verifier_nonce + prover_nonce + prover.encode(), "sha256")

    def _key(self, sender_nonce: bytes, receiver_nonce: bytes, sender: str) -> bytes:
        return hmac.digest(self._auth, b"key|" + sender_nonce + receiver_nonce + sender.encode(), "sha256")

    def _close(self, reason: str) -> Closed:
        self.state = CLOSED
        self._buf.clear()
        return Closed(reason)


def _clear(msg: dict) -> bytes:
    body = msgpack.packb(msg, use_bin_type=True)
    return _LEN.pack(len(body)) + body
