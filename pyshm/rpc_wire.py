"""The msgpack-RPC message types, shared by the front-end
(frontends/msgpack_rpc.py, in the manager) and the worker (pyshm.rpc),
which import no module of each other.

A call travels from front-end to worker as msgpack [kind, method, params],
kind the client's own message type: REQUEST (answered) or NOTIFY (not)."""

REQUEST, RESPONSE, NOTIFY = 0, 1, 2     # the spec's message types
