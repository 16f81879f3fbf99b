"""Ethernet / 802.1Q / IPv4 / IPv6 / TCP packets as bytes, with real checksums."""

import ipaddress
import struct

ETH_IP, ETH_IPV6, ETH_8021Q, ETH_8021AD = 0x0800, 0x86DD, 0x8100, 0x88A8
FIN, SYN, RST, PSH, ACK = 0x01, 0x02, 0x04, 0x08, 0x10

CLIENT_MAC = bytes.fromhex("020000000001")
BROKER_MAC = bytes.fromhex("020000000002")


def checksum(data):
    if len(data) % 2:
        data += b"\x00"
    total = sum(struct.unpack("!%dH" % (len(data) // 2), data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def tcp(src, dst, sport, dport, seq, payload=b"", flags=ACK | PSH, ack=1, options=b""):
    """A TCP segment with its checksum over the IPv4 or IPv6 pseudo-header."""
    src_ip, dst_ip = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    doff = (20 + len(options)) // 4
    header = (
        struct.pack(
            "!HHIIBBHHH", sport, dport, seq & 0xFFFFFFFF, ack, doff << 4, flags, 65535, 0, 0
        )
        + options
    )
    segment = header + payload
    if src_ip.version == 4:
        pseudo = src_ip.packed + dst_ip.packed + struct.pack("!BBH", 0, 6, len(segment))
    else:
        pseudo = src_ip.packed + dst_ip.packed + struct.pack("!IxxxB", len(segment), 6)
    csum = checksum(pseudo + segment)
    return segment[:16] + struct.pack("!H", csum) + segment[18:]


def ipv4(src, dst, l4, proto=6, options=b"", frag_off=0, ttl=64):
    ihl = (20 + len(options)) // 4
    header = (
        struct.pack(
            "!BBHHHBBH4s4s",
            0x40 | ihl,
            0,
            20 + len(options) + len(l4),
            1,
            frag_off,
            ttl,
            proto,
            0,
            ipaddress.ip_address(src).packed,
            ipaddress.ip_address(dst).packed,
        )
        + options
    )
    header = header[:10] + struct.pack("!H", checksum(header)) + header[12:]
    return header + l4


def ipv6(src, dst, l4, nexthdr=6, hop_limit=64):
    return (
        struct.pack(
            "!IHBB16s16s",
            6 << 28,
            len(l4),
            nexthdr,
            hop_limit,
            ipaddress.ip_address(src).packed,
            ipaddress.ip_address(dst).packed,
        )
        + l4
    )


def ethernet(l3, ethertype, vlans=()):
    """vlans: (tpid, vid) tags, outermost first, inline as a tc program may see them."""
    out = BROKER_MAC + CLIENT_MAC
    for tpid, vid in vlans:
        out += struct.pack("!HH", tpid, vid)
    return out + struct.pack("!H", ethertype) + l3


def tcp_packet(
    src, dst, sport, dport, seq, payload=b"", flags=ACK | PSH, vlans=(), l2=True, ip_options=b""
):
    """The whole frame a classifier sees for one TCP segment."""
    segment = tcp(src, dst, sport, dport, seq, payload, flags)
    if ipaddress.ip_address(src).version == 4:
        l3, ethertype = ipv4(src, dst, segment, options=ip_options), ETH_IP
    else:
        l3, ethertype = ipv6(src, dst, segment), ETH_IPV6
    if not l2:
        return l3
    return ethernet(l3, ethertype, vlans)


def tcp_checksum_ok(packet, l3_offset=14):
    """Verify the TCP checksum of an Ethernet + IPv4/IPv6 packet (e.g. after a rewrite)."""
    version = packet[l3_offset] >> 4
    if version == 4:
        ihl = (packet[l3_offset] & 0x0F) * 4
        total = struct.unpack("!H", packet[l3_offset + 2 : l3_offset + 4])[0]
        src, dst = packet[l3_offset + 12 : l3_offset + 16], packet[l3_offset + 16 : l3_offset + 20]
        segment = packet[l3_offset + ihl : l3_offset + total]
        pseudo = src + dst + struct.pack("!BBH", 0, 6, len(segment))
    else:
        plen = struct.unpack("!H", packet[l3_offset + 4 : l3_offset + 6])[0]
        src, dst = packet[l3_offset + 8 : l3_offset + 24], packet[l3_offset + 24 : l3_offset + 40]
        segment = packet[l3_offset + 40 : l3_offset + 40 + plen]
        pseudo = src + dst + struct.pack("!IxxxB", len(segment), 6)
    return checksum(pseudo + segment) == 0


def tcp_flags(packet, l3_offset=14):
    version = packet[l3_offset] >> 4
    l4 = l3_offset + ((packet[l3_offset] & 0x0F) * 4 if version == 4 else 40)
    return packet[l4 + 13]
