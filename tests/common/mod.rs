//! Helpers shared by the element tests: a sink fed through gstreamer-check's
//! harness, pipes, exact reads with deadlines and a recorder of the element's
//! signals.
#![allow(dead_code)]

pub mod browser;
pub mod check_suite;
pub mod http;
pub mod netns;
pub mod process;
pub mod tls;
pub mod wait;

use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Condvar, LazyLock, Mutex, Once};
use std::time::{Duration, Instant};

use gst::prelude::*;
pub use gst_check::Harness;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

/// The longest a test waits for what should happen (10 s, scaled by
/// `TEST_WAIT_SCALE` under valgrind).
pub static DEADLINE: LazyLock<Duration> = LazyLock::new(|| wait::scaled(Duration::from_secs(10)));

pub fn init() {
    static INIT: Once = Once::new();
    INIT.call_once(|| {
        gst::init().unwrap();
        gstrsmultifdsink::plugin_register_static().unwrap();
    });
}

/// The caps of the check suite's data.
pub const CHECK_CAPS: &str = "application/x-gst-check";

/// `factory` with `props` set, in PLAYING behind gstreamer-check's harness: its src
/// pad feeds the sink pad, stream-start is sent, and (as for every sink it harnesses)
/// `sync` and `async` are off.
pub fn harness(factory: &str, props: &[(&str, &str)]) -> Harness {
    init();
    let sink = gst::ElementFactory::make(factory).build().unwrap();
    // Before PLAYING: some properties (io-threads) only change in NULL.
    for (k, v) in props {
        sink.set_property_from_str(k, v);
    }
    Harness::with_element(&sink, Some("sink"), None)
}

/// What the tests do with a harnessed multi-handle sink besides pushing.
pub trait SinkHarness {
    fn sink(&self) -> gst::Element;
    /// Pushes a buffer that must be accepted.
    fn push_ok(&mut self, buffer: gst::Buffer);
    fn push_bytes(&mut self, data: &[u8], delta: bool) {
        self.push_ok(buffer(data, delta, false));
    }
    fn add_fd(&self, fd: RawFd) {
        self.sink().emit_by_name::<()>("add", &[&fd]);
    }
    fn remove_fd(&self, fd: RawFd) {
        self.sink().emit_by_name::<()>("remove", &[&fd]);
    }
    fn u64(&self, name: &str) -> u64 {
        self.sink().property::<u64>(name)
    }
    fn u32(&self, name: &str) -> u32 {
        self.sink().property::<u32>(name)
    }
    /// Waits until the u64 property reaches `value`.
    fn wait_u64(&self, name: &str, value: u64) {
        let start = Instant::now();
        while self.u64(name) != value {
            assert!(
                start.elapsed() < *DEADLINE,
                "{name} stayed {} (want {value})",
                self.u64(name)
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    /// Sets the sink to NULL now: dropping the harness would too, but the tests
    /// check what NULL did while they still hold it and their fds.
    fn stop(self)
    where
        Self: Sized,
    {
        self.sink().set_state(gst::State::Null).unwrap();
    }
}

impl SinkHarness for Harness {
    fn sink(&self) -> gst::Element {
        self.element().unwrap()
    }

    fn push_ok(&mut self, buffer: gst::Buffer) {
        assert_eq!(self.push(buffer), Ok(gst::FlowSuccess::Ok));
    }
}

pub fn buffer(data: &[u8], delta: bool, header: bool) -> gst::Buffer {
    let mut b = gst::Buffer::from_slice(data.to_vec());
    {
        let b = b.get_mut().unwrap();
        if delta {
            b.set_flags(gst::BufferFlags::DELTA_UNIT);
        }
        if header {
            b.set_flags(gst::BufferFlags::HEADER);
        }
    }
    b
}

/// Caps of the check suite's type with a streamheader of the given buffers.
pub fn streamheader_caps(headers: &[&[u8]]) -> gst::Caps {
    streamheader_caps_of(CHECK_CAPS, headers)
}

/// Caps of `media_type` with a streamheader of the given buffers (flagged HEADER),
/// as a muxer or `gdppay` sets them.
pub fn streamheader_caps_of(media_type: &str, headers: &[&[u8]]) -> gst::Caps {
    let array = gst::Array::new(
        headers
            .iter()
            .map(|h| buffer(h, false, true).to_send_value()),
    );
    gst::Caps::builder(media_type)
        .field("streamheader", array)
        .build()
}

/// `B(i)` of the check suite: "deadbee" + 8 hex digits + NUL, 16 bytes.
pub fn b16(i: u32) -> Vec<u8> {
    let mut v = format!("deadbee{i:08x}").into_bytes();
    v.push(0);
    v
}

/// A pipe: (read end, write end).
pub fn pipe() -> (OwnedFd, OwnedFd) {
    nix::unistd::pipe().unwrap()
}

/// Reads exactly `n` bytes within the deadline.
pub fn read_exact(fd: impl AsFd, n: usize) -> Vec<u8> {
    read_exact_within(fd, n, *DEADLINE)
}

/// Reads exactly `n` bytes within `deadline`.
pub fn read_exact_within(fd: impl AsFd, n: usize, deadline: Duration) -> Vec<u8> {
    let mut out = vec![0; n];
    let mut got = 0;
    let start = Instant::now();
    while got < n {
        let left = deadline.saturating_sub(start.elapsed());
        assert!(!left.is_zero(), "timed out after {got} of {n} bytes");
        let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
        let ms = PollTimeout::from(left.as_millis().min(10_000) as u16);
        if poll(&mut fds, ms).unwrap() == 0 {
            continue;
        }
        match nix::unistd::read(fd.as_fd(), &mut out[got..]) {
            Ok(0) => panic!("EOF after {got} of {n} bytes"),
            Ok(k) => got += k,
            Err(nix::errno::Errno::EAGAIN) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => panic!("read: {e}"),
        }
    }
    out
}

/// Waits until the fd has something to read.
pub fn wait_readable(fd: impl AsFd) {
    let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
    assert_eq!(
        poll(&mut fds, PollTimeout::try_from(*DEADLINE).unwrap()).unwrap(),
        1,
        "nothing arrived"
    );
}

/// Reads what is in the fd now, without waiting.
pub fn read_available(fd: impl AsFd) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = [0u8; 65536];
    loop {
        let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
        if poll(&mut fds, PollTimeout::ZERO).unwrap() == 0 {
            return out;
        }
        match nix::unistd::read(fd.as_fd(), &mut buf) {
            Ok(0) => return out,
            Ok(k) => out.extend_from_slice(&buf[..k]),
            Err(e) => panic!("read: {e}"),
        }
    }
}

/// Asserts nothing is readable right now (after everything expected was read and
/// the sink reported it served).
pub fn assert_nothing_readable(fd: impl AsFd) {
    let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
    assert_eq!(
        poll(&mut fds, PollTimeout::ZERO).unwrap(),
        0,
        "unexpected bytes"
    );
}

pub fn is_open(fd: RawFd) -> bool {
    nix::fcntl::fcntl(
        unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) },
        nix::fcntl::FcntlArg::F_GETFD,
    )
    .is_ok()
}

/// What the element signalled, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Added(i32),
    Removed(i32, String),
    FdRemoved(i32),
}

#[derive(Clone, Default)]
pub struct Recorder {
    inner: Arc<(Mutex<Vec<Event>>, Condvar)>,
}

impl Recorder {
    pub fn attach(sink: &gst::Element) -> Recorder {
        let r = Recorder::default();
        let r2 = r.clone();
        sink.connect("client-added", false, move |args| {
            r2.record(Event::Added(args[1].get().unwrap()));
            None
        });
        let r2 = r.clone();
        sink.connect("client-removed", false, move |args| {
            let status = status_nick(&args[2]);
            r2.record(Event::Removed(args[1].get().unwrap(), status));
            None
        });
        let r2 = r.clone();
        sink.connect("client-fd-removed", false, move |args| {
            r2.record(Event::FdRemoved(args[1].get().unwrap()));
            None
        });
        r
    }

    pub fn record(&self, e: Event) {
        self.inner.0.lock().unwrap().push(e);
        self.inner.1.notify_all();
    }

    pub fn events(&self) -> Vec<Event> {
        self.inner.0.lock().unwrap().clone()
    }

    /// Waits until `pred` holds for the events so far.
    pub fn wait_for(&self, what: &str, pred: impl Fn(&[Event]) -> bool) -> Vec<Event> {
        let (lock, cv) = &*self.inner;
        let start = Instant::now();
        let mut events = lock.lock().unwrap();
        while !pred(&events) {
            let left = DEADLINE.saturating_sub(start.elapsed());
            assert!(
                !left.is_zero(),
                "timed out waiting for {what}; events: {:?}",
                *events
            );
            events = cv.wait_timeout(events, left).unwrap().0;
        }
        events.clone()
    }

    pub fn wait_fd_removed(&self, fd: i32) -> Vec<Event> {
        self.wait_for(&format!("fd {fd} removed"), |e| {
            e.contains(&Event::FdRemoved(fd))
        })
    }
}

pub fn status_nick(v: &gst::glib::Value) -> String {
    let (_, e) = gst::glib::EnumValue::from_value(v).unwrap();
    e.nick().to_string()
}

pub fn raw(fd: &OwnedFd) -> RawFd {
    fd.as_raw_fd()
}

/// The value of the sink's `sync-method` enum whose nick is `nick`.
pub fn sync_method(sink: &gst::Element, nick: &str) -> gst::glib::Value {
    let pspec = sink.find_property("sync-method").unwrap();
    gst::glib::EnumClass::with_type(pspec.value_type())
        .unwrap()
        .to_value_by_nick(nick)
        .unwrap_or_else(|| panic!("no sync-method {nick}"))
}

/// Emits `add-full` as an application does: `fd` joins with the sync method
/// `sync` (a nick) and the burst limits `min` and `max` (format, value).
pub fn add_full(
    sink: &gst::Element,
    fd: RawFd,
    sync: &str,
    (min_format, min): (gst::Format, u64),
    (max_format, max): (gst::Format, u64),
) {
    sink.emit_by_name_with_values(
        "add-full",
        &[
            fd.to_value(),
            sync_method(sink, sync),
            min_format.to_value(),
            min.to_value(),
            max_format.to_value(),
            max.to_value(),
        ],
    );
}

/// What decoding a capture gave.
pub struct Decoded {
    /// Buffers out of the decoder.
    pub frames: u32,
    /// The error the decoding pipeline posted, if any (a capture cut mid-stream may
    /// end in one; a whole one must not).
    pub error: Option<String>,
}

/// A pipeline from `description` and a count of the buffers reaching its
/// `fakesink name=out signal-handoffs=true`.
pub fn counting(description: &str) -> (gst::Pipeline, Arc<std::sync::atomic::AtomicU32>) {
    let pipeline = gst::parse::launch(description)
        .unwrap_or_else(|e| panic!("{description}: {e}"))
        .downcast::<gst::Pipeline>()
        .unwrap();
    let frames = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let f = frames.clone();
    pipeline
        .by_name("out")
        .unwrap()
        .connect("handoff", false, move |_| {
            f.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            None
        });
    (pipeline, frames)
}

/// Decodes a capture with `filesrc ! {decoder} ! fakesink`, to the end.
pub fn decode(capture: &[u8], decoder: &str) -> Decoded {
    play_capture(capture, decoder, |_| {})
}

/// Writes `capture` to a temporary file and plays `filesrc ! {chain} ! fakesink` to
/// its end (EOS, an error, or 30 s), counting the buffers into the fakesink;
/// `prepare` sees the pipeline before it plays.
fn play_capture(capture: &[u8], chain: &str, prepare: impl FnOnce(&gst::Pipeline)) -> Decoded {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let path = std::env::temp_dir().join(format!(
        "rsmfd-capture-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    ));
    std::fs::write(&path, capture).unwrap();
    let (pipeline, frames) = counting(&format!(
        "filesrc location={} ! {chain} ! fakesink name=out signal-handoffs=true sync=false",
        path.display()
    ));
    prepare(&pipeline);
    pipeline.set_state(gst::State::Playing).unwrap();
    let msg = pipeline.bus().unwrap().timed_pop_filtered(
        gst::ClockTime::from_seconds(30),
        &[gst::MessageType::Eos, gst::MessageType::Error],
    );
    pipeline.set_state(gst::State::Null).unwrap();
    let _ = std::fs::remove_file(&path);
    let error = match msg {
        Some(m) if m.type_() == gst::MessageType::Eos => None,
        Some(m) => Some(format!("{m:?}")),
        None => Some("decoding did not finish".into()),
    };
    Decoded {
        frames: frames.load(Ordering::SeqCst),
        error,
    }
}

/// A burst scenario of the check suite: sync method, keyframes every fourth buffer,
/// the (min, max) bytes of the two `add_full` clients, the buffers each client gets.
pub type BurstCase = (
    &'static str,
    bool,
    [(u64, u64); 2],
    [std::ops::RangeInclusive<u32>; 3],
);

/// `test_burst_client_bytes`, `..._keyframe` and `..._with_keyframe`.
pub const BURST_CASES: [BurstCase; 3] = [
    ("burst", false, [(50, 200), (50, 50)], [5..=9, 6..=9, 7..=9]),
    (
        "burst-keyframe",
        true,
        [(50, 90), (50, 50)],
        [4..=9, 8..=9, 8..=9],
    ),
    (
        "burst-with-keyframe",
        true,
        [(50, 90), (50, 50)],
        [4..=9, 6..=9, 7..=9],
    ),
];

/// The three burst scenarios of GStreamer's check suite, for any handle type: 9
/// buffers of 16 bytes queued with bytes-min 100, then `clients` (a handle as the
/// element's signals take it, and the end its bytes are read from) are added: the
/// first with `add`, the others with `add_full` and `limits` (bytes). After one more
/// buffer, each reads exactly the buffers of `expect`.
pub fn burst_scenario<R: AsFd>(
    factory: &str,
    (sync, keyframes, limits, expect): BurstCase,
    clients: [(gst::glib::Value, R); 3],
) {
    let mut h = harness(
        factory,
        &[
            ("bytes-min", "100"),
            ("sync-method", sync),
            ("burst-format", "bytes"),
            ("burst-value", "80"),
        ],
    );
    h.set_src_caps_str(CHECK_CAPS);
    let delta = |i: u32| keyframes && !i.is_multiple_of(4);
    for i in 0..9 {
        h.push_bytes(&b16(i), delta(i));
    }
    assert_eq!(h.u32("buffers-queued"), 7);
    assert_eq!(h.u32("num-handles"), 0);
    h.sink()
        .emit_by_name_with_values("add", std::slice::from_ref(&clients[0].0));
    assert_eq!(h.u32("num-handles"), 1);
    let sync_value = h.sink().property_value("sync-method");
    for (i, (min, max)) in limits.iter().enumerate() {
        // The check suite's spelling of the signal name.
        h.sink().emit_by_name_with_values(
            "add_full",
            &[
                clients[i + 1].0.clone(),
                sync_value.clone(),
                gst::Format::Bytes.to_value(),
                min.to_value(),
                gst::Format::Bytes.to_value(),
                max.to_value(),
            ],
        );
    }
    assert_eq!(h.u32("num-handles"), 3);
    h.push_bytes(&b16(9), delta(9));
    for ((_, reader), range) in clients.iter().zip(expect) {
        let want: Vec<u8> = range.clone().flat_map(b16).collect();
        assert_eq!(
            read_exact(reader, want.len()),
            want,
            "expected buffers {range:?}"
        );
    }
    h.stop();
    for (_, reader) in &clients {
        assert_nothing_readable(reader);
    }
}

/// What decoding a capture from its first byte gave, with the flags of the first
/// buffer into the decoder that is not a header (`None`: none came).
pub struct DecodedFromStart {
    pub decoded: Decoded,
    pub first_frame_flags: Option<gst::BufferFlags>,
}

impl DecodedFromStart {
    /// The first frame the decoder got is a keyframe, and frames came out.
    pub fn starts_on_keyframe(&self) -> bool {
        self.decoded.frames > 0
            && self
                .first_frame_flags
                .is_some_and(|f| !f.contains(gst::BufferFlags::DELTA_UNIT))
    }

    /// Fails the test unless [`Self::starts_on_keyframe`], naming `whose` capture
    /// it was and what the decoding gave (frames, first frame's flags, error).
    pub fn assert_starts_on_keyframe(&self, whose: &str) {
        assert!(
            self.starts_on_keyframe(),
            "{whose}: {} frames, first frame flags {:?}, error {:?}",
            self.decoded.frames,
            self.first_frame_flags,
            self.decoded.error
        );
    }
}

/// Decodes a capture with `filesrc ! {demuxer} ! {decoder} name=dec ! fakesink`
/// and notes the flags of the first non-header buffer reaching the decoder.
pub fn decode_from_start(capture: &[u8], demuxer: &str, decoder: &str) -> DecodedFromStart {
    let first: Arc<Mutex<Option<gst::BufferFlags>>> = Default::default();
    let f = first.clone();
    let decoded = play_capture(
        capture,
        &format!("{demuxer} ! {decoder} name=dec"),
        |pipeline| {
            pipeline
                .by_name("dec")
                .unwrap()
                .static_pad("sink")
                .unwrap()
                .add_probe(gst::PadProbeType::BUFFER, move |_, info| {
                    if let Some(b) = info.buffer() {
                        let mut first = f.lock().unwrap();
                        if first.is_none() && !b.flags().contains(gst::BufferFlags::HEADER) {
                            *first = Some(b.flags());
                        }
                    }
                    gst::PadProbeReturn::Ok
                });
        },
    );
    let first_frame_flags = *first.lock().unwrap();
    DecodedFromStart {
        decoded,
        first_frame_flags,
    }
}

/// Fetches `path` over HTTP from 127.0.0.1:`port`: the response head and at least
/// `want` bytes of body, within `deadline`.
pub fn http_fetch(port: u16, path: &str, want: usize, deadline: Duration) -> (String, Vec<u8>) {
    let conn = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    http_get_on(conn, "test", path, want, deadline, || {})
}

/// Sends `GET {path}` with `Host: {host}` on `conn` and reads the response head and
/// at least `want` bytes of body within `deadline`. `check` runs between reads (at
/// least every 200 ms), to fail the test at once when the server failed.
pub fn http_get_on(
    mut conn: std::net::TcpStream,
    host: &str,
    path: &str,
    want: usize,
    deadline: Duration,
    mut check: impl FnMut(),
) -> (String, Vec<u8>) {
    use std::io::{Read, Write};
    conn.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    write!(conn, "GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n").unwrap();
    let mut data = Vec::new();
    let mut buf = [0u8; 16384];
    let start = Instant::now();
    loop {
        if let Some(end) = data.windows(4).position(|w| w == b"\r\n\r\n")
            && data.len() >= end + 4 + want
        {
            let head = String::from_utf8_lossy(&data[..end + 4]).to_string();
            return (head, data[end + 4..].to_vec());
        }
        assert!(
            start.elapsed() < deadline,
            "GET {path}: {} bytes in {deadline:?}",
            data.len()
        );
        check();
        match conn.read(&mut buf) {
            Ok(0) => panic!("GET {path}: closed after {} bytes", data.len()),
            Ok(n) => data.extend_from_slice(&buf[..n]),
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(e) => panic!("GET {path}: {e}"),
        }
    }
}

/// The README's text between `<!-- {name} -->` and `<!-- /{name} -->` (the opening
/// marker included): a block of commands or a page that a test runs as it stands.
pub fn readme_block(name: &str) -> &'static str {
    let readme = include_str!("../../README.md");
    let start = readme
        .find(&format!("<!-- {name} -->"))
        .unwrap_or_else(|| panic!("README marker <!-- {name} -->"));
    let end = readme
        .find(&format!("<!-- /{name} -->"))
        .unwrap_or_else(|| panic!("README end marker <!-- /{name} -->"));
    &readme[start..end]
}

/// The README's recipe lines (its `recipes` block), without `gst-launch-1.0 `.
pub fn readme_recipes() -> Vec<String> {
    readme_block("recipes")
        .lines()
        .filter_map(|l| l.strip_prefix("gst-launch-1.0 "))
        .map(str::to_string)
        .collect()
}

/// `line` (a gst-launch-1.0 line) with every `port=N` swapped for `port={port}`
/// (0: a free port each, read back with [`current_port`]).
pub fn with_port(line: &str, port: u16) -> String {
    line.split_whitespace()
        .map(|w| {
            if w.starts_with("port=") {
                format!("port={port}")
            } else {
                w.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Fails the test with `pipeline`'s error, if it posted one, saying it was `what`'s.
pub fn assert_no_error(pipeline: &gst::Pipeline, what: &str) {
    if let Some(msg) = pipeline
        .bus()
        .unwrap()
        .pop_filtered(&[gst::MessageType::Error])
    {
        panic!("{what}: {msg:?}");
    }
}

/// How long a live pipeline may take to set its sink's caps (an encoder's first
/// output on a loaded machine).
pub static CAPS_DEADLINE: LazyLock<Duration> =
    LazyLock::new(|| wait::scaled(Duration::from_secs(20)));

/// Waits (up to [`CAPS_DEADLINE`]) for the caps on the sink's pad, with a
/// `streamheader` field if `with_streamheader`.
pub fn wait_caps(sink: &gst::Element, with_streamheader: bool) -> gst::Caps {
    let pad = sink.static_pad("sink").unwrap();
    let mut caps = None;
    wait_until_within("caps on the sink", *CAPS_DEADLINE, || {
        caps = pad
            .current_caps()
            .filter(|c| !with_streamheader || c.structure(0).unwrap().has_field("streamheader"));
        caps.is_some()
    });
    caps.unwrap()
}

/// The caps' streamheader buffers, concatenated; fails if there are none.
pub fn streamheader_bytes(caps: &gst::Caps) -> Vec<u8> {
    let array = caps
        .structure(0)
        .unwrap()
        .get::<gst::Array>("streamheader")
        .unwrap();
    let mut out = Vec::new();
    for v in array.iter() {
        out.extend_from_slice(&v.get::<gst::Buffer>().unwrap().map_readable().unwrap());
    }
    assert!(!out.is_empty(), "an empty streamheader");
    out
}

/// The streamheader of the sink's caps, concatenated, once they have one.
pub fn wait_streamheader(sink: &gst::Element) -> Vec<u8> {
    streamheader_bytes(&wait_caps(sink, true))
}

/// `current-port` of an `rstcpserversink`, checked to be a bound port.
pub fn current_port(sink: &gst::Element) -> u16 {
    let port = sink.property::<i32>("current-port");
    assert!((1..=65535).contains(&port), "current-port is {port}");
    port as u16
}

/// A port free now (bound and released), for an element or program that must be
/// given its port in advance (several elements sharing one, a child process).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Polls `cond` until it holds; fails after [`DEADLINE`].
pub fn wait_until(what: &str, cond: impl FnMut() -> bool) {
    wait_until_within(what, *DEADLINE, cond);
}

/// Polls `cond` every 2 ms until it holds; fails after `deadline`.
pub fn wait_until_within(what: &str, deadline: Duration, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// A pipeline from a launch line in PLAYING, set to NULL when dropped, also when a
/// test fails half-way (a pipeline dropped while PLAYING disturbs the other tests of
/// the process).
pub struct Running {
    pipeline: gst::Pipeline,
}

impl Running {
    /// Parses `desc` and sets it to PLAYING; fails the test if either fails.
    pub fn launch(desc: &str) -> Running {
        init();
        let pipeline = gst::parse::launch(desc)
            .unwrap_or_else(|e| panic!("{desc}: {e}"))
            .downcast::<gst::Pipeline>()
            .unwrap();
        // Guarded before the state change, so a failing one still ends in NULL.
        let running = Running { pipeline };
        running
            .pipeline
            .set_state(gst::State::Playing)
            .unwrap_or_else(|e| panic!("{desc}: {e}"));
        running
    }

    /// Guards a pipeline made elsewhere (to be connected to before it plays).
    pub fn guard(pipeline: gst::Pipeline) -> Running {
        Running { pipeline }
    }

    /// The element named `name` in the pipeline.
    pub fn get(&self, name: &str) -> gst::Element {
        self.pipeline.by_name(name).unwrap()
    }

    /// The pipeline's (first) `rstcpserversink`, for lines whose sink has no name.
    pub fn tcp_server_sink(&self) -> gst::Element {
        self.pipeline
            .iterate_sinks()
            .into_iter()
            .flatten()
            .find(|e| e.factory().is_some_and(|f| f.name() == "rstcpserversink"))
            .expect("the pipeline has an rstcpserversink")
    }

    /// Fails the test with the pipeline's error, if it posted one.
    pub fn assert_no_error(&self) {
        assert_no_error(&self.pipeline, "pipeline error");
    }
}

impl std::ops::Deref for Running {
    type Target = gst::Pipeline;
    fn deref(&self) -> &gst::Pipeline {
        &self.pipeline
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.pipeline.set_state(gst::State::Null);
    }
}
