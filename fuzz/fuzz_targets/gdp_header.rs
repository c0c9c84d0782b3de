//! Fuzzes the GDP packet header reader (`src/gdp.rs`) that the sinks run on every
//! buffer of an `application/x-gdp` stream (an origin's feed, whose bytes an edge
//! takes from the network): any bytes must give a header or an error, never a
//! panic; what is accepted must agree with the bytes, and must round-trip: the
//! packet `gdp::packet` writes from the header and the payload reads back as the
//! same header.
//!
//! The first input byte chooses whether the header CRC is made right (so that the
//! fuzzer gets past the CRC check with it on as well as off); the rest is the packet.
#![no_main]

use gstrsmultifdsink::gdp::{self, Error, HEADER_LEN, PacketHeader, PayloadType, buffer_flags};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, bytes)) = data.split_first() else {
        return;
    };
    let mut bytes = bytes.to_vec();
    if mode & 1 == 1 && bytes.len() >= HEADER_LEN {
        // The header CRC flag on and the CRC right.
        bytes[2] |= 1;
        let crc = gdp::crc(&bytes[..58]);
        bytes[58..60].copy_from_slice(&crc.to_be_bytes());
    }
    check(&bytes);
});

fn check(bytes: &[u8]) {
    let parsed = PacketHeader::parse(bytes);
    // Only the first HEADER_LEN bytes count.
    if bytes.len() >= HEADER_LEN {
        assert_eq!(PacketHeader::parse(&bytes[..HEADER_LEN]), parsed);
    }
    let whole = PacketHeader::of_packet(bytes);
    match parsed {
        Err(error) => {
            // Errors say what they are and agree with the bytes.
            let _ = error.to_string();
            match error {
                Error::Short(n) => assert!(n == bytes.len() && n < HEADER_LEN),
                Error::Version(major, minor) => {
                    assert_eq!((major, minor), (bytes[0], bytes[1]));
                    assert_ne!((major, minor), (1, 0));
                }
                Error::HeaderCrc { stored, computed } => {
                    assert_ne!(stored, computed);
                    assert_eq!(computed, gdp::crc(&bytes[..58]));
                }
                Error::PayloadType(t) => assert!(t == 0 || (3..64).contains(&t)),
                Error::Length { .. } => panic!("parse checks no length"),
            }
            // A header that does not parse is no packet.
            assert_eq!(whole, Err(error));
        }
        Ok(header) => {
            assert_eq!((bytes[0], bytes[1]), (1, 0));
            if header.payload_type != PayloadType::Buffer {
                assert_eq!((header.pts, header.buffer_flags), (None, 0));
            }
            assert_eq!(
                header.is_sync_point(),
                header.payload_type == PayloadType::Buffer
                    && !header.has_flag(buffer_flags::DELTA_UNIT)
                    && !header.has_flag(buffer_flags::HEADER)
            );
            let available = bytes.len() - HEADER_LEN;
            match whole {
                Ok(packet_header) => {
                    assert_eq!(packet_header, header);
                    assert_eq!(header.payload_len as usize, available);
                    // Written again from what was read, the packet reads back
                    // the same.
                    let payload = &bytes[HEADER_LEN..];
                    let written = gdp::packet(
                        header.payload_type,
                        header.buffer_flags,
                        header.pts,
                        payload,
                    );
                    assert_eq!(written.len(), bytes.len());
                    assert_eq!(&written[HEADER_LEN..], payload);
                    assert_eq!(PacketHeader::of_packet(&written), Ok(header));
                }
                Err(error) => {
                    assert_eq!(
                        error,
                        Error::Length {
                            payload_len: header.payload_len,
                            available
                        }
                    );
                    // Written with a payload of the announced length (where that
                    // is small enough to make), it is a packet with this header.
                    if header.payload_len <= 1 << 16 {
                        let payload = vec![0u8; header.payload_len as usize];
                        let written = gdp::packet(
                            header.payload_type,
                            header.buffer_flags,
                            header.pts,
                            &payload,
                        );
                        assert_eq!(PacketHeader::of_packet(&written), Ok(header));
                    }
                }
            }
        }
    }
}
