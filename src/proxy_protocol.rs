// SPDX-License-Identifier: MPL-2.0

//! Reader of the PROXY protocol header (versions 1 and 2, as HAProxy's `send-proxy`
//! and `send-proxy-v2` write it; spec: HAProxy's `doc/proxy-protocol.txt`). A load
//! balancer in front of the server puts it before the client's first byte so the
//! server learns the viewer's address. `rstcpserversink` will use it for
//! `proxy-protocol=true` (issue 11): the address it carries becomes the client's for
//! limits, logs and stats, and a connection without a valid header is refused.
//!
//! Incremental and plain: [`parse_proxy_header`] is given every byte read so far and
//! answers "read more", a complete header with the number of bytes it took (what
//! follows is the HTTP request), or why the bytes can never be one. It is fed
//! untrusted bytes, so it never panics and bounds how much it waits for.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The longest version 1 line, CRLF included (the spec's worst case, "UNKNOWN" with
/// two full IPv6 addresses): without a CRLF by then, the line is invalid.
pub const V1_MAX_LEN: usize = 107;

/// The longest version 2 header accepted: the fixed 16 bytes plus at most this many
/// address and TLV bytes. The format allows 65535, but what HAProxy sends (216 bytes
/// of UNIX addresses at most, then ALPN, authority/SNI up to 255 bytes, a unique ID
/// up to 128, the SSL TLV with version, cipher, algorithms and client CN) fits in far
/// less; a larger length is refused rather than buffered for every pending connection.
pub const V2_MAX_PAYLOAD: usize = 2048;

/// Version 2's 12-byte signature: it cannot start any text protocol.
const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
const V1_PREFIX: &[u8; 6] = b"PROXY ";

/// Where the proxied connection came from and went to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxiedAddresses {
    /// TCP over IPv4 or IPv6: the client as the proxy saw it, and the address it dialled.
    Tcp {
        source: SocketAddr,
        destination: SocketAddr,
    },
    /// Version 2 LOCAL: the proxy's own connection (a health check). The socket's
    /// own addresses are the real ones.
    Local,
    /// Version 1 UNKNOWN, or version 2 PROXY over a family or transport that carries
    /// no TCP address (UNSPEC, UNIX, UDP): the spec says to use the socket's own
    /// addresses, as without a header.
    Unknown,
}

/// A complete header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProxyHeader {
    /// 1 or 2.
    pub version: u8,
    pub addresses: ProxiedAddresses,
    /// How many bytes of the buffer the header took: the request starts after them.
    pub consumed: usize,
}

/// Why the bytes are not a PROXY header. The connection is to be closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Invalid {
    /// Neither "PROXY " nor version 2's signature.
    NotProxyProtocol,
    /// A version 1 line with no CRLF within [`V1_MAX_LEN`] bytes.
    V1TooLong,
    /// A version 1 line that does not match the grammar exactly.
    V1Malformed,
    /// Version 2's signature with a version other than 2.
    V2Version,
    /// A command other than LOCAL and PROXY.
    V2Command,
    /// An address family or transport byte the spec leaves unassigned.
    V2FamilyOrTransport,
    /// A declared length over [`V2_MAX_PAYLOAD`].
    V2TooLong,
    /// The declared length is shorter than the family's addresses.
    V2AddressesTruncated,
    /// A TLV runs past the end of the header.
    V2TlvTruncated,
}

impl fmt::Display for Invalid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Invalid::NotProxyProtocol => "not a PROXY protocol header",
            Invalid::V1TooLong => "PROXY v1 line without CRLF in 107 bytes",
            Invalid::V1Malformed => "malformed PROXY v1 line",
            Invalid::V2Version => "PROXY v2 signature with an unknown version",
            Invalid::V2Command => "PROXY v2 unknown command",
            Invalid::V2FamilyOrTransport => "PROXY v2 unknown address family or transport",
            Invalid::V2TooLong => "PROXY v2 header longer than accepted",
            Invalid::V2AddressesTruncated => "PROXY v2 address block too short",
            Invalid::V2TlvTruncated => "PROXY v2 TLV runs past the header",
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyParsed {
    /// Not complete yet and nothing wrong so far: read more.
    NeedMore,
    Complete(ProxyHeader),
    Invalid(Invalid),
}

/// Reads the PROXY header at the start of `buf` (everything read so far).
pub fn parse_proxy_header(buf: &[u8]) -> ProxyParsed {
    // Decide on the version as soon as the bytes allow, so that a peer sending
    // anything else is refused at once instead of waited for.
    if is_prefix_either_way(buf, V2_SIGNATURE) {
        if buf.len() < V2_SIGNATURE.len() {
            return ProxyParsed::NeedMore;
        }
        return parse_v2(buf);
    }
    if is_prefix_either_way(buf, V1_PREFIX) {
        if buf.len() < V1_PREFIX.len() {
            return ProxyParsed::NeedMore;
        }
        return parse_v1(buf);
    }
    ProxyParsed::Invalid(Invalid::NotProxyProtocol)
}

/// Whether the shorter of `buf` and `expected` starts the other.
fn is_prefix_either_way(buf: &[u8], expected: &[u8]) -> bool {
    let n = buf.len().min(expected.len());
    buf[..n] == expected[..n]
}

fn parse_v1(buf: &[u8]) -> ProxyParsed {
    let window = &buf[..buf.len().min(V1_MAX_LEN)];
    let Some(cr) = window.iter().position(|&b| b == b'\r') else {
        // Only printable ASCII may come before the CRLF; a lone LF or anything
        // binary can be refused without waiting for the rest.
        if window.iter().any(|&b| !(b' '..=b'~').contains(&b)) {
            return ProxyParsed::Invalid(Invalid::V1Malformed);
        }
        return if buf.len() >= V1_MAX_LEN {
            ProxyParsed::Invalid(Invalid::V1TooLong)
        } else {
            ProxyParsed::NeedMore
        };
    };
    let line = &window[..cr];
    if line.iter().any(|&b| !(b' '..=b'~').contains(&b)) {
        return ProxyParsed::Invalid(Invalid::V1Malformed);
    }
    match buf.get(cr + 1) {
        None if cr + 1 < V1_MAX_LEN => return ProxyParsed::NeedMore,
        Some(b'\n') if cr + 2 <= V1_MAX_LEN => {}
        // A CR not followed by LF never ends the line (the spec forbids a lone CR).
        _ => return ProxyParsed::Invalid(Invalid::V1Malformed),
    }
    // Printable ASCII only, so this is valid UTF-8.
    let line = std::str::from_utf8(line).unwrap_or_default();
    match v1_addresses(line) {
        Some(addresses) => ProxyParsed::Complete(ProxyHeader {
            version: 1,
            addresses,
            consumed: cr + 2,
        }),
        None => ProxyParsed::Invalid(Invalid::V1Malformed),
    }
}

/// The addresses of a version 1 line (without its CRLF), if it is exactly right.
fn v1_addresses(line: &str) -> Option<ProxiedAddresses> {
    let rest = line.strip_prefix("PROXY ")?;
    // UNKNOWN may be followed by anything, which the receiver must ignore.
    if rest == "UNKNOWN" || rest.starts_with("UNKNOWN ") {
        return Some(ProxiedAddresses::Unknown);
    }
    // Exactly one space between fields: splitting on ' ' turns a doubled space into
    // an empty field, which no field parser accepts.
    let mut fields = rest.split(' ');
    let (Some(family), Some(src), Some(dst), Some(sport), Some(dport), None) = (
        fields.next(),
        fields.next(),
        fields.next(),
        fields.next(),
        fields.next(),
        fields.next(),
    ) else {
        return None;
    };
    // std's parsers take exactly the canonical forms the spec asks for: dotted
    // quads without leading zeros, and IPv6 text as inet_ntop writes it (HAProxy
    // uses inet_ntop, which may write "::ffff:1.2.3.4").
    let (src, dst): (IpAddr, IpAddr) = match family {
        "TCP4" => (
            src.parse::<Ipv4Addr>().ok()?.into(),
            dst.parse::<Ipv4Addr>().ok()?.into(),
        ),
        "TCP6" => (
            src.parse::<Ipv6Addr>().ok()?.into(),
            dst.parse::<Ipv6Addr>().ok()?.into(),
        ),
        _ => return None,
    };
    Some(ProxiedAddresses::Tcp {
        source: SocketAddr::new(src, v1_port(sport)?),
        destination: SocketAddr::new(dst, v1_port(dport)?),
    })
}

/// A decimal port without leading zeros (the spec forbids them, against octal).
fn v1_port(s: &str) -> Option<u16> {
    let digits_ok = !s.is_empty() && s.len() <= 5 && s.bytes().all(|b| b.is_ascii_digit());
    if !digits_ok || (s.len() > 1 && s.starts_with('0')) {
        return None;
    }
    s.parse().ok()
}

fn parse_v2(buf: &[u8]) -> ProxyParsed {
    use ProxyParsed::{Invalid as Bad, NeedMore};
    let Some(&version_command) = buf.get(12) else {
        return NeedMore;
    };
    if version_command >> 4 != 2 {
        return Bad(Invalid::V2Version);
    }
    let local = match version_command & 0x0f {
        0 => true,
        1 => false,
        _ => return Bad(Invalid::V2Command),
    };
    let Some(&family_transport) = buf.get(13) else {
        return NeedMore;
    };
    let (family, transport) = (family_transport >> 4, family_transport & 0x0f);
    if family > 3 || transport > 2 {
        return Bad(Invalid::V2FamilyOrTransport);
    }
    let (Some(&hi), Some(&lo)) = (buf.get(14), buf.get(15)) else {
        return NeedMore;
    };
    let len = usize::from(u16::from_be_bytes([hi, lo]));
    if len > V2_MAX_PAYLOAD {
        return Bad(Invalid::V2TooLong);
    }
    let Some(payload) = buf.get(16..16 + len) else {
        return NeedMore;
    };
    // The addresses that a family carries, then TLVs up to the declared length.
    // LOCAL ignores the family, but its length still says what to skip.
    let (addresses, address_len) = if local {
        (ProxiedAddresses::Local, 0)
    } else {
        match (family, transport) {
            (1, 1) => match payload.get(..12) {
                Some(a) => (v2_tcp4(a), 12),
                None => return Bad(Invalid::V2AddressesTruncated),
            },
            (2, 1) => match payload.get(..36) {
                Some(a) => (v2_tcp6(a), 36),
                None => return Bad(Invalid::V2AddressesTruncated),
            },
            // UNSPEC family or transport: address information is to be ignored.
            (0, _) | (_, 0) => (ProxiedAddresses::Unknown, 0),
            // The spec lets a receiver that does not support a valid combination
            // (UDP, UNIX) fall back to UNSPEC: keep the socket's addresses, but the
            // block must still hold the family's addresses.
            (1, _) => (ProxiedAddresses::Unknown, 12),
            (2, _) => (ProxiedAddresses::Unknown, 36),
            _ => (ProxiedAddresses::Unknown, 216),
        }
    };
    if !local && address_len > len {
        return Bad(Invalid::V2AddressesTruncated);
    }
    // TLVs are skipped, but their framing is checked: a header whose last TLV runs
    // past the declared length comes from a broken sender. LOCAL's block is skipped
    // whole (its contents are to be ignored). CRC32C TLVs are not verified (an
    // optional part of the spec, and the proxy is trusted by configuration anyway).
    if !local && !tlvs_well_framed(&payload[address_len..]) {
        return Bad(Invalid::V2TlvTruncated);
    }
    ProxyParsed::Complete(ProxyHeader {
        version: 2,
        addresses,
        consumed: 16 + len,
    })
}

fn v2_tcp4(a: &[u8]) -> ProxiedAddresses {
    let ip = |i: usize| IpAddr::from([a[i], a[i + 1], a[i + 2], a[i + 3]]);
    let port = |i: usize| u16::from_be_bytes([a[i], a[i + 1]]);
    ProxiedAddresses::Tcp {
        source: SocketAddr::new(ip(0), port(8)),
        destination: SocketAddr::new(ip(4), port(10)),
    }
}

fn v2_tcp6(a: &[u8]) -> ProxiedAddresses {
    let ip = |i: usize| {
        let mut octets = [0u8; 16];
        octets.copy_from_slice(&a[i..i + 16]);
        IpAddr::from(octets)
    };
    let port = |i: usize| u16::from_be_bytes([a[i], a[i + 1]]);
    ProxiedAddresses::Tcp {
        source: SocketAddr::new(ip(0), port(32)),
        destination: SocketAddr::new(ip(16), port(34)),
    }
}

/// Whether `tlvs` is a sequence of whole type-length-value records.
fn tlvs_well_framed(mut tlvs: &[u8]) -> bool {
    while !tlvs.is_empty() {
        let [_, hi, lo, ..] = *tlvs else {
            return false;
        };
        let Some(rest) = tlvs.get(3 + usize::from(u16::from_be_bytes([hi, lo]))..) else {
            return false;
        };
        tlvs = rest;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    const V1_TCP4: &[u8] = b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n";
    const V1_TCP6: &[u8] = b"PROXY TCP6 2001:db8::1 ::ffff:10.0.0.2 65535 8080\r\n";
    const V1_UNKNOWN: &[u8] = b"PROXY UNKNOWN\r\n";
    /// The spec's longest line: 107 bytes.
    const V1_UNKNOWN_LONGEST: &[u8] = b"PROXY UNKNOWN ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n";

    /// send-proxy-v2 for TCP over IPv4, 192.0.2.10:51000 -> 198.51.100.1:8080, no TLVs.
    const V2_TCP4: &[u8] = &[
        0x0d, 0x0a, 0x0d, 0x0a, 0x00, 0x0d, 0x0a, 0x51, 0x55, 0x49, 0x54, 0x0a, // signature
        0x21, // version 2, PROXY
        0x11, // AF_INET, STREAM
        0x00, 0x0c, // 12 address bytes
        192, 0, 2, 10, // source
        198, 51, 100, 1, // destination
        0xc7, 0x38, // source port 51000
        0x1f, 0x90, // destination port 8080
    ];

    /// The same as HAProxy writes it with TLVs: ALPN "http/1.1", authority
    /// "example.com", a 4-byte NOOP (as HAProxy pads), and a unique ID.
    const V2_TCP4_TLVS: &[u8] = &[
        0x0d, 0x0a, 0x0d, 0x0a, 0x00, 0x0d, 0x0a, 0x51, 0x55, 0x49, 0x54, 0x0a, //
        0x21, 0x11, //
        0x00, 0x3c, // 12 + 11 + 14 + 7 + 16 = 60
        192, 0, 2, 10, 198, 51, 100, 1, 0xc7, 0x38, 0x1f, 0x90, //
        0x01, 0x00, 0x08, b'h', b't', b't', b'p', b'/', b'1', b'.', b'1', // ALPN
        0x02, 0x00, 0x0b, b'e', b'x', b'a', b'm', b'p', b'l', b'e', b'.', b'c', b'o',
        b'm', // AUTHORITY
        0x04, 0x00, 0x04, 0, 0, 0, 0, // NOOP
        0x05, 0x00, 0x0d, b'a', b'b', b'c', b'd', b'e', b'f', b'g', b'h', b'i', b'j', b'k', b'l',
        b'm', // UNIQUE_ID
    ];

    /// TCP over IPv6, [2001:db8::5]:443 -> [2001:db8::1]:80.
    const V2_TCP6: &[u8] = &[
        0x0d, 0x0a, 0x0d, 0x0a, 0x00, 0x0d, 0x0a, 0x51, 0x55, 0x49, 0x54, 0x0a, //
        0x21, 0x21, 0x00, 0x24, // PROXY, AF_INET6 STREAM, 36 bytes
        0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x05, // source
        0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x01, // destination
        0x01, 0xbb, 0x00, 0x50, // ports 443, 80
    ];

    /// A health check: LOCAL, AF_UNSPEC, no address.
    const V2_LOCAL: &[u8] = &[
        0x0d, 0x0a, 0x0d, 0x0a, 0x00, 0x0d, 0x0a, 0x51, 0x55, 0x49, 0x54, 0x0a, //
        0x20, 0x00, 0x00, 0x00,
    ];

    /// LOCAL with a block to skip anyway (the spec: never assume zero for LOCAL).
    const V2_LOCAL_TLV: &[u8] = &[
        0x0d, 0x0a, 0x0d, 0x0a, 0x00, 0x0d, 0x0a, 0x51, 0x55, 0x49, 0x54, 0x0a, //
        0x20, 0x00, 0x00, 0x07, //
        0x04, 0x00, 0x04, 0, 0, 0, 0, // NOOP
    ];

    fn tcp(source: &str, destination: &str) -> ProxiedAddresses {
        ProxiedAddresses::Tcp {
            source: source.parse().unwrap(),
            destination: destination.parse().unwrap(),
        }
    }

    fn complete(version: u8, addresses: ProxiedAddresses, consumed: usize) -> ProxyParsed {
        ProxyParsed::Complete(ProxyHeader {
            version,
            addresses,
            consumed,
        })
    }

    /// Every strict prefix of a header asks for more, the whole header is complete,
    /// and with a request behind it the header's length is still what is consumed.
    fn check_header(header: &[u8], version: u8, addresses: ProxiedAddresses) {
        for end in 0..header.len() {
            assert_eq!(
                parse_proxy_header(&header[..end]),
                ProxyParsed::NeedMore,
                "prefix of {end} bytes"
            );
        }
        let expected = complete(version, addresses, header.len());
        assert_eq!(parse_proxy_header(header), expected);
        let with_request = [header, b"GET /live HTTP/1.1\r\n\r\n"].concat();
        assert_eq!(parse_proxy_header(&with_request), expected);
        // Even a request that looks like another header is left alone.
        assert_eq!(parse_proxy_header(&[header, header].concat()), expected);
    }

    #[test]
    fn reads_v1_lines() {
        check_header(V1_TCP4, 1, tcp("192.168.0.1:56324", "192.168.0.11:443"));
        check_header(
            V1_TCP6,
            1,
            tcp("[2001:db8::1]:65535", "[::ffff:10.0.0.2]:8080"),
        );
        check_header(V1_UNKNOWN, 1, ProxiedAddresses::Unknown);
        assert_eq!(V1_UNKNOWN_LONGEST.len(), V1_MAX_LEN);
        check_header(V1_UNKNOWN_LONGEST, 1, ProxiedAddresses::Unknown);
        check_header(
            b"PROXY TCP4 0.0.0.0 255.255.255.255 0 65535\r\n",
            1,
            tcp("0.0.0.0:0", "255.255.255.255:65535"),
        );
    }

    #[test]
    fn reads_v2_headers() {
        let v4 = tcp("192.0.2.10:51000", "198.51.100.1:8080");
        check_header(V2_TCP4, 2, v4);
        check_header(V2_TCP4_TLVS, 2, v4);
        check_header(V2_TCP6, 2, tcp("[2001:db8::5]:443", "[2001:db8::1]:80"));
        check_header(V2_LOCAL, 2, ProxiedAddresses::Local);
        check_header(V2_LOCAL_TLV, 2, ProxiedAddresses::Local);
    }

    #[test]
    fn v2_families_without_tcp_addresses_keep_the_socket_addresses() {
        // PROXY over AF_UNSPEC or IPv4 with UNSPEC transport with nothing, UDP over IPv4 (12 bytes), UNIX stream
        // (216 bytes): valid, but no TCP address to take.
        for (family_transport, len) in [(0x00u8, 0usize), (0x10, 0), (0x12, 12), (0x31, 216)] {
            let mut header = V2_SIGNATURE.to_vec();
            header.extend([0x21, family_transport]);
            header.extend((len as u16).to_be_bytes());
            header.resize(16 + len, 0);
            check_header(&header, 2, ProxiedAddresses::Unknown);
        }
    }

    #[test]
    fn refuses_malformed_v1_lines() {
        let malformed = ProxyParsed::Invalid(Invalid::V1Malformed);
        for line in [
            &b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\n"[..], // LF alone
            b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\rX",     // CR alone
            b"PROXY TCP4  192.168.0.1 192.168.0.11 56324 443\r\n",   // two spaces
            b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443 \r\n",   // trailing space
            b"PROXY TCP4 192.168.0.1 192.168.0.11 56324\r\n",        // no port
            b"PROXY TCP4 192.168.0.01 192.168.0.11 56324 443\r\n",   // leading zero
            b"PROXY TCP4 192.168.0.1 192.168.0.11 056324 443\r\n",   // leading zero port
            b"PROXY TCP4 192.168.0.1 192.168.0.11 65536 443\r\n",    // port too big
            b"PROXY TCP4 192.168.0.1 192.168.0.11 -1 443\r\n",
            b"PROXY TCP4 2001:db8::1 192.168.0.11 1 443\r\n", // family mismatch
            b"PROXY TCP6 192.168.0.1 2001:db8::1 1 443\r\n",
            b"PROXY TCP5 192.168.0.1 192.168.0.11 1 443\r\n",
            b"PROXY tcp4 192.168.0.1 192.168.0.11 1 443\r\n",
            b"PROXY UNKNOWNX\r\n",
            b"PROXY \r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\x00\r\n",
            b"PROXY TCP4 1.2.3.\xff",
        ] {
            assert_eq!(
                parse_proxy_header(line),
                malformed,
                "{}",
                String::from_utf8_lossy(line)
            );
        }
        // No CRLF within 107 bytes: refused at 107, not before.
        let long = [b"PROXY UNKNOWN ".as_slice(), &[b'f'; 200]].concat();
        assert_eq!(parse_proxy_header(&long[..106]), ProxyParsed::NeedMore);
        assert_eq!(
            parse_proxy_header(&long[..107]),
            ProxyParsed::Invalid(Invalid::V1TooLong)
        );
        // A CR as the 107th byte leaves no room for the LF.
        let cr_at_end = [&long[..106], b"\r\n"].concat();
        assert_eq!(parse_proxy_header(&cr_at_end), malformed);
    }

    #[test]
    fn refuses_malformed_v2_headers() {
        let with = |i: usize, byte: u8| {
            let mut h = V2_TCP4_TLVS.to_vec();
            h[i] = byte;
            parse_proxy_header(&h)
        };
        assert_eq!(with(12, 0x11), ProxyParsed::Invalid(Invalid::V2Version));
        assert_eq!(with(12, 0x22), ProxyParsed::Invalid(Invalid::V2Command));
        assert_eq!(
            with(13, 0x41),
            ProxyParsed::Invalid(Invalid::V2FamilyOrTransport)
        );
        assert_eq!(
            with(13, 0x13),
            ProxyParsed::Invalid(Invalid::V2FamilyOrTransport)
        );
        // Length 11 for IPv4's 12 address bytes.
        assert_eq!(
            parse_proxy_header(&[&V2_TCP4[..14], &[0, 11], &V2_TCP4[16..27]].concat()),
            ProxyParsed::Invalid(Invalid::V2AddressesTruncated)
        );
        // The declared length ends inside the last TLV.
        let mut short = V2_TCP4_TLVS[..V2_TCP4_TLVS.len() - 1].to_vec();
        short[15] -= 1;
        assert_eq!(
            parse_proxy_header(&short),
            ProxyParsed::Invalid(Invalid::V2TlvTruncated)
        );
        // Two stray bytes after the addresses cannot be a TLV.
        let stray = [&V2_TCP4[..14], &[0, 14], &V2_TCP4[16..], &[1, 0]].concat();
        assert_eq!(
            parse_proxy_header(&stray),
            ProxyParsed::Invalid(Invalid::V2TlvTruncated)
        );
        // Over the cap: refused from the fixed part alone, without waiting.
        let huge = [
            &V2_TCP4[..14],
            &((V2_MAX_PAYLOAD + 1) as u16).to_be_bytes()[..],
        ]
        .concat();
        assert_eq!(
            parse_proxy_header(&huge),
            ProxyParsed::Invalid(Invalid::V2TooLong)
        );
        let at_cap = [&V2_LOCAL[..14], &(V2_MAX_PAYLOAD as u16).to_be_bytes()[..]].concat();
        assert_eq!(parse_proxy_header(&at_cap), ProxyParsed::NeedMore);
    }

    #[test]
    fn refuses_other_protocols_at_once() {
        let not = ProxyParsed::Invalid(Invalid::NotProxyProtocol);
        assert_eq!(parse_proxy_header(b"G"), not);
        assert_eq!(parse_proxy_header(b"GET / HTTP/1.1\r\n\r\n"), not);
        assert_eq!(parse_proxy_header(b"PROXX"), not);
        assert_eq!(parse_proxy_header(b"PROXY\t"), not);
        assert_eq!(parse_proxy_header(b"\x16\x03\x01"), not); // a TLS ClientHello
        assert_eq!(parse_proxy_header(b"\r\n\r\n\0\r\nQUIX"), not);
        assert_eq!(parse_proxy_header(b"\r\n\r\nGET"), not);
    }

    #[test]
    fn never_panics_on_garbage() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let starts: [&[u8]; 3] = [b"", V1_PREFIX, V2_SIGNATURE];
        for i in 0..5000 {
            let mut bytes = starts[i % 3].to_vec();
            let len = (next() % 80) as usize;
            bytes.extend((0..len).map(|_| next() as u8));
            if let ProxyParsed::Complete(h) = parse_proxy_header(&bytes) {
                assert!(h.consumed <= bytes.len());
            }
        }
    }
}
