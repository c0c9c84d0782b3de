//! The scenarios of GStreamer's multifdsink and multisocketsink check suites that
//! `rsmultifdsink` (fds: tests/element.rs) and `rsmultisocketsink` (`GSocket`s:
//! tests/multisocketsink.rs) run alike, written once for any kind of client.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;

use gst::prelude::*;

use super::{
    CHECK_CAPS, Harness, SinkHarness, assert_nothing_readable, b16, buffer, harness, read_exact,
    streamheader_caps,
};

/// A client as the shared scenarios see it: the handle the element's `add` and
/// `remove` signals take, and the end its bytes are read from.
pub trait CheckClient {
    /// The value the element's signals take for this client.
    fn handle(&self) -> gst::glib::Value;
    /// Where the test reads what the element sent to this client.
    fn reader(&self) -> BorrowedFd<'_>;
}

/// A pipe from `common::pipe()`: (read end, write end); the element gets the write
/// end's number.
impl CheckClient for (OwnedFd, OwnedFd) {
    fn handle(&self) -> gst::glib::Value {
        self.1.as_raw_fd().to_value()
    }
    fn reader(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

/// A `GSocket` handed to the element and the peer that reads.
impl CheckClient for (gio::Socket, UnixStream) {
    fn handle(&self) -> gst::glib::Value {
        self.0.to_value()
    }
    fn reader(&self) -> BorrowedFd<'_> {
        self.1.as_fd()
    }
}

/// Emits `add` for `client`.
pub fn add(h: &Harness, client: &impl CheckClient) {
    h.sink().emit_by_name_with_values("add", &[client.handle()]);
}

/// Emits `remove` for `client`.
pub fn remove(h: &Harness, client: &impl CheckClient) {
    h.sink()
        .emit_by_name_with_values("remove", &[client.handle()]);
}

/// `test_no_clients`: a buffer with nobody to send it to is counted to serve and
/// served to nobody.
pub fn no_clients(factory: &str) {
    let mut h = harness(factory, &[]);
    h.set_src_caps_str(CHECK_CAPS);
    h.push_bytes(b"dead", false);
    assert_eq!(h.u64("bytes-to-serve"), 4);
    assert_eq!(h.u64("bytes-served"), 0);
    h.stop();
}

/// `test_streamheader`: the caps' streamheader goes once to each client before its
/// first data, and HEADER buffers that repeat it are not sent as data; the clients
/// are removed again and the element stopped.
pub fn streamheader_sent_once_then_data<C: CheckClient>(factory: &str, new_client: fn() -> C) {
    let mut h = harness(factory, &[]);
    let c1 = new_client();
    let c2 = new_client();
    assert_eq!(h.u32("num-handles"), 0);
    add(&h, &c1);
    assert_eq!(h.u32("num-handles"), 1);
    h.set_src_caps(streamheader_caps(&[b"babe", b"deadbeef"]));
    // The HEADER buffers repeat the caps' streamheader: not sent as data.
    h.push_ok(buffer(b"babe", false, true));
    h.push_ok(buffer(b"deadbeef", false, true));
    h.push_bytes(b"f00d", false);
    assert_eq!(read_exact(c1.reader(), 16), b"babedeadbeeff00d");
    h.wait_u64("bytes-served", 16);

    add(&h, &c2);
    assert_eq!(h.u32("num-handles"), 2);
    h.push_bytes(b"deaf", false);
    assert_eq!(read_exact(c1.reader(), 4), b"deaf");
    // The second client missed f00d.
    assert_eq!(read_exact(c2.reader(), 16), b"babedeadbeefdeaf");
    h.wait_u64("bytes-served", 36);
    assert_nothing_readable(c1.reader());
    assert_nothing_readable(c2.reader());
    remove(&h, &c1);
    assert_eq!(h.u32("num-handles"), 1);
    remove(&h, &c2);
    assert_eq!(h.u32("num-handles"), 0);
    h.stop();
}

/// `test_change_streamheader`: a changed streamheader goes to every client, also
/// the one that already had the first. Returns the running harness and the two
/// clients, still added, for the caller to finish with.
pub fn changed_streamheader_is_resent<C: CheckClient>(
    factory: &str,
    new_client: fn() -> C,
) -> (Harness, [C; 2]) {
    let mut h = harness(factory, &[]);
    let c1 = new_client();
    let c2 = new_client();
    h.set_src_caps(streamheader_caps(&[b"first", b"header"]));
    h.push_ok(buffer(b"first", false, true));
    h.push_ok(buffer(b"header", false, true));
    add(&h, &c1);
    h.push_bytes(b"f00d", false);
    assert_eq!(read_exact(c1.reader(), 15), b"firstheaderf00d");
    add(&h, &c2);
    h.set_src_caps(streamheader_caps(&[b"second", b"header"]));
    h.push_ok(buffer(b"second", false, true));
    h.push_ok(buffer(b"header", false, true));
    h.push_bytes(b"deadbabe", false);
    assert_eq!(read_exact(c1.reader(), 20), b"secondheaderdeadbabe");
    assert_eq!(read_exact(c2.reader(), 20), b"secondheaderdeadbabe");
    h.wait_u64("bytes-served", 55);
    assert_nothing_readable(c1.reader());
    assert_nothing_readable(c2.reader());
    (h, [c1, c2])
}

/// `test_client_next_keyframe`: with `sync-method=next-keyframe` a new client skips
/// delta units and starts at the next keyframe.
pub fn client_next_keyframe<C: CheckClient>(factory: &str, new_client: fn() -> C) {
    let mut h = harness(factory, &[("sync-method", "next-keyframe")]);
    h.set_src_caps_str(CHECK_CAPS);
    let client = new_client();
    add(&h, &client);
    h.push_bytes(&b16(0), true); // a delta unit: skipped while waiting
    h.push_bytes(&b16(1), false);
    h.push_bytes(&b16(2), true);
    let want: Vec<u8> = [b16(1), b16(2)].concat();
    assert_eq!(read_exact(client.reader(), 32), want);
    h.wait_u64("bytes-served", 32);
    assert_nothing_readable(client.reader());
    h.stop();
}

/// The properties under which the comparisons with the C elements run: a burst of
/// 40 bytes and at least 64 bytes kept, so clients joining mid-stream get a burst.
pub const C_COMPARISON_PROPS: [(&str, &str); 4] = [
    ("sync-method", "burst"),
    ("burst-format", "bytes"),
    ("burst-value", "40"),
    ("bytes-min", "64"),
];

/// Asserts that our element and the C one sent each client the same bytes
/// (`b16` buffers shown short in the failure message).
pub fn assert_same_bytes_as_c(ours: &[Vec<u8>], c: &[Vec<u8>], message: &str) {
    let show = |c: &[Vec<u8>]| {
        c.iter()
            .map(|b| {
                String::from_utf8_lossy(b)
                    .replace("deadbee0000", " ")
                    .replace("\0", "")
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(show(ours), show(c), "{message}");
}

/// Case `i` of the check suite's burst scenarios (`BURST_CASES`) with three
/// clients made by `new_client`.
pub fn burst_case<C: CheckClient>(factory: &str, i: usize, new_client: fn() -> C) {
    let clients = [new_client(), new_client(), new_client()];
    super::burst_scenario(
        factory,
        super::BURST_CASES[i].clone(),
        clients.each_ref().map(|c| (c.handle(), c.reader())),
    );
}
