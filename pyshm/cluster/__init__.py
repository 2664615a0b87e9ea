"""The LAN cluster: discovery, the node link, forwarding and handoff.

Only the connection manager imports this package (pyshm.manager creates a
ClusterNode when the configuration has a [cluster] table); nothing below the
manager does.  Modules, bottom up:

    wire.py       the node link's protocol, sans-IO: handshake, sealed frames
    discovery.py  zeroconf: announce this node, find the others
    link.py       the asyncio adapter of one link (a TCP connection to a peer)
    node.py       peers, heartbeats, forwarding out and in, handoff on drain
"""
