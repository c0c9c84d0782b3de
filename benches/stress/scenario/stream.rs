// SPDX-License-Identifier: MPL-2.0

//! The stream: buffers whose every byte is known from their sequence number, and the
//! verifier that checks what a reader got.

use std::os::fd::BorrowedFd;
use std::sync::OnceLock;
use std::time::Duration;

use nix::errno::Errno;

use super::rng::mix;

/// Every buffer starts with: magic (4), total length (u32 LE), sequence number (u64
/// LE, bit 63 = keyframe). The streamheader has its own magic and sequence u64::MAX.
const HDR: usize = 16;
const MAGIC_DATA: &[u8; 4] = b"STRB";
const MAGIC_SH: &[u8; 4] = b"STRH";
const SH_LEN: usize = 64;
const SH_SEQ: u64 = u64::MAX;
const KF_BIT: u64 = 1 << 63;
pub const MAX_LEN: usize = 64 * 1024;
/// Every KF_INTERVAL-th buffer is a keyframe (the others DELTA_UNIT).
pub const KF_INTERVAL: u64 = 10;
const TABLE_SPAN: usize = 4096;

/// Pseudo-random bytes; a buffer's payload is a slice of it chosen by its sequence
/// number, so readers compare with one memcmp.
fn table() -> &'static [u8] {
    static TABLE: OnceLock<Vec<u8>> = OnceLock::new();
    TABLE.get_or_init(|| {
        (0..TABLE_SPAN + MAX_LEN)
            .map(|i| mix(i as u64 ^ 0xA5A5) as u8)
            .collect()
    })
}

/// How long a stream's buffers are; a reader knows each length from the sequence
/// number.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Sizes {
    /// Mostly under 1 KiB, some up to 8 KiB, a few up to MAX_LEN (the churn phase).
    #[default]
    Mixed,
    /// Every buffer this long, header included (the overload phase).
    Fixed(usize),
}

fn buffer_len(seq: u64, sizes: Sizes) -> usize {
    if let Sizes::Fixed(len) = sizes {
        return len;
    }
    let h = mix(seq);
    let r = (h >> 8) as usize;
    match h % 100 {
        0..=79 => HDR + r % 1008,
        80..=97 => 1024 + r % 7168,
        _ => 8192 + r % (MAX_LEN - 8192 + 1),
    }
}

fn payload_offset(seq: u64) -> usize {
    if seq == SH_SEQ {
        7
    } else {
        (mix(seq ^ 0x5555) % TABLE_SPAN as u64) as usize
    }
}

fn header(magic: &[u8; 4], len: usize, seq_field: u64) -> [u8; HDR] {
    let mut h = [0u8; HDR];
    h[..4].copy_from_slice(magic);
    h[4..8].copy_from_slice(&(len as u32).to_le_bytes());
    h[8..].copy_from_slice(&seq_field.to_le_bytes());
    h
}

pub fn streamheader_bytes() -> Vec<u8> {
    let mut v = header(MAGIC_SH, SH_LEN, SH_SEQ).to_vec();
    let off = payload_offset(SH_SEQ);
    v.extend_from_slice(&table()[off..off + SH_LEN - HDR]);
    v
}

pub fn make_buffer(seq: u64, period: Duration, sizes: Sizes) -> gst::Buffer {
    let len = buffer_len(seq, sizes);
    let kf = seq.is_multiple_of(KF_INTERVAL);
    let mut buffer = gst::Buffer::with_size(len).expect("buffer");
    {
        let b = buffer.get_mut().unwrap();
        {
            let mut map = b.map_writable().unwrap();
            let data = map.as_mut_slice();
            data[..HDR].copy_from_slice(&header(
                MAGIC_DATA,
                len,
                seq | if kf { KF_BIT } else { 0 },
            ));
            let off = payload_offset(seq);
            data[HDR..].copy_from_slice(&table()[off..off + len - HDR]);
        }
        b.set_pts(gst::ClockTime::from_nseconds(
            seq * period.as_nanos() as u64,
        ));
        if !kf {
            b.set_flags(gst::BufferFlags::DELTA_UNIT);
        }
    }
    buffer
}

/// Checks a byte stream as it arrives: starts at a buffer boundary, the streamheader
/// first (once), then whole buffers in increasing sequence order with exact bytes.
#[derive(Default)]
pub struct Verifier {
    pub sizes: Sizes,
    pub hdr: [u8; HDR],
    pub hdr_got: usize,
    /// The buffer being read: (sequence, payload length, payload bytes seen).
    pub cur: Option<(u64, usize, usize)>,
    pub bytes: u64,
    pub buffers: u64,
    pub gaps: u64,
    pub last_seq: Option<u64>,
    /// The first buffer read: where the client started, or where it was skipped to
    /// before its first byte (a skip that no gap shows).
    pub first_seq: Option<u64>,
    /// The newest buffer read to its last byte.
    pub last_whole: Option<u64>,
    pub streamheaders: u32,
    pub first_kf: Option<bool>,
    pub error: Option<String>,
}

/// Whether a read pass left the stream open.
pub enum Pumped {
    More,
    Eof,
}

impl Verifier {
    pub fn new(sizes: Sizes) -> Verifier {
        Verifier {
            sizes,
            ..Verifier::default()
        }
    }

    /// Reads up to `max` bytes from a reader's (non-blocking) `fd`, until EAGAIN,
    /// and checks them. End of file, or a read error (kept as the verifier's error
    /// unless it has one), ends the stream.
    pub fn pump(&mut self, fd: BorrowedFd<'_>, buf: &mut [u8], max: usize) -> Pumped {
        let mut left = max;
        while left > 0 {
            let want = left.min(buf.len());
            match nix::unistd::read(fd, &mut buf[..want]) {
                Ok(0) => return Pumped::Eof,
                Ok(n) => {
                    self.feed(&buf[..n]);
                    left -= n;
                }
                Err(Errno::EINTR) => {}
                Err(Errno::EAGAIN) => break,
                Err(e) => {
                    if self.error.is_none() {
                        self.error = Some(format!("read failed: {e}"));
                    }
                    return Pumped::Eof;
                }
            }
        }
        Pumped::More
    }

    pub fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() && self.error.is_none() {
            if let Some((seq, len, done)) = self.cur {
                let n = (len - done).min(data.len());
                let off = payload_offset(seq) + done;
                if data[..n] != table()[off..off + n] {
                    let at = data[..n]
                        .iter()
                        .zip(&table()[off..off + n])
                        .position(|(a, b)| a != b)
                        .unwrap_or(0);
                    self.error = Some(format!(
                        "byte {} of buffer {} (stream offset {}) differs",
                        HDR + done + at,
                        seq_name(seq),
                        self.bytes + at as u64
                    ));
                    break;
                }
                self.bytes += n as u64;
                data = &data[n..];
                self.cur = (done + n < len).then_some((seq, len, done + n));
                if self.cur.is_none() && seq != SH_SEQ {
                    self.last_whole = Some(seq);
                }
            } else {
                let n = (HDR - self.hdr_got).min(data.len());
                self.hdr[self.hdr_got..self.hdr_got + n].copy_from_slice(&data[..n]);
                self.hdr_got += n;
                self.bytes += n as u64;
                data = &data[n..];
                if self.hdr_got == HDR {
                    self.hdr_got = 0;
                    self.parse_header();
                }
            }
        }
        // After an error, only count.
        self.bytes += data.len() as u64;
    }

    fn parse_header(&mut self) {
        let h = self.hdr;
        let len = u32::from_le_bytes(h[4..8].try_into().unwrap()) as usize;
        let field = u64::from_le_bytes(h[8..16].try_into().unwrap());
        let at = self.bytes - HDR as u64;
        if &h[..4] == MAGIC_SH {
            if len != SH_LEN || field != SH_SEQ {
                self.error = Some(format!("bad streamheader header at stream offset {at}"));
            } else if self.streamheaders > 0 || self.buffers > 0 {
                self.error = Some(format!(
                    "streamheader again at stream offset {at} after {} buffers",
                    self.buffers
                ));
            } else {
                self.streamheaders += 1;
                self.cur = Some((SH_SEQ, SH_LEN - HDR, 0));
            }
            return;
        }
        if &h[..4] != MAGIC_DATA {
            self.error = Some(format!(
                "no buffer header at stream offset {at} (not on a buffer boundary): {h:02x?}"
            ));
            return;
        }
        let seq = field & !KF_BIT;
        let kf = field & KF_BIT != 0;
        if len != buffer_len(seq, self.sizes) || kf != seq.is_multiple_of(KF_INTERVAL) {
            self.error = Some(format!(
                "corrupt header of buffer {seq} at stream offset {at} (length {len})"
            ));
            return;
        }
        if self.streamheaders == 0 {
            self.error = Some(format!("buffer {seq} before the streamheader"));
            return;
        }
        match self.last_seq {
            Some(last) if seq <= last => {
                self.error = Some(format!(
                    "buffer {seq} after buffer {last} (out of order or repeated) at stream offset {at}"
                ));
                return;
            }
            Some(last) => self.gaps += seq - last - 1,
            None => {
                self.first_kf = Some(kf);
                self.first_seq = Some(seq);
            }
        }
        self.last_seq = Some(seq);
        self.buffers += 1;
        if len > HDR {
            self.cur = Some((seq, len - HDR, 0));
        } else {
            self.last_whole = Some(seq);
        }
    }

    pub fn at_boundary(&self) -> bool {
        self.hdr_got == 0 && self.cur.is_none()
    }
}

fn seq_name(seq: u64) -> String {
    if seq == SH_SEQ {
        "streamheader".into()
    } else {
        seq.to_string()
    }
}
