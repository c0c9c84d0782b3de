// SPDX-License-Identifier: MPL-2.0

//! The packet header of the GStreamer Data Protocol (GDP 1.0), as `gdppay` writes
//! it: plain Rust, no GStreamer.
//!
//! Why the sinks read it: `gdppay` (GStreamer 1.22) sets `HEADER` on the buffers it
//! pushes but never `DELTA_UNIT`, so to a keyframe `sync-method` every GDP packet
//! of an `application/x-gdp` stream looks like a keyframe and a client of an
//! origin's feed port would start mid-GOP. The payload buffer's own flags, with
//! `DELTA_UNIT`, are in the packet header; the sinks take the keyframe flag from
//! there (see `RsMultiHandleSink::render`).
//!
//! Layout (62 bytes, integers big-endian):
//!
//! | bytes | field |
//! |---|---|
//! | 0, 1 | major, minor version: 1, 0 |
//! | 2 | header flags: 1 = header CRC, 2 = payload CRC |
//! | 3 | padding |
//! | 4..6 | payload type: 1 buffer, 2 caps, 64 + event type for events |
//! | 6..10 | payload length |
//! | 10..18 | PTS (buffers; `u64::MAX` = none) |
//! | 18..26 | duration |
//! | 26..34, 34..42 | offset, offset end |
//! | 42..44 | the buffer's flags (live, discont, header, gap, delta unit) |
//! | 44..52 | DTS |
//! | 52..58 | zero |
//! | 58..60 | CRC of bytes 0..58 (0 unless header CRC) |
//! | 60..62 | CRC of the payload (0 unless payload CRC) |

use std::fmt;

/// Bytes of a packet header.
pub const HEADER_LEN: usize = 62;

/// `GstBufferFlags` bits as GDP carries them (bits 4 and up of the mini object
/// flags: `GST_MINI_OBJECT_FLAG_LAST << n`).
pub mod buffer_flags {
    pub const LIVE: u16 = 1 << 4;
    pub const DISCONT: u16 = 1 << 6;
    pub const HEADER: u16 = 1 << 10;
    pub const GAP: u16 = 1 << 11;
    pub const DELTA_UNIT: u16 = 1 << 13;
}

const FLAG_CRC_HEADER: u8 = 1;
/// Payload types below this are not events.
const PAYLOAD_EVENT_NONE: u16 = 64;

/// What a packet carries. Events carry `64 + GstEventType` cut to 16 bits (as
/// `gdppay` writes it), so the value is that sum minus 64.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PayloadType {
    /// A buffer's bytes.
    Buffer,
    /// Caps as a string (NUL-terminated).
    Caps,
    /// An event (its structure as a string); the value is the `GstEventType`.
    Event(u16),
}

/// A parsed packet header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PacketHeader {
    pub payload_type: PayloadType,
    pub payload_len: u32,
    /// PTS in nanoseconds (buffers only).
    pub pts: Option<u64>,
    /// The payload buffer's flags (`buffer_flags`); 0 for caps and events.
    pub buffer_flags: u16,
}

/// Why bytes are not a GDP 1.0 packet header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Error {
    /// Fewer than [`HEADER_LEN`] bytes.
    Short(usize),
    /// Not version 1.0 (GDP 0.2 is from GStreamer 0.10).
    Version(u8, u8),
    /// The header CRC does not match.
    HeaderCrc { stored: u16, computed: u16 },
    /// A payload type GDP does not define.
    PayloadType(u16),
    /// The buffer is not exactly one packet: `payload_len` + header ≠ its size.
    Length { payload_len: u32, available: usize },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Short(n) => write!(f, "{n} bytes, a GDP header has {HEADER_LEN}"),
            Error::Version(major, minor) => write!(f, "GDP version {major}.{minor}, not 1.0"),
            Error::HeaderCrc { stored, computed } => {
                write!(f, "header CRC {stored:#06x}, computed {computed:#06x}")
            }
            Error::PayloadType(t) => write!(f, "unknown payload type {t}"),
            Error::Length {
                payload_len,
                available,
            } => write!(
                f,
                "payload of {payload_len} bytes announced, {available} present"
            ),
        }
    }
}

impl std::error::Error for Error {}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().unwrap())
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}

/// GDP's CRC: CCITT polynomial 0x1021, initial 0xffff, result inverted (0 for no
/// bytes), as `gst_dp_crc` computes it.
pub fn crc(bytes: &[u8]) -> u16 {
    if bytes.is_empty() {
        return 0;
    }
    let mut crc: u16 = 0xffff;
    for &byte in bytes {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    !crc
}

impl PacketHeader {
    /// Parses the header at the start of `bytes` (which may hold more), checking
    /// the version and, when the packet says it has one, the header CRC.
    pub fn parse(bytes: &[u8]) -> Result<PacketHeader, Error> {
        if bytes.len() < HEADER_LEN {
            return Err(Error::Short(bytes.len()));
        }
        let h = &bytes[..HEADER_LEN];
        if (h[0], h[1]) != (1, 0) {
            return Err(Error::Version(h[0], h[1]));
        }
        if h[2] & FLAG_CRC_HEADER != 0 {
            let stored = be16(h, 58);
            let computed = crc(&h[..58]);
            if stored != computed {
                return Err(Error::HeaderCrc { stored, computed });
            }
        }
        let payload_type = match be16(h, 4) {
            1 => PayloadType::Buffer,
            2 => PayloadType::Caps,
            t if t >= PAYLOAD_EVENT_NONE => PayloadType::Event(t - PAYLOAD_EVENT_NONE),
            t => return Err(Error::PayloadType(t)),
        };
        let is_buffer = payload_type == PayloadType::Buffer;
        let pts = be64(h, 10);
        Ok(PacketHeader {
            payload_type,
            payload_len: be32(h, 6),
            pts: (is_buffer && pts != u64::MAX).then_some(pts),
            buffer_flags: if is_buffer { be16(h, 42) } else { 0 },
        })
    }

    /// The header of `packet`, which must be exactly one whole packet (as each
    /// buffer `gdppay` pushes is).
    pub fn of_packet(packet: &[u8]) -> Result<PacketHeader, Error> {
        let header = PacketHeader::parse(packet)?;
        let available = packet.len() - HEADER_LEN;
        if header.payload_len as usize != available {
            return Err(Error::Length {
                payload_len: header.payload_len,
                available,
            });
        }
        Ok(header)
    }

    /// A place where a client may start: a buffer that is neither a delta unit
    /// nor a header (headers reach clients through the caps' streamheader). Caps
    /// and events are not: the sticky ones are in the streamheader too.
    pub fn is_sync_point(&self) -> bool {
        self.payload_type == PayloadType::Buffer
            && self.buffer_flags & (buffer_flags::DELTA_UNIT | buffer_flags::HEADER) == 0
    }

    pub fn has_flag(&self, flag: u16) -> bool {
        self.buffer_flags & flag != 0
    }
}

/// Writes a GDP 1.0 packet (header CRC on, no payload CRC, as `gdppay` by default):
/// for tests and tools that need packets without GStreamer.
pub fn packet(
    payload_type: PayloadType,
    buffer_flags: u16,
    pts: Option<u64>,
    payload: &[u8],
) -> Vec<u8> {
    let mut h = vec![0u8; HEADER_LEN];
    h[0] = 1;
    h[2] = FLAG_CRC_HEADER;
    let type_code = match payload_type {
        PayloadType::Buffer => 1,
        PayloadType::Caps => 2,
        // As gst_dp_payload_event: the sum cut to 16 bits.
        PayloadType::Event(t) => PAYLOAD_EVENT_NONE.wrapping_add(t),
    };
    h[4..6].copy_from_slice(&type_code.to_be_bytes());
    h[6..10].copy_from_slice(&(payload.len() as u32).to_be_bytes());
    h[10..18].copy_from_slice(&pts.unwrap_or(u64::MAX).to_be_bytes());
    if payload_type == PayloadType::Buffer {
        h[26..34].copy_from_slice(&u64::MAX.to_be_bytes());
        h[34..42].copy_from_slice(&u64::MAX.to_be_bytes());
        h[42..44].copy_from_slice(&buffer_flags.to_be_bytes());
        h[44..52].copy_from_slice(&u64::MAX.to_be_bytes());
    }
    let header_crc = crc(&h[..58]);
    h[58..60].copy_from_slice(&header_crc.to_be_bytes());
    h.extend_from_slice(payload);
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc_matches_the_ccitt_check_value() {
        // CRC-16 with polynomial 0x1021, init 0xffff, inverted: "123456789" gives
        // 0xd64e (the catalogue's CRC-16/GENIBUS check value).
        assert_eq!(crc(b"123456789"), 0xd64e);
        assert_eq!(crc(b""), 0);
    }

    #[test]
    fn buffer_packets_round_trip() {
        let p = packet(
            PayloadType::Buffer,
            buffer_flags::DELTA_UNIT,
            Some(40_000_000),
            b"frame",
        );
        assert_eq!(p.len(), HEADER_LEN + 5);
        let h = PacketHeader::of_packet(&p).unwrap();
        assert_eq!(h.payload_type, PayloadType::Buffer);
        assert_eq!(h.payload_len, 5);
        assert_eq!(h.pts, Some(40_000_000));
        assert!(h.has_flag(buffer_flags::DELTA_UNIT));
        assert!(!h.is_sync_point());

        let key = packet(PayloadType::Buffer, 0, None, b"key");
        let h = PacketHeader::of_packet(&key).unwrap();
        assert_eq!(h.pts, None);
        assert!(h.is_sync_point());

        let header = packet(PayloadType::Buffer, buffer_flags::HEADER, None, b"hdr");
        assert!(!PacketHeader::of_packet(&header).unwrap().is_sync_point());
    }

    #[test]
    fn caps_and_events_are_not_sync_points() {
        let caps = packet(PayloadType::Caps, 0, None, b"video/x-raw\0");
        let h = PacketHeader::of_packet(&caps).unwrap();
        assert_eq!(h.payload_type, PayloadType::Caps);
        assert!(!h.is_sync_point());
        // GST_EVENT_SEGMENT: 70 << 8 with the serialized and sticky flags.
        let event = packet(PayloadType::Event(0x4606), 0, None, b"segment\0");
        let h = PacketHeader::of_packet(&event).unwrap();
        assert_eq!(h.payload_type, PayloadType::Event(0x4606));
        assert!(!h.is_sync_point());
    }

    #[test]
    fn bad_headers_are_refused() {
        let p = packet(PayloadType::Buffer, 0, None, b"abc");
        assert_eq!(PacketHeader::parse(&p[..10]), Err(Error::Short(10)));
        let mut v = p.clone();
        v[0] = 0;
        v[1] = 2;
        assert_eq!(PacketHeader::parse(&v), Err(Error::Version(0, 2)));
        let mut c = p.clone();
        c[42] ^= 0x20;
        assert!(matches!(
            PacketHeader::parse(&c),
            Err(Error::HeaderCrc { .. })
        ));
        // Without the header CRC flag, no CRC is checked.
        c[2] = 0;
        assert!(PacketHeader::parse(&c).is_ok());
        // Parsed, but not exactly one packet.
        assert_eq!(
            PacketHeader::of_packet(&p[..p.len() - 1]),
            Err(Error::Length {
                payload_len: 3,
                available: 2
            })
        );
        let mut longer = p.clone();
        longer.push(0);
        assert!(PacketHeader::of_packet(&longer).is_err());
        let mut t = packet(PayloadType::Buffer, 0, None, b"");
        t[2] = 0;
        t[5] = 7;
        assert_eq!(PacketHeader::parse(&t), Err(Error::PayloadType(7)));
    }

    #[test]
    fn random_bytes_never_panic() {
        // A small xorshift: any bytes, any length, only Ok or Err.
        let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..20_000 {
            let len = (next() % 100) as usize;
            let mut bytes: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            if len >= 2 && next() % 2 == 0 {
                bytes[0] = 1;
                bytes[1] = 0;
            }
            let _ = PacketHeader::of_packet(&bytes);
        }
    }
}
