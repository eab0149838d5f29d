"""Packet source: DNS queries and answers, and TCP SYNs, from an AF_PACKET socket with a classic BPF filter.

Inside a Fargate task this is the only way to see DNS (no eBPF, no NET_ADMIN), and the only way to see TCP
connections that live too short for sock_diag polling: Docker's default capabilities keep NET_RAW, and all
containers of the task share the one network namespace we capture in.

* One ``AF_PACKET``/``SOCK_RAW`` socket on every interface of the namespace (loopback included). A hand-written
  classic BPF program (:func:`dns_syn_filter`) keeps in the kernel everything but UDP port 53, TCP port 53 segments
  that carry data, and TCP SYNs (SYN set, ACK clear) to any port; SYNs are cut to their headers. It loads relative
  to the network header (``SKF_NET_OFF``) and reads the protocol from the skb, so one program serves Ethernet,
  loopback and header-less (tun, wireguard) links alike.
* Loopback shows every packet twice (leaving, then arriving): the filter drops the leaving copy.
* The filter is attached before the socket is bound to a protocol, so not one unfiltered packet is ever queued.
* Reads are non-blocking, driven by the asyncio loop, in batches, within a CPU budget: over it, the socket is left
  unread for the rest of the window and the kernel drops (and counts) what does not fit its receive buffer.
* DNS is decoded by dnspython; decoded messages are cached by wire (minus the id), since apps ask the same
  names again and again. Nothing a packet contains can raise out of the parser: what does not decode is counted.
* The process that sent a query or a SYN is found by its local (ip, port): one netlink sock_diag request, filtered
  in the kernel by port, gives the socket inode, and ``/proc/<pid>/fd`` says who holds it (:class:`SocketAttributor`).

Events: ``dns.query``, ``dns.response``, ``net.syn`` (fields in README.md and in :class:`PacketCollector`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import ctypes.util
import errno
import functools
import json
import os
import signal
import socket
import struct
import sys
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import IO, Any, NamedTuple

import dns.flags
import dns.message
import dns.opcode
import dns.rcode
import dns.rdatatype

from collectors.events import RuntimeEvent
from collectors.process_table import ProcessTable

Emit = Callable[[RuntimeEvent], None]
# (local ip, local port, IPPROTO_TCP or IPPROTO_UDP) -> pid holding that socket, or None
Attribute = Callable[[str, int, int], int | None]
# (frame, interface, pkttype, hatype): called with every frame that reaches Python (capture corpora, debugging)
FrameHook = Callable[[bytes, str, int, int], None]

ETH_P_ALL = 0x0003
ETH_P_IP = 0x0800
ETH_P_IPV6 = 0x86DD
ETH_P_8021Q = 0x8100
ETH_P_8021AD = 0x88A8
SOL_PACKET = 263
PACKET_STATISTICS = 6
SO_ATTACH_FILTER = 26
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)

# pkttype of sockaddr_ll (linux/if_packet.h)
PACKET_HOST = 0
PACKET_BROADCAST = 1
PACKET_MULTICAST = 2
PACKET_OTHERHOST = 3
PACKET_OUTGOING = 4
# hatype of sockaddr_ll (linux/if_arp.h): links that carry an Ethernet header in front of IP
ARPHRD_ETHER = 1
ARPHRD_IEEE802 = 6
ARPHRD_LOOPBACK = 772
ETHERNET_LINKS = frozenset({ARPHRD_ETHER, ARPHRD_IEEE802, ARPHRD_LOOPBACK})
# Links whose frames start with the IP header: tun, ipip/sit/gre tunnels, wireguard, raw-IP modems.
HEADERLESS_LINKS = frozenset({0xFFFE, 0xFFFF, 512, 519, 768, 769, 776, 778, 823})

TCP_FIN, TCP_SYN, TCP_RST, TCP_ACK = 0x01, 0x02, 0x04, 0x10
DNS_PORT = 53
# A SYN is cut to this many bytes by the filter: link (with a VLAN tag) + IPv4 or IPv6 + TCP with options.
SYN_SNAPLEN = 256
FULL_SNAPLEN = 0x40000

# -- the BPF program ------------------------------------------------------------------------------------------
# linux/filter.h, linux/bpf_common.h
BPF_LD, BPF_LDX, BPF_ST, BPF_ALU, BPF_JMP, BPF_RET, BPF_MISC = 0x00, 0x01, 0x02, 0x04, 0x05, 0x06, 0x07
BPF_W, BPF_H, BPF_B = 0x00, 0x08, 0x10
BPF_IMM, BPF_ABS, BPF_IND, BPF_MEM, BPF_MSH = 0x00, 0x20, 0x40, 0x60, 0xA0
BPF_ADD, BPF_AND, BPF_LSH, BPF_RSH = 0x00, 0x50, 0x60, 0x70
BPF_JEQ, BPF_JGT, BPF_JSET = 0x10, 0x20, 0x40
BPF_K, BPF_X = 0x00, 0x08
BPF_TAX, BPF_TXA = 0x00, 0x80
SKF_AD_OFF = -0x1000
SKF_AD_PROTOCOL, SKF_AD_PKTTYPE, SKF_AD_HATYPE = 0, 4, 28
# Loads at SKF_NET_OFF + n read byte n of the network header, wherever the link header ends.
SKF_NET_OFF = -0x100000

Insn = tuple[int, int, int, int]  # struct sock_filter: code, jt, jf, k


def _u32(k: int) -> int:
    return k & 0xFFFFFFFF


def _assemble(src: list[tuple[Any, ...]]) -> list[Insn]:
    """Resolve labels: ``("L", name)`` marks a place, ``("J", code, k, jt, jf)`` jumps to labels (or "next")."""
    labels: dict[str, int] = {}
    n = 0
    for item in src:
        if item[0] == "L":
            labels[item[1]] = n
        else:
            n += 1
    out: list[Insn] = []
    for item in src:
        if item[0] == "L":
            continue
        here = len(out)
        if item[0] == "J":
            _, code, k, jt, jf = item
            offs = [0 if t == "next" else labels[t] - here - 1 for t in (jt, jf)]
            if not all(0 <= o <= 255 for o in offs):
                raise ValueError(f"jump out of range at {here}: {item}")
            out.append((code, offs[0], offs[1], _u32(k)))
        else:
            code, k = item
            out.append((code, 0, 0, _u32(k)))
    return out


def dns_syn_filter(syn_snaplen: int = SYN_SNAPLEN) -> list[Insn]:
    """The classic BPF program: keep DNS over UDP and TCP (port 53, either side) and TCP SYNs; drop the rest.

    Written by hand rather than with ``tcpdump -dd``: libpcap compiles for one link type (Ethernet offsets would
    be wrong on a tun device) and cannot express TCP flags over IPv6. Loads are relative to the network header and
    the protocol is the skb's, so the program is link-type independent. IPv6 extension headers are not walked:
    a packet whose next header is not TCP or UDP is dropped (DNS and SYNs do not carry extension headers in
    practice; a fragmented DNS answer over IPv6 is lost, as it is for most middleboxes).
    """
    net = SKF_NET_OFF
    ld_w, ld_h, ld_b = BPF_LD | BPF_W | BPF_ABS, BPF_LD | BPF_H | BPF_ABS, BPF_LD | BPF_B | BPF_ABS
    ldx_h, ldx_b = BPF_LD | BPF_H | BPF_IND, BPF_LD | BPF_B | BPF_IND
    jeq, jset, jgt_x = BPF_JMP | BPF_JEQ | BPF_K, BPF_JMP | BPF_JSET | BPF_K, BPF_JMP | BPF_JGT | BPF_X
    msh = BPF_LDX | BPF_B | BPF_MSH
    and_k, rsh_k, add_x = BPF_ALU | BPF_AND | BPF_K, BPF_ALU | BPF_RSH | BPF_K, BPF_ALU | BPF_ADD | BPF_X
    tax, txa = BPF_MISC | BPF_TAX, BPF_MISC | BPF_TXA
    ret = BPF_RET | BPF_K
    src: list[tuple[Any, ...]] = [
        (ld_w, SKF_AD_OFF + SKF_AD_PKTTYPE),
        # another host's packet seen because the interface is promiscuous: not ours to report
        ("J", jeq, PACKET_OTHERHOST, "drop", "next"),
        ("J", jeq, PACKET_OUTGOING, "next", "proto"),
        (ld_w, SKF_AD_OFF + SKF_AD_HATYPE),
        # loopback: keep the arriving copy only
        ("J", jeq, ARPHRD_LOOPBACK, "drop", "proto"),
        ("L", "proto"),
        (ld_w, SKF_AD_OFF + SKF_AD_PROTOCOL),
        ("J", jeq, ETH_P_IP, "v4", "next"),
        ("J", jeq, ETH_P_IPV6, "v6", "drop"),
        ("L", "v4"),
        (ld_h, net + 6),
        ("J", jset, 0x1FFF, "drop", "next"),  # not the first fragment: no UDP/TCP header here
        (ld_b, net + 9),
        ("J", jeq, socket.IPPROTO_UDP, "v4udp", "next"),
        ("J", jeq, socket.IPPROTO_TCP, "v4tcp", "drop"),
        ("L", "v4udp"),
        (msh, net + 0),  # X = IPv4 header length (IHL * 4)
        (ldx_h, net + 0),
        ("J", jeq, DNS_PORT, "full", "next"),
        (ldx_h, net + 2),
        ("J", jeq, DNS_PORT, "full", "drop"),
        ("L", "v4tcp"),
        (msh, net + 0),
        (ldx_b, net + 13),
        (and_k, TCP_SYN | TCP_ACK),
        ("J", jeq, TCP_SYN, "syn", "next"),
        (ldx_h, net + 0),
        ("J", jeq, DNS_PORT, "v4data", "next"),
        (ldx_h, net + 2),
        ("J", jeq, DNS_PORT, "v4data", "drop"),
        # TCP port 53: only segments with payload (the handshake, ACKs and FINs stay in the kernel)
        ("L", "v4data"),
        (txa, 0),
        (BPF_ST, 0),  # M[0] = IP header length
        (ldx_b, net + 12),
        (and_k, 0xF0),
        (rsh_k, 2),  # A = TCP header length
        (BPF_LDX | BPF_W | BPF_MEM, 0),
        (add_x, 0),
        (tax, 0),  # X = IP + TCP header lengths
        (ld_h, net + 2),  # A = IP total length
        ("J", jgt_x, 0, "full", "drop"),
        ("L", "v6"),
        (ld_b, net + 6),
        ("J", jeq, socket.IPPROTO_UDP, "v6udp", "next"),
        ("J", jeq, socket.IPPROTO_TCP, "v6tcp", "drop"),
        ("L", "v6udp"),
        (ld_h, net + 40),
        ("J", jeq, DNS_PORT, "full", "next"),
        (ld_h, net + 42),
        ("J", jeq, DNS_PORT, "full", "drop"),
        ("L", "v6tcp"),
        (ld_b, net + 53),
        (and_k, TCP_SYN | TCP_ACK),
        ("J", jeq, TCP_SYN, "syn", "next"),
        (ld_h, net + 40),
        ("J", jeq, DNS_PORT, "v6data", "next"),
        (ld_h, net + 42),
        ("J", jeq, DNS_PORT, "v6data", "drop"),
        ("L", "v6data"),
        (ld_b, net + 52),
        (and_k, 0xF0),
        (rsh_k, 2),
        (tax, 0),  # X = TCP header length
        (ld_h, net + 4),  # A = IPv6 payload length
        ("J", jgt_x, 0, "full", "drop"),
        ("L", "full"),
        (ret, FULL_SNAPLEN),
        ("L", "syn"),
        (ret, syn_snaplen),
        ("L", "drop"),
        (ret, 0),
    ]
    return _assemble(src)


def attach_filter(sock: socket.socket, program: list[Insn]) -> None:
    """SO_ATTACH_FILTER: struct sock_fprog {unsigned short len; struct sock_filter *filter}."""
    raw = b"".join(struct.pack("=HBBI", *insn) for insn in program)
    buf = ctypes.create_string_buffer(raw, len(raw))
    fprog = struct.pack("@HP", len(program), ctypes.addressof(buf))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)


class _SockaddrLL(ctypes.Structure):
    _fields_ = (
        ("sll_family", ctypes.c_ushort),
        ("sll_protocol", ctypes.c_ushort),
        ("sll_ifindex", ctypes.c_int),
        ("sll_hatype", ctypes.c_ushort),
        ("sll_pkttype", ctypes.c_ubyte),
        ("sll_halen", ctypes.c_ubyte),
        ("sll_addr", ctypes.c_ubyte * 8),
    )


_libc: ctypes.CDLL | None = None


def _bind_all_interfaces(sock: socket.socket, protocol: int) -> None:
    """bind() to ifindex 0 (every interface). Python's own bind wants an interface name for AF_PACKET."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    addr = _SockaddrLL(socket.AF_PACKET, socket.htons(protocol), 0, 0, 0, 0)
    if _libc.bind(sock.fileno(), ctypes.byref(addr), ctypes.sizeof(addr)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"bind AF_PACKET: {os.strerror(err)}")


def open_packet_socket(rcvbuf: int, program: list[Insn] | None = None) -> tuple[socket.socket, int]:
    """The filtered capture socket and its effective receive buffer (bytes, as the kernel reports it).

    Created with protocol 0 (it receives nothing), filtered, and only then bound to ETH_P_ALL: a socket opened
    with ETH_P_ALL queues unfiltered traffic until the filter lands. SO_RCVBUFFORCE needs NET_ADMIN (absent on
    Fargate); SO_RCVBUF is then capped by net.core.rmem_max, which a task cannot raise.
    """
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC, 0)
    try:
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, rcvbuf)
        except OSError:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        attach_filter(sock, program if program is not None else dns_syn_filter())
        _bind_all_interfaces(sock, ETH_P_ALL)
        effective = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    except BaseException:
        sock.close()
        raise
    return sock, effective


def read_packet_statistics(sock: socket.socket) -> tuple[int, int]:
    """(packets, drops) since the last call: the kernel resets both counters on every read.

    ``packets`` counts what passed the filter, dropped or not (the kernel adds drops into it on read).
    """
    data = sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, 8)
    packets, drops = struct.unpack("=II", data)
    return packets, drops


# -- parsing --------------------------------------------------------------------------------------------------
class Malformed(Exception):
    """A header or a DNS message that does not decode. Never leaves this module."""


class Packet(NamedTuple):
    family: int  # socket.AF_INET or AF_INET6
    src: str
    dst: str
    proto: int  # IPPROTO_TCP or IPPROTO_UDP
    sport: int
    dport: int
    flags: int  # TCP flags, 0 for UDP
    seq: int  # TCP sequence number, 0 for UDP
    payload: bytes
    fragment: bool  # the first fragment of a fragmented IPv4 datagram: the payload is incomplete


class Seen(NamedTuple):
    """Where a packet was captured: interface, and whether it was leaving (PACKET_OUTGOING) or on loopback."""

    ifname: str
    outgoing: bool
    loopback: bool


class NotOurs(Exception):
    """A packet the BPF filter should have kept in the kernel (counted: it must stay at zero)."""


_ETH_TYPE = struct.Struct("!H")
_IPV4 = struct.Struct("!BBHHHBBH4s4s")
_IPV6 = struct.Struct("!IHBB16s16s")
_PORTS = struct.Struct("!HH")
_UDP = struct.Struct("!HHH")
_TCP = struct.Struct("!HHIIBB")


def network_offset(frame: bytes, hatype: int) -> int:
    """Where the IP header starts in a SOCK_RAW frame of this link type (the hatype of recvfrom's address)."""
    if hatype in ETHERNET_LINKS:
        off = 14
        if len(frame) < off:
            raise Malformed("short ethernet header")
        ethertype = _ETH_TYPE.unpack_from(frame, 12)[0]
        # VLAN tags left in the frame (no hardware offload); each is 4 bytes before the real ethertype
        while ethertype in (ETH_P_8021Q, ETH_P_8021AD) and len(frame) >= off + 4:
            ethertype = _ETH_TYPE.unpack_from(frame, off + 2)[0]
            off += 4
        return off
    if hatype in HEADERLESS_LINKS:
        return 0
    # An unknown link type: if the frame starts like an IP header, take it as header-less.
    if frame and frame[0] >> 4 in (4, 6):
        return 0
    raise Malformed(f"unknown link type {hatype}")


def parse_packet(frame: bytes, off: int) -> Packet:
    """IPv4/IPv6 + UDP/TCP from ``off``. Checksums are not verified: outgoing packets are captured before the NIC
    (or veth) fills them in."""
    n = len(frame)
    if n < off + 1:
        raise Malformed("no IP header")
    version = frame[off] >> 4
    fragment = False
    if version == 4:
        if n < off + 20:
            raise Malformed("short IPv4 header")
        vihl, _, total, _, frag, _, proto, _, s, d = _IPV4.unpack_from(frame, off)
        ihl = (vihl & 0x0F) * 4
        if ihl < 20 or total < ihl or n < off + ihl:
            raise Malformed("bad IPv4 header length")
        if frag & 0x1FFF:
            raise NotOurs("IPv4 fragment")
        fragment = bool(frag & 0x2000)
        family, l4 = socket.AF_INET, off + ihl
        # A SYN is cut short by the filter: the end is what we have, not what the header says.
        end = min(off + total, n)
        src, dst = socket.inet_ntop(socket.AF_INET, s), socket.inet_ntop(socket.AF_INET, d)
    elif version == 6:
        if n < off + 40:
            raise Malformed("short IPv6 header")
        _, plen, proto, _, s, d = _IPV6.unpack_from(frame, off)
        family, l4 = socket.AF_INET6, off + 40
        end = min(l4 + plen, n)
        src, dst = socket.inet_ntop(socket.AF_INET6, s), socket.inet_ntop(socket.AF_INET6, d)
    else:
        raise Malformed(f"IP version {version}")
    if proto == socket.IPPROTO_UDP:
        if end < l4 + 8:
            raise Malformed("short UDP header")
        sport, dport, ulen = _UDP.unpack_from(frame, l4)
        if ulen < 8:
            raise Malformed("bad UDP length")
        if not fragment and l4 + ulen > end:
            raise Malformed("UDP length beyond the packet")
        pend = end if fragment else l4 + ulen
        return Packet(family, src, dst, proto, sport, dport, 0, 0, frame[l4 + 8 : pend], fragment)
    if proto == socket.IPPROTO_TCP:
        if end < l4 + 14:
            raise Malformed("short TCP header")
        sport, dport, seq, _, doff, flags = _TCP.unpack_from(frame, l4)
        hlen = (doff >> 4) * 4
        if hlen < 20:
            raise Malformed("bad TCP header length")
        payload = frame[l4 + hlen : end] if end > l4 + hlen else b""
        return Packet(family, src, dst, proto, sport, dport, flags, seq, payload, fragment)
    raise NotOurs(f"IP protocol {proto}")


class DnsMessage(NamedTuple):
    """What an event needs from one DNS message. Shared between events (cached): never mutated."""

    response: bool
    opcode: str
    query_name: str | None
    query_type: str | None
    rcode: str
    truncated: bool
    answers: tuple[tuple[str, str, str, int], ...]  # (name, type, value, ttl)


MAX_ANSWERS = 64
MAX_VALUE_CHARS = 512


@functools.lru_cache(maxsize=1024)
def _type_text(rdtype: dns.rdatatype.RdataType) -> str:
    # dnspython's enum to_text costs microseconds a call; there are few distinct values
    return dns.rdatatype.to_text(rdtype)


@functools.lru_cache(maxsize=64)
def _rcode_text(rcode: dns.rcode.Rcode) -> str:
    return dns.rcode.to_text(rcode)


@functools.lru_cache(maxsize=16)
def _opcode_text(opcode: dns.opcode.Opcode) -> str:
    return dns.opcode.to_text(opcode)


def decode_dns(wire: bytes) -> DnsMessage:
    """dnspython does the decoding; anything it (or we) cannot handle becomes Malformed."""
    try:
        msg = dns.message.from_wire(wire, ignore_trailing=True)
        qname = qtype = None
        if msg.question:
            q = msg.question[0]
            qname = q.name.to_text(omit_final_dot=True).lower()
            qtype = _type_text(q.rdtype)
        answers: list[tuple[str, str, str, int]] = []
        response = bool(msg.flags & dns.flags.QR)
        if response:
            for rrset in msg.answer:
                name = rrset.name.to_text(omit_final_dot=True).lower()
                rtype = _type_text(rrset.rdtype)
                for rdata in rrset:
                    if len(answers) >= MAX_ANSWERS:
                        break
                    answers.append((name, rtype, rdata.to_text()[:MAX_VALUE_CHARS], int(rrset.ttl)))
        return DnsMessage(
            response,
            _opcode_text(msg.opcode()),
            qname,
            qtype,
            _rcode_text(msg.rcode()),
            bool(msg.flags & dns.flags.TC),
            tuple(answers),
        )
    except Exception as e:  # dnspython raises more kinds than it documents; no packet may stop the capture
        raise Malformed(f"DNS: {type(e).__name__}") from None


class DnsDecoder:
    """decode_dns with an LRU cache keyed by the wire minus its 2-byte id.

    A stub resolver sends the very same bytes (but the id) each time an app looks a name up, and a resolver
    answers with the same bytes until the TTL changes: most messages in a busy task are repeats. Bounded in
    entries and in the size of the messages kept.
    """

    def __init__(self, max_entries: int = 2048, max_wire: int = 1024) -> None:
        self.max_entries = max_entries
        self.max_wire = max_wire
        self._cache: OrderedDict[bytes, DnsMessage | None] = OrderedDict()
        self.hits = 0

    def __len__(self) -> int:
        return len(self._cache)

    def decode(self, wire: bytes) -> DnsMessage:
        if len(wire) < 12:
            raise Malformed("DNS: short header")
        key = wire[2:] if len(wire) <= self.max_wire else None
        if key is not None and key in self._cache:
            cached = self._cache[key]
            self.hits += 1
            self._cache.move_to_end(key)
            if cached is None:
                raise Malformed("DNS: cached failure")
            return cached
        try:
            result: DnsMessage | None = decode_dns(wire)
        except Malformed:
            result = None
        if key is not None:
            self._cache[key] = result
            if len(self._cache) > self.max_entries:
                self._cache.popitem(last=False)
        if result is None:
            raise Malformed("DNS")
        return result


# -- attribution ----------------------------------------------------------------------------------------------
NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST = 0x1
NLM_F_DUMP = 0x300
NLMSG_ERROR = 2
NLMSG_DONE = 3
INET_DIAG_REQ_BYTECODE = 1
INET_DIAG_BC_S_EQ = 11
TCP_LISTEN = 10
TCP_SYN_SENT = 2
_NLMSGHDR = struct.Struct("=IHHII")
_DIAG_REQ = struct.Struct("=BBBBIHH16s16sIQ")  # inet_diag_req_v2
_DIAG_MSG = struct.Struct("=BBBBHH16s16sIQIIIII")  # inet_diag_msg
_SOCKET_LINK = "socket:["


@dataclass(slots=True)
class DiagSocket:
    state: int
    local_ip: str
    local_port: int
    inode: int


def _port_filter(port: int) -> bytes:
    """inet_diag bytecode "source port == port": one S_EQ op; "yes" ends the program (accept), "no" jumps one
    op past its end (reject)."""
    bc = struct.pack("=BBH", INET_DIAG_BC_S_EQ, 8, 12) + struct.pack("=BBH", 0, 0, port)
    return struct.pack("=HH", 4 + len(bc), INET_DIAG_REQ_BYTECODE) + bc


class SockDiag:
    """Minimal netlink sock_diag client: the sockets of one protocol with a given local port.

    A plain netlink socket rather than pyroute2's DiagSocket: that one cannot send the port filter (a dump of
    every socket, filtered in Python) and decodes each message in pure Python, 3 ms for 50 sockets here, against
    about 30 us for this request with the port filtered in the kernel. Dumps need no capability.
    """

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC, NETLINK_SOCK_DIAG)
        # the kernel answers at once; a timeout only guards the event loop against the unexpected
        self._sock.settimeout(0.5)
        self._seq = 0

    def close(self) -> None:
        self._sock.close()

    def by_port(self, family: int, proto: int, port: int) -> list[DiagSocket]:
        self._seq += 1
        body = _DIAG_REQ.pack(family, proto, 0, 0, 0xFFFFFFFF, 0, 0, b"", b"", 0, 0) + _port_filter(port)
        self._sock.send(_NLMSGHDR.pack(_NLMSGHDR.size + len(body), SOCK_DIAG_BY_FAMILY,
                                       NLM_F_REQUEST | NLM_F_DUMP, self._seq, 0) + body)  # fmt: skip
        out: list[DiagSocket] = []
        while True:
            data = self._sock.recv(65536)
            off = 0
            while off + _NLMSGHDR.size <= len(data):
                length, kind, _, seq, _ = _NLMSGHDR.unpack_from(data, off)
                if length < _NLMSGHDR.size:
                    return out
                if seq == self._seq:
                    if kind == NLMSG_DONE:
                        return out
                    if kind == NLMSG_ERROR:
                        code = -struct.unpack_from("=i", data, off + _NLMSGHDR.size)[0]
                        if code:
                            raise OSError(code, f"sock_diag: {os.strerror(code)}")
                        return out
                    if length >= _NLMSGHDR.size + _DIAG_MSG.size:
                        fam, state, _, _, sport, _, src, _, _, _, _, _, _, _, inode = _DIAG_MSG.unpack_from(
                            data, off + _NLMSGHDR.size
                        )
                        ip = socket.inet_ntop(fam, src[:4] if fam == socket.AF_INET else src)
                        out.append(DiagSocket(state, ip, socket.ntohs(sport), inode))
                off += (length + 3) & ~3


_WILDCARDS = frozenset({"0.0.0.0", "::"})


class SocketAttributor:
    """Which process holds the socket with this local (ip, port): sock_diag gives the inode, /proc/<pid>/fd the pid.

    Bounded: a token bucket on lookups (a query flood gets a lookup per ``1/rate`` s, the rest are counted as
    skipped), a cap on the fd links read per lookup, and bounded caches. Candidates are the processes of the
    table (the task's), those that owned sockets lately first; a pid not yet in the table (a process younger than
    the last poll) is looked for in /proc after them.
    """

    def __init__(
        self,
        table: ProcessTable | None = None,
        *,
        max_lookups_per_s: float = 200.0,
        burst: float = 100.0,
        max_links_per_lookup: int = 20000,
        max_links_per_s: float = 50000.0,
        cache_size: int = 16384,
    ) -> None:
        self.table = table
        self.rate = max_lookups_per_s
        self.burst = burst
        self._tokens = burst
        self._refilled = time.monotonic()
        self.max_links = max_links_per_lookup
        # fd links read per second over all lookups (a readlink is ~1 us): a socket nobody in the table owns
        # would otherwise cost a scan of every process, at each lookup
        self.links_rate = max_links_per_s
        self._link_tokens = float(max_links_per_lookup)
        self.cache_size = cache_size
        self._diag: SockDiag | None = None
        self._last_scan = time.monotonic()
        self._inode_owner: OrderedDict[int, tuple[int, str]] = OrderedDict()  # inode -> (pid, fd name)
        self._recent_pids: OrderedDict[int, None] = OrderedDict()  # pids that owned sockets lately, newest last
        self.stats: Counter[str] = Counter()

    def close(self) -> None:
        if self._diag is not None:
            self._diag.close()
            self._diag = None

    def _take_token(self) -> bool:
        now = time.monotonic()
        self._tokens = min(self.burst, self._tokens + (now - self._refilled) * self.rate)
        self._refilled = now
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        return True

    def __call__(self, local_ip: str, local_port: int, proto: int) -> int | None:
        return self.attribute(local_ip, local_port, proto)

    def attribute(self, local_ip: str, local_port: int, proto: int) -> int | None:
        if not self._take_token():
            self.stats["skipped_rate"] += 1
            return None
        inode = self.socket_inode(local_ip, local_port, proto)
        if inode is None:
            self.stats["socket_gone"] += 1
            return None
        pid = self.owner(inode)
        if pid is None:
            self.stats["owner_not_found"] += 1
        return pid

    def socket_inode(self, local_ip: str, local_port: int, proto: int) -> int | None:
        if self._diag is None:
            self._diag = SockDiag()
        v4 = ":" not in local_ip
        # IPv4 traffic of a dual-stack AF_INET6 socket shows its address as ::ffff:a.b.c.d
        wanted = {local_ip, f"::ffff:{local_ip}"} if v4 else {local_ip}
        families = (socket.AF_INET, socket.AF_INET6) if v4 else (socket.AF_INET6,)
        best: tuple[int, int] | None = None
        for family in families:
            try:
                found = self._diag.by_port(family, proto, local_port)
            except OSError:
                self.stats["diag_errors"] += 1
                continue
            for s in found:
                # timewait sockets have no inode; unconnected UDP sockets are bound to the wildcard address
                if not s.inode or (s.local_ip not in wanted and s.local_ip not in _WILDCARDS):
                    continue
                rank = (s.local_ip in wanted) * 4 + (s.state == TCP_LISTEN) * 2 + (s.state == TCP_SYN_SENT)
                if best is None or rank > best[0]:
                    best = (rank, s.inode)
            if best is not None:
                break
        return None if best is None else best[1]

    def owner(self, inode: int) -> int | None:
        cached = self._inode_owner.get(inode)
        if cached is not None:
            pid, fd = cached
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") == f"{_SOCKET_LINK}{inode}]":
                    self.stats["cache_hits"] += 1
                    self._inode_owner.move_to_end(inode)
                    return pid
            except OSError:
                pass
            del self._inode_owner[inode]
        now = time.monotonic()
        self._link_tokens = min(float(self.max_links), self._link_tokens + (now - self._last_scan) * self.links_rate)
        self._last_scan = now
        budget = int(self._link_tokens)
        if budget <= 0:
            self.stats["scan_budget_exhausted"] += 1
            return None
        for pid in self._candidates():
            found, used = self._scan(pid, inode, budget)
            budget -= used
            self._link_tokens -= used
            if found:
                self._recent_pids[pid] = None
                self._recent_pids.move_to_end(pid)
                while len(self._recent_pids) > 64:
                    self._recent_pids.popitem(last=False)
                return pid
            if budget <= 0:
                self.stats["scan_budget_exhausted"] += 1
                return None
        return None

    def _candidates(self) -> Iterable[int]:
        seen: set[int] = set()
        table_pids = self.table.pids() if self.table is not None else []
        for group in (reversed(list(self._recent_pids)), table_pids):
            for pid in group:
                if pid not in seen:
                    seen.add(pid)
                    yield pid
        try:
            rest = [int(n) for n in os.listdir("/proc") if n.isdigit()]
        except OSError:
            return
        for pid in rest:
            if pid not in seen:
                seen.add(pid)
                yield pid

    def _scan(self, pid: int, inode: int, budget: int) -> tuple[bool, int]:
        """Read pid's fd links; remember every socket seen (later lookups of them cost one readlink)."""
        want = f"{_SOCKET_LINK}{inode}]"
        try:
            dfd = os.open(f"/proc/{pid}/fd", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            return False, 1
        used = 1
        try:
            for name in os.listdir(dfd):
                if used >= budget:
                    break
                used += 1
                try:
                    link = os.readlink(name, dir_fd=dfd)
                except OSError:
                    continue
                if not link.startswith(_SOCKET_LINK):
                    continue
                try:
                    self._inode_owner[int(link[8:-1])] = (pid, name)
                except ValueError:
                    continue
                if len(self._inode_owner) > self.cache_size:
                    self._inode_owner.popitem(last=False)
                if link == want:
                    return True, used
        except OSError:
            pass
        finally:
            os.close(dfd)
        return False, used


_default_attributor: SocketAttributor | None = None


def attribute(local_ip: str, local_port: int, proto: int) -> int | None:
    """The pid holding the TCP/UDP socket bound to (local_ip, local_port) in our network namespace, or None.

    Module-level form with a shared attributor and no process table (every pid of /proc is a candidate).
    """
    global _default_attributor
    if _default_attributor is None:
        _default_attributor = SocketAttributor(None)
    return _default_attributor.attribute(local_ip, local_port, proto)


# -- the collector --------------------------------------------------------------------------------------------
@dataclass(slots=True)
class _TcpPending:
    next_seq: int
    data: bytes
    expires: float


_TCP_MAX_FLOWS = 64
_TCP_FLOW_TTL = 2.0
_SYN_DEDUP_TTL = 3.0
_SYN_DEDUP_MAX = 4096
_RECENT_TTL = 2.0
_RECENT_MAX = 4096


class PacketCollector:
    """DNS and TCP SYN events from the task's network namespace.

    ``dns.query`` / ``dns.response`` data: ``queryName`` (lower case, no final dot), ``queryType`` ("A", ...),
    ``id``, ``transport`` ("udp"/"tcp"), ``direction`` (OUTBOUND: a process of the task asked a resolver; INBOUND:
    the task answers someone else's query), ``resolverIp``, ``resolverPort``, ``localIp``, ``localPort``,
    ``remoteIp``, ``remotePort`` (the other end: the resolver, or the client of a local server), ``addressFamily``
    ("IPv4"/"IPv6"), ``interface``, ``pid`` (the local process, or None); responses add
    ``rcode`` ("NOERROR", "NXDOMAIN", ...), ``truncated`` and ``answers`` (list of {name, type, value, ttl}, every
    record type, A/AAAA/CNAME included); ``opcode`` is there when it is not QUERY.

    ``net.syn`` data: ``localIp``, ``localPort``, ``remoteIp``, ``remotePort``, ``addressFamily``, ``direction``
    (OUTBOUND: the task connects out; INBOUND: someone connects to the task), ``interface``, ``pid``. SYN
    retransmissions (same four-tuple and sequence number within 3 s) are counted, not reported again.
    """

    name = "packet"

    def __init__(
        self,
        emit: Emit,
        table: ProcessTable,
        *,
        rcvbuf: int = 4 << 20,
        batch: int = 256,
        cpu_budget: float = 0.25,
        budget_window: float = 0.5,
        stats_interval: float = 1.0,
        max_wakeups_per_s: float = 1000.0,
        attribute: Attribute | None = None,
        attribute_syns: bool = True,
        frame_hook: FrameHook | None = None,
    ) -> None:
        self.emit = emit
        self.table = table
        self.rcvbuf = rcvbuf
        self.batch = batch
        # fraction of one core for reading and decoding; over it the socket rests until the window ends
        self.cpu_budget = cpu_budget
        self.budget_window = budget_window
        self.stats_interval = stats_interval
        # Each wake-up of the loop costs tens of microseconds of Python; a packet per wake-up at a few thousand
        # packets a second costs more than decoding them. Above this rate the socket rests for a millisecond
        # between reads, so packets are read in batches. Below it every packet is read at once, which matters
        # for attribution: the socket that sent a query may be closed a millisecond later.
        self.max_wakeups_per_s = max_wakeups_per_s
        self._wake_tokens = max_wakeups_per_s / 20
        self._wake_last = 0.0
        self._own_attributor: SocketAttributor | None = None
        if attribute is None:
            self._own_attributor = SocketAttributor(table)
            attribute = self._own_attributor.attribute
        self._attribute: Attribute = attribute
        self.attribute_syns = attribute_syns
        self.frame_hook = frame_hook
        self.dns = DnsDecoder()
        self.stats: Counter[str] = Counter()
        self.kernel_packets = 0
        self.kernel_drops = 0
        self.effective_rcvbuf = 0
        self._sock: socket.socket | None = None
        self._buf = bytearray(FULL_SNAPLEN)
        self._view = memoryview(self._buf)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopped = asyncio.Event()
        # set once the socket is open and filtered: from then on nothing matching is missed
        self.capturing = asyncio.Event()
        self._reading = False
        self._window_start = 0.0
        self._window_cpu = 0.0
        self._cpu_total = 0.0
        self._resume: asyncio.TimerHandle | None = None
        self._tick: asyncio.TimerHandle | None = None
        self._tcp: OrderedDict[tuple[str, int, str, int], _TcpPending] = OrderedDict()
        self._syns: OrderedDict[tuple[str, int, str, int, int], float] = OrderedDict()
        # (proto, local ip, local port) -> (pid, when): the query's owner, for the response that follows it
        self._recent: OrderedDict[tuple[int, str, int], tuple[int | None, float]] = OrderedDict()

    # -- lifecycle ------------------------------------------------------------------------------------------
    async def run(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._sock, self.effective_rcvbuf = open_packet_socket(self.rcvbuf)
        self._window_start = time.monotonic()
        try:
            self._start_reading()
            self._schedule_tick()
            self.capturing.set()
            await self._stopped.wait()
        finally:
            self._teardown()

    def stop(self) -> None:
        self._stopped.set()

    def _teardown(self) -> None:
        for handle in (self._resume, self._tick):
            if handle is not None:
                handle.cancel()
        if self._sock is not None:
            if self._reading and self._loop is not None:
                self._loop.remove_reader(self._sock.fileno())
            self._reading = False
            self._poll_kernel_stats()
            self._sock.close()
            self._sock = None
        if self._own_attributor is not None:
            self._own_attributor.close()

    def _start_reading(self) -> None:
        self._resume = None
        if self._sock is not None and self._loop is not None and not self._reading:
            self._loop.add_reader(self._sock.fileno(), self._on_readable)
            self._reading = True

    def _schedule_tick(self) -> None:
        assert self._loop is not None
        self._tick = self._loop.call_later(self.stats_interval, self._on_tick)

    def _on_tick(self) -> None:
        self._poll_kernel_stats()
        now = time.monotonic()
        for key, pending in list(self._tcp.items()):
            if pending.expires < now:
                del self._tcp[key]
                self.stats["tcp_partial"] += 1
        self._schedule_tick()

    def _poll_kernel_stats(self) -> None:
        if self._sock is None:
            return
        try:
            packets, drops = read_packet_statistics(self._sock)
        except OSError:
            return
        self.kernel_packets += packets
        self.kernel_drops += drops

    # -- reading --------------------------------------------------------------------------------------------
    def _on_readable(self) -> None:
        sock = self._sock
        if sock is None:
            return
        t0 = time.thread_time()
        recv = sock.recvfrom_into
        buf, view, handle = self._buf, self._view, self.handle_frame
        for _ in range(self.batch):
            try:
                n, addr = recv(buf)
            except BlockingIOError:
                break
            except OSError:  # e.g. ENETDOWN for packets of an interface that went down: they are gone
                self.stats["read_errors"] += 1
                break
            handle(bytes(view[:n]), addr[0], addr[2], addr[3])
        used = time.thread_time() - t0
        self._cpu_total += used
        self._charge(used)
        self._pace()

    def _pace(self) -> None:
        now = time.monotonic()
        rate = self.max_wakeups_per_s
        self._wake_tokens = min(rate / 20, self._wake_tokens + (now - self._wake_last) * rate) - 1.0
        self._wake_last = now
        if self._wake_tokens < 0 and self._reading and self._sock is not None and self._loop is not None:
            self._loop.remove_reader(self._sock.fileno())
            self._reading = False
            self.stats["paced"] += 1
            self._resume = self._loop.call_later(max(0.001, -self._wake_tokens / rate), self._start_reading)

    def _charge(self, used: float) -> None:
        if self.cpu_budget >= 1.0 or self._loop is None:
            return
        now = time.monotonic()
        if now - self._window_start >= self.budget_window:
            self._window_start, self._window_cpu = now, 0.0
        self._window_cpu += used
        if self._window_cpu > self.cpu_budget * self.budget_window and self._reading and self._sock is not None:
            # Over budget: leave the socket to the kernel until the window ends. What overflows the receive
            # buffer meanwhile is dropped by the kernel and shows in kernel_drops.
            self._loop.remove_reader(self._sock.fileno())
            self._reading = False
            self.stats["budget_pauses"] += 1
            self._resume = self._loop.call_later(self._window_start + self.budget_window - now, self._start_reading)

    def handle_frame(self, frame: bytes, ifname: str, pkttype: int, hatype: int) -> None:
        """One captured frame (as recvfrom gives it on a SOCK_RAW packet socket). Never raises."""
        self.stats["packets"] += 1
        if self.frame_hook is not None:
            self.frame_hook(frame, ifname, pkttype, hatype)
        try:
            if pkttype == PACKET_OUTGOING and hatype == ARPHRD_LOOPBACK:
                raise NotOurs("loopback duplicate")
            pkt = parse_packet(frame, network_offset(frame, hatype))
            seen = Seen(ifname, pkttype == PACKET_OUTGOING, hatype == ARPHRD_LOOPBACK)
            if pkt.proto == socket.IPPROTO_TCP and pkt.flags & (TCP_SYN | TCP_ACK) == TCP_SYN:
                self._on_syn(pkt, seen)
            elif DNS_PORT in (pkt.sport, pkt.dport) and (pkt.proto == socket.IPPROTO_UDP or pkt.payload):
                if pkt.fragment:
                    self.stats["fragments"] += 1
                elif pkt.proto == socket.IPPROTO_UDP:
                    self._on_dns(pkt.payload, pkt, seen, "udp")
                else:
                    self._on_tcp_dns(pkt, seen)
            else:
                raise NotOurs("neither DNS nor SYN")
        except Malformed:
            self.stats["malformed"] += 1
        except NotOurs:
            self.stats["filter_escapes"] += 1
        except Exception:  # a bug of ours must not stop the capture; counted, and visible in tests
            self.stats["internal_errors"] += 1

    # -- SYN ------------------------------------------------------------------------------------------------
    def _on_syn(self, pkt: Packet, seen: Seen) -> None:
        # A retransmitted SYN keeps its initial sequence number; a new connection reusing the ports at once
        # (after an RST there is no TIME_WAIT) has another one.
        key = (pkt.src, pkt.sport, pkt.dst, pkt.dport, pkt.seq)
        now = time.monotonic()
        last = self._syns.get(key)
        if last is not None and now - last < _SYN_DEDUP_TTL:
            self.stats["syn_retransmits"] += 1
            return
        self._syns[key] = now
        self._syns.move_to_end(key)
        while len(self._syns) > _SYN_DEDUP_MAX:
            self._syns.popitem(last=False)
        self.stats["syns"] += 1
        # On loopback both ends are ours: the connecting side is the one to report.
        out = seen.outgoing or seen.loopback
        local_ip, local_port, remote_ip, remote_port = (
            (pkt.src, pkt.sport, pkt.dst, pkt.dport) if out else (pkt.dst, pkt.dport, pkt.src, pkt.sport)
        )
        pid = self._lookup(local_ip, local_port, socket.IPPROTO_TCP) if self.attribute_syns else None
        self.emit(
            RuntimeEvent(
                "net.syn",
                self.table.get(pid) if pid is not None else None,
                data={
                    "localIp": local_ip,
                    "localPort": local_port,
                    "remoteIp": remote_ip,
                    "remotePort": remote_port,
                    "addressFamily": "IPv4" if pkt.family == socket.AF_INET else "IPv6",
                    "direction": "OUTBOUND" if out else "INBOUND",
                    "interface": seen.ifname,
                    "pid": pid,
                },
            )
        )

    # -- DNS ------------------------------------------------------------------------------------------------
    def _on_tcp_dns(self, pkt: Packet, seen: Seen) -> None:
        """DNS over TCP: a 2-byte length, then the message. Messages split over segments are put together when
        the segments come in order; anything else is counted as tcp_partial and skipped."""
        key = (pkt.src, pkt.sport, pkt.dst, pkt.dport)
        data = pkt.payload
        pending = self._tcp.pop(key, None)
        if pending is not None:
            if pending.next_seq == pkt.seq:
                data = pending.data + data
            else:
                self.stats["tcp_partial"] += 1
        while len(data) >= 2:
            length = (data[0] << 8) | data[1]
            if len(data) - 2 < length:
                break
            self._on_dns(data[2 : 2 + length], pkt, seen, "tcp")
            data = data[2 + length :]
        if data:
            if len(self._tcp) >= _TCP_MAX_FLOWS:
                self._tcp.popitem(last=False)
                self.stats["tcp_partial"] += 1
            self._tcp[key] = _TcpPending((pkt.seq + len(pkt.payload)) & 0xFFFFFFFF, data,
                                         time.monotonic() + _TCP_FLOW_TTL)  # fmt: skip

    def _on_dns(self, wire: bytes, pkt: Packet, seen: Seen, transport: str) -> None:
        try:
            msg = self.dns.decode(wire)
        except Malformed:
            self.stats["malformed"] += 1
            return
        proto = pkt.proto
        if msg.response:
            self.stats["dns_responses"] += 1
            # the resolver sent it; we asked unless it left from here (a local server answering)
            ours = seen.loopback or not seen.outgoing
            resolver_ip, resolver_port = pkt.src, pkt.sport
            local_ip, local_port = (pkt.dst, pkt.dport) if ours else (pkt.src, pkt.sport)
            remote_ip, remote_port = (pkt.src, pkt.sport) if ours else (pkt.dst, pkt.dport)
        else:
            self.stats["dns_queries"] += 1
            ours = seen.loopback or seen.outgoing
            resolver_ip, resolver_port = pkt.dst, pkt.dport
            local_ip, local_port = (pkt.src, pkt.sport) if ours else (pkt.dst, pkt.dport)
            remote_ip, remote_port = (pkt.dst, pkt.dport) if ours else (pkt.src, pkt.sport)
        pid: int | None
        if msg.response and ours:
            pid = self._recent_owner(proto, local_ip, local_port)
        else:
            pid = self._lookup(local_ip, local_port, proto)
            if ours:
                self._remember(proto, local_ip, local_port, pid)
        data: dict[str, Any] = {
            "queryName": msg.query_name,
            "queryType": msg.query_type,
            "id": (wire[0] << 8) | wire[1],
            "transport": transport,
            "direction": "OUTBOUND" if ours else "INBOUND",
            "resolverIp": resolver_ip,
            "resolverPort": resolver_port,
            "localIp": local_ip,
            "localPort": local_port,
            "remoteIp": remote_ip,
            "remotePort": remote_port,
            "addressFamily": "IPv4" if pkt.family == socket.AF_INET else "IPv6",
            "interface": seen.ifname,
            "pid": pid,
        }
        if msg.opcode != "QUERY":
            data["opcode"] = msg.opcode
        if msg.response:
            data["rcode"] = msg.rcode
            data["truncated"] = msg.truncated
            data["answers"] = [{"name": n, "type": t, "value": v, "ttl": ttl} for n, t, v, ttl in msg.answers]
        process = self.table.get(pid) if pid is not None else None
        self.emit(RuntimeEvent("dns.response" if msg.response else "dns.query", process, data=data))

    # -- attribution ----------------------------------------------------------------------------------------
    def _lookup(self, local_ip: str, local_port: int, proto: int) -> int | None:
        try:
            pid = self._attribute(local_ip, local_port, proto)
        except Exception:  # a swapped-in attributor failing must not stop the capture
            self.stats["attribution_errors"] += 1
            pid = None
        self.stats["attribution_hits" if pid is not None else "attribution_misses"] += 1
        return pid

    def _remember(self, proto: int, ip: str, port: int, pid: int | None) -> None:
        key = (proto, ip, port)
        self._recent[key] = (pid, time.monotonic())
        self._recent.move_to_end(key)
        while len(self._recent) > _RECENT_MAX:
            self._recent.popitem(last=False)

    def _recent_owner(self, proto: int, ip: str, port: int) -> int | None:
        """The owner of the query a response answers: by then the asker may well have closed its socket."""
        hit = self._recent.get((proto, ip, port))
        if hit is not None and time.monotonic() - hit[1] < _RECENT_TTL and hit[0] is not None:
            self.stats["attribution_hits"] += 1
            return hit[0]
        return self._lookup(ip, port, proto)

    # -- reporting ------------------------------------------------------------------------------------------
    COUNTERS = (
        "packets", "dns_queries", "dns_responses", "syns", "syn_retransmits", "malformed", "fragments",
        "tcp_partial", "filter_escapes", "internal_errors", "read_errors", "budget_pauses", "paced",
        "attribution_hits", "attribution_misses", "attribution_errors",
    )  # fmt: skip
    ATTRIBUTION_COUNTERS = (
        "skipped_rate", "socket_gone", "owner_not_found", "cache_hits", "diag_errors", "scan_budget_exhausted",
    )  # fmt: skip

    def snapshot(self) -> dict[str, Any]:
        """Every counter, always present (zero included): kernel_drops and filter_escapes are the ones to watch."""
        self._poll_kernel_stats()
        out: dict[str, Any] = {k: self.stats[k] for k in self.COUNTERS}
        out.update(
            kernel_packets=self.kernel_packets,
            kernel_drops=self.kernel_drops,
            rcvbuf=self.effective_rcvbuf,
            cpu_seconds=round(self._cpu_total, 4),
            dns_cache_entries=len(self.dns),
            dns_cache_hits=self.dns.hits,
            tcp_pending_flows=len(self._tcp),
        )
        if self._own_attributor is not None:
            st = self._own_attributor.stats
            out.update({f"attribution_{k}": st[k] for k in self.ATTRIBUTION_COUNTERS})
        return out


# -- probe ----------------------------------------------------------------------------------------------------
def probe() -> dict[str, Any]:
    """Whether packet capture works here, tried for real: socket, filter, bind, sock_diag."""
    details: dict[str, Any] = {}
    try:
        sock, rcvbuf = open_packet_socket(4 << 20)
    except PermissionError:
        return {"available": False, "reason": "missing capability NET_RAW (AF_PACKET socket: EPERM)"}
    except OSError as exc:
        if exc.errno == errno.EAFNOSUPPORT:
            return {"available": False, "reason": "AF_PACKET is not supported by this kernel"}
        return {"available": False, "reason": f"AF_PACKET socket with BPF filter failed: {exc}"}
    sock.close()
    details["rcvbuf"] = rcvbuf
    reason = "AF_PACKET with BPF filter"
    if rcvbuf < 2 * (4 << 20):
        # the kernel reports twice what it was asked for; less means rmem_max capped it (no NET_ADMIN)
        reason += f"; receive buffer capped at {rcvbuf} bytes by net.core.rmem_max"
    try:
        diag = SockDiag()
        diag.by_port(socket.AF_INET, socket.IPPROTO_UDP, DNS_PORT)
        diag.close()
        details["attribution"] = True
    except OSError as exc:
        details["attribution"] = False
        reason += f"; no process attribution (sock_diag: {exc})"
    return {"available": True, "reason": reason, "details": details}


# -- standalone capture (diagnostics, tests, bench) -----------------------------------------------------------
async def _standalone(args: argparse.Namespace, events_out: IO[bytes] | None, record_out: IO[str] | None) -> int:
    """Capture until SIGTERM/SIGINT (or "stop"/EOF on stdin with --commands); "stats" prints a snapshot."""
    from collectors.process import ProcessCollector

    # the process collector's own table: ProcessCollector(table=...) ignores an empty table it is given
    processes = ProcessCollector(lambda ev: None, hash_executables=False)
    table = processes.table

    def emit(ev: RuntimeEvent) -> None:
        if events_out is not None:
            events_out.write(ev.to_bytes() + b"\n")

    def record(frame: bytes, ifname: str, pkttype: int, hatype: int) -> None:
        assert record_out is not None
        line = json.dumps({"ifname": ifname, "pkttype": pkttype, "hatype": hatype, "hex": frame.hex()})
        record_out.write(line + "\n")

    collector = PacketCollector(
        emit, table, rcvbuf=args.rcvbuf, cpu_budget=args.cpu_budget, frame_hook=record if record_out else None
    )
    loop = asyncio.get_running_loop()
    proc_source = None
    if args.processes:
        from collectors.proc_poll import PollingProcessSource

        proc_source = PollingProcessSource(processes)
        proc_task = loop.create_task(proc_source.run())
    capture = loop.create_task(collector.run())

    def flush() -> None:
        for f in (events_out, record_out):
            if f is not None:
                f.flush()

    def flush_often() -> None:
        flush()
        if not capture.done():
            loop.call_later(0.02, flush_often)

    def stop() -> None:
        collector.stop()
        if proc_source is not None:
            proc_source.stop()

    def on_stdin() -> None:
        line = sys.stdin.readline()
        if line.strip() == "stats":
            flush()
            print(json.dumps({**collector.snapshot(), "processes": len(table)}), flush=True)
        elif not line or line.strip() == "stop":
            loop.remove_reader(sys.stdin.fileno())
            stop()

    loop.add_signal_handler(signal.SIGTERM, stop)
    loop.add_signal_handler(signal.SIGINT, stop)
    started = loop.create_task(collector.capturing.wait())
    await asyncio.wait([started, capture], return_when=asyncio.FIRST_COMPLETED)
    if capture.done():
        started.cancel()
        exc = capture.exception()
        why = f"missing capability NET_RAW: {exc}" if isinstance(exc, PermissionError) else repr(exc)
        print(json.dumps({"error": why}), flush=True)
        return 1
    print(json.dumps({"ready": True, "pid": os.getpid(), "rcvbuf": collector.effective_rcvbuf}), flush=True)
    if args.commands:
        try:
            loop.add_reader(sys.stdin.fileno(), on_stdin)
        except OSError:  # a regular file or /dev/null cannot be polled: no commands then, signals still work
            print("stdin cannot be polled: --commands ignored", file=sys.stderr)
    flush_often()
    await capture
    if proc_source is not None:
        proc_source.stop()
        await proc_task
    flush()
    print(json.dumps({"final": collector.snapshot()}), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m collectors.packets", description="Capture DNS and TCP SYNs in this network namespace."
    )
    p.add_argument("--probe", action="store_true", help="print the probe as JSON and exit")
    p.add_argument("--events-out", help="append events as JSON lines to this file")
    p.add_argument("--record", help="append every frame that reaches Python as JSON lines (a test corpus)")
    p.add_argument("--processes", action="store_true", help="also run /proc polling, so events carry processes")
    p.add_argument("--rcvbuf", type=int, default=4 << 20)
    p.add_argument("--cpu-budget", type=float, default=0.25, help="fraction of one core (1 = unbounded)")
    p.add_argument("--commands", action="store_true", help='read "stats"/"stop" lines on stdin')
    args = p.parse_args(argv)
    if args.probe:
        print(json.dumps(probe()))
        return 0
    with contextlib.ExitStack() as files:
        events_out = files.enter_context(open(args.events_out, "ab")) if args.events_out else None
        record_out = files.enter_context(open(args.record, "a")) if args.record else None
        return asyncio.run(_standalone(args, events_out, record_out))


if __name__ == "__main__":
    sys.exit(main())
