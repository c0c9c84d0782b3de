//! `rsmultisocketsink` through GStreamer with real `GSocket`s: GStreamer's own
//! multisocketsink check scenarios, the removal signals and their order, sockets
//! that stay open and usable after removal, and the same scenario against the C
//! `multisocketsink`, byte for byte.

mod common;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

use common::*;
use gio::prelude::*;
use gst::glib;
use gst::prelude::*;
use gst_check::Harness;

const SINK: &str = "rsmultisocketsink";

/// A connected pair: the `GSocket` handed to the sink and the peer that reads.
fn socket_pair() -> (gio::Socket, UnixStream) {
    let (ours, peer) = UnixStream::pair().unwrap();
    (gio::Socket::from_fd(OwnedFd::from(ours)).unwrap(), peer)
}

fn add(fed: &Harness, socket: &gio::Socket) {
    fed.sink().emit_by_name::<()>("add", &[socket]);
}

fn remove(fed: &Harness, socket: &gio::Socket) {
    fed.sink().emit_by_name::<()>("remove", &[socket]);
}

fn stats(sink: &gst::Element, socket: &gio::Socket) -> gst::Structure {
    sink.emit_by_name::<gst::Structure>("get-stats", &[socket])
}

/// `get-stats` for the socket of a client signal, asked from inside its handler
/// (`args`: the sink, the socket, ...).
fn stats_in_handler(args: &[glib::Value]) -> gst::Structure {
    let sink = args[0].get::<gst::Element>().unwrap();
    sink.emit_by_name_with_values("get-stats", &[args[1].clone()])
        .unwrap()
        .get::<gst::Structure>()
        .unwrap()
}

/// A socket's identity in recorded events (sockets are not `Send`).
fn id(socket: &gio::Socket) -> usize {
    socket.as_ptr() as usize
}

/// What the element signalled, in order, with what `get-stats` answered inside the
/// handler: `bytes-sent` in `client-removed`, the number of fields (0: unknown
/// socket) in `client-socket-removed`.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Ev {
    Added(usize),
    Removed(usize, String, Option<u64>),
    SocketRemoved(usize, usize),
}

#[derive(Clone, Default)]
struct Recorder {
    inner: Arc<(Mutex<Vec<Ev>>, Condvar)>,
}

impl Recorder {
    fn attach(sink: &gst::Element) -> Recorder {
        let r = Recorder::default();
        let socket_id = |v: &glib::Value| {
            let s = v.get::<Option<glib::Object>>().unwrap();
            s.expect("a socket in the signal").as_ptr() as usize
        };
        let r2 = r.clone();
        sink.connect("client-added", false, move |args| {
            r2.record(Ev::Added(socket_id(&args[1])));
            None
        });
        let r2 = r.clone();
        sink.connect("client-removed", false, move |args| {
            let s = stats_in_handler(args);
            let status = status_nick(&args[2]);
            r2.record(Ev::Removed(
                socket_id(&args[1]),
                status,
                s.get::<u64>("bytes-sent").ok(),
            ));
            None
        });
        let r2 = r.clone();
        sink.connect("client-socket-removed", false, move |args| {
            let s = stats_in_handler(args);
            r2.record(Ev::SocketRemoved(socket_id(&args[1]), s.n_fields()));
            None
        });
        r
    }

    fn record(&self, e: Ev) {
        self.inner.0.lock().unwrap().push(e);
        self.inner.1.notify_all();
    }

    fn events(&self) -> Vec<Ev> {
        self.inner.0.lock().unwrap().clone()
    }

    /// Waits until `socket` was signalled removed (`client-socket-removed`).
    fn wait_socket_removed(&self, socket: &gio::Socket) -> Vec<Ev> {
        let (lock, cv) = &*self.inner;
        let start = Instant::now();
        let mut events = lock.lock().unwrap();
        while !events
            .iter()
            .any(|e| matches!(e, Ev::SocketRemoved(s, _) if *s == id(socket)))
        {
            let left = DEADLINE.saturating_sub(start.elapsed());
            assert!(!left.is_zero(), "socket not removed; events: {events:?}");
            events = cv.wait_timeout(events, left).unwrap().0;
        }
        events.clone()
    }
}

/// Waits until the test holds the only reference to `socket`: a removal on the IO
/// thread drops the element's reference just after `client-socket-removed`.
fn wait_released(socket: &gio::Socket) {
    let start = Instant::now();
    while socket.ref_count() != 1 {
        assert!(
            start.elapsed() < *DEADLINE,
            "the element kept a reference ({} in all)",
            socket.ref_count()
        );
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

/// The socket works for its owner after the element let it go: both ways.
fn assert_usable(socket: &gio::Socket, peer: &mut UnixStream) {
    socket.set_blocking(true);
    assert_eq!(socket.send(b"after", gio::Cancellable::NONE).unwrap(), 5);
    let mut got = [0u8; 5];
    peer.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"after");
    peer.write_all(b"back").unwrap();
    let mut back = [0u8; 4];
    assert_eq!(
        socket.receive(&mut back, gio::Cancellable::NONE).unwrap(),
        4
    );
    assert_eq!(&back, b"back");
}

#[test]
fn no_clients() {
    check_suite::no_clients(SINK);
}

#[test]
fn add_client_buffer_of_two_memories() {
    let mut fed = harness(SINK, &[]);
    let (socket, peer) = socket_pair();
    add(&fed, &socket);
    fed.set_src_caps_str(CHECK_CAPS);
    let mut buffer = gst::Buffer::from_slice(*b"dead");
    buffer
        .get_mut()
        .unwrap()
        .append_memory(gst::Memory::from_slice(*b" good"));
    fed.push_ok(buffer);
    assert_eq!(read_exact(&peer, 9), b"dead good");
    fed.wait_u64("bytes-served", 9);
    fed.stop();
    assert_eq!(socket.ref_count(), 1, "the element kept a reference");
    assert!(
        !socket.is_closed(),
        "the element closed a socket it was given"
    );
}

#[test]
fn sending_buffers_with_9_memories() {
    let mut fed = harness(SINK, &[]);
    let (socket, peer) = socket_pair();
    add(&fed, &socket);
    fed.set_src_caps_str(CHECK_CAPS);
    let numbers = [
        "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
    ];
    let mut buffer = gst::Buffer::new();
    for n in numbers {
        buffer
            .get_mut()
            .unwrap()
            .append_memory(gst::Memory::from_slice(n.as_bytes().to_vec()));
    }
    fed.push_ok(buffer);
    let all = numbers.concat();
    assert_eq!(read_exact(&peer, all.len()), all.as_bytes());
    fed.stop();
}

#[test]
fn add_client_in_null_state_adds_nothing_and_keeps_no_reference() {
    init();
    let sink = gst::ElementFactory::make(SINK).build().unwrap();
    let rec = Recorder::attach(&sink);
    let (socket, _peer) = socket_pair();
    sink.emit_by_name::<()>("add", &[&socket]);
    assert_eq!(sink.property::<u32>("num-handles"), 0);
    assert!(rec.events().is_empty());
    assert_eq!(socket.ref_count(), 1);
}

#[test]
fn streamheader_sent_once_then_data() {
    check_suite::streamheader_sent_once_then_data(SINK, socket_pair);
}

#[test]
fn changed_streamheader_is_resent() {
    let (fed, [c1, c2]) = check_suite::changed_streamheader_is_resent(SINK, socket_pair);
    remove(&fed, &c1.0);
    remove(&fed, &c2.0);
    fed.stop();
}

#[test]
fn burst_client_bytes() {
    check_suite::burst_case(SINK, 0, socket_pair);
}

#[test]
fn burst_client_bytes_keyframe() {
    check_suite::burst_case(SINK, 1, socket_pair);
}

#[test]
fn burst_client_bytes_with_keyframe() {
    check_suite::burst_case(SINK, 2, socket_pair);
}

#[test]
fn client_next_keyframe() {
    check_suite::client_next_keyframe(SINK, socket_pair);
}

#[test]
fn removal_signals_name_the_socket_in_order_and_leave_it_usable() {
    let mut fed = harness(SINK, &[]);
    fed.set_src_caps_str(CHECK_CAPS);
    let rec = Recorder::attach(&fed.sink());
    let (socket, mut peer) = socket_pair();
    let caller = std::thread::current().id();
    let added_on_caller = Arc::new(Mutex::new(None));
    {
        let a = added_on_caller.clone();
        fed.sink().connect("client-added", false, move |_| {
            *a.lock().unwrap() = Some(std::thread::current().id() == caller);
            None
        });
    }
    add(&fed, &socket);
    assert_eq!(
        *added_on_caller.lock().unwrap(),
        Some(true),
        "client-added not emitted synchronously in add"
    );
    // The element holds one reference while the socket is a client; as the C
    // element, it made the socket non-blocking.
    assert_eq!(socket.ref_count(), 2);
    assert!(!socket.is_blocking());
    fed.push_bytes(b"abcdef", false);
    assert_eq!(read_exact(&peer, 6), b"abcdef");
    fed.wait_u64("bytes-served", 6);
    let s = stats(&fed.sink(), &socket);
    assert_eq!(s.name(), "multihandlesink-stats");
    assert_eq!(s.get::<u64>("bytes-sent").unwrap(), 6);
    remove(&fed, &socket);
    // remove is synchronous: both signals, in order, before it returned; get-stats
    // answers in client-removed and no longer in client-socket-removed.
    assert_eq!(
        rec.events(),
        vec![
            Ev::Added(id(&socket)),
            Ev::Removed(id(&socket), "removed".into(), Some(6)),
            Ev::SocketRemoved(id(&socket), 0),
        ]
    );
    assert_eq!(fed.u32("num-handles"), 0);
    assert_eq!(socket.ref_count(), 1, "the element kept a reference");
    assert!(!socket.is_closed());
    assert_usable(&socket, &mut peer);
    // A second remove is only a warning.
    remove(&fed, &socket);
    assert_eq!(rec.events().len(), 3);
    // The same socket can be added again at once.
    add(&fed, &socket);
    fed.push_bytes(b"again", false);
    assert_eq!(read_exact(&peer, 5), b"again");
    fed.stop();
    // NULL removed it with the signals and let it go.
    assert_eq!(
        rec.events()[3..],
        [
            Ev::Added(id(&socket)),
            Ev::Removed(id(&socket), "removed".into(), Some(5)),
            Ev::SocketRemoved(id(&socket), 0),
        ]
    );
    assert_eq!(socket.ref_count(), 1);
    assert_usable(&socket, &mut peer);
}

#[test]
fn peer_closing_is_closed() {
    let mut fed = harness(SINK, &[]);
    fed.set_src_caps_str(CHECK_CAPS);
    let rec = Recorder::attach(&fed.sink());
    let (socket, peer) = socket_pair();
    add(&fed, &socket);
    fed.push_bytes(b"data", false);
    assert_eq!(read_exact(&peer, 4), b"data");
    fed.wait_u64("bytes-served", 4);
    drop(peer);
    let events = rec.wait_socket_removed(&socket);
    assert_eq!(
        events[1..],
        [
            Ev::Removed(id(&socket), "closed".into(), Some(4)),
            Ev::SocketRemoved(id(&socket), 0)
        ]
    );
    wait_released(&socket);
    assert!(!socket.is_closed());
    fed.stop();
}

#[test]
fn duplicate_add_only_signals_duplicate() {
    let mut fed = harness(SINK, &[]);
    fed.set_src_caps_str(CHECK_CAPS);
    let rec = Recorder::attach(&fed.sink());
    let (socket, peer) = socket_pair();
    add(&fed, &socket);
    add(&fed, &socket);
    // get-stats in the handler answers for the socket's client, which goes on.
    assert_eq!(
        rec.events(),
        vec![
            Ev::Added(id(&socket)),
            Ev::Removed(id(&socket), "duplicate".into(), Some(0))
        ]
    );
    assert_eq!(socket.ref_count(), 2);
    fed.push_bytes(b"still", false);
    assert_eq!(read_exact(&peer, 5), b"still");
    assert_eq!(fed.u32("num-handles"), 1);
    fed.stop();
    assert_eq!(socket.ref_count(), 1);
}

#[test]
fn unknown_socket_get_stats_is_empty_and_remove_does_nothing() {
    let mut fed = harness(SINK, &[]);
    fed.set_src_caps_str(CHECK_CAPS);
    let rec = Recorder::attach(&fed.sink());
    let (client, peer) = socket_pair();
    let (stranger, _stranger_peer) = socket_pair();
    add(&fed, &client);
    assert_eq!(stats(&fed.sink(), &stranger).n_fields(), 0);
    remove(&fed, &stranger);
    fed.sink().emit_by_name::<()>("remove-flush", &[&stranger]);
    // Another GSocket over the client's own fd is not the client.
    let alias = gio::Socket::from_fd(nix::unistd::dup(&client).unwrap()).unwrap();
    assert_eq!(stats(&fed.sink(), &alias).n_fields(), 0);
    assert_eq!(rec.events(), vec![Ev::Added(id(&client))]);
    fed.push_bytes(b"fine", false);
    assert_eq!(read_exact(&peer, 4), b"fine");
    assert_eq!(stranger.ref_count(), 1);
    fed.stop();
}

#[test]
fn remove_flush_sends_what_is_queued_then_removes() {
    let mut fed = harness(SINK, &[]);
    fed.set_src_caps_str(CHECK_CAPS);
    let rec = Recorder::attach(&fed.sink());
    let (socket, mut peer) = socket_pair();
    add(&fed, &socket);
    // More than the socket buffer holds, so the client has data queued when flushed.
    let big = vec![7u8; 1024 * 1024];
    fed.push_bytes(&big, false);
    fed.sink().emit_by_name::<()>("remove-flush", &[&socket]);
    fed.push_bytes(b"newer", false);
    assert_eq!(read_exact(&peer, big.len()), big);
    let events = rec.wait_socket_removed(&socket);
    assert_eq!(
        events[1..],
        [
            Ev::Removed(id(&socket), "removed".into(), Some(big.len() as u64)),
            Ev::SocketRemoved(id(&socket), 0)
        ]
    );
    assert_nothing_readable(&peer);
    wait_released(&socket);
    assert_usable(&socket, &mut peer);
    fed.stop();
}

#[test]
fn clear_removes_everyone() {
    let fed = harness(SINK, &[]);
    let rec = Recorder::attach(&fed.sink());
    let pairs: Vec<_> = (0..3).map(|_| socket_pair()).collect();
    for (socket, _) in &pairs {
        add(&fed, socket);
    }
    fed.sink().emit_by_name::<()>("clear", &[]);
    assert_eq!(fed.u32("num-handles"), 0);
    let events = rec.events();
    for (socket, _) in &pairs {
        let at = |e: Ev| events.iter().position(|x| *x == e);
        let removed = at(Ev::Removed(id(socket), "removed".into(), Some(0))).unwrap();
        assert!(removed < at(Ev::SocketRemoved(id(socket), 0)).unwrap());
        assert_eq!(socket.ref_count(), 1);
    }
    fed.stop();
}

#[test]
fn tcp_socket_from_gio() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let socket = gio::Socket::new(
        gio::SocketFamily::Ipv4,
        gio::SocketType::Stream,
        gio::SocketProtocol::Tcp,
    )
    .unwrap();
    let address = gio::InetSocketAddress::from_string("127.0.0.1", port.into()).unwrap();
    SocketExt::connect(&socket, &address, gio::Cancellable::NONE).unwrap();
    let (peer, _) = listener.accept().unwrap();
    let mut fed = harness(SINK, &[]);
    let rec = Recorder::attach(&fed.sink());
    fed.set_src_caps(streamheader_caps(&[b"HEAD"]));
    add(&fed, &socket);
    fed.push_bytes(b"over tcp", false);
    assert_eq!(read_exact(&peer, 12), b"HEADover tcp");
    fed.wait_u64("bytes-served", 12);
    remove(&fed, &socket);
    rec.wait_socket_removed(&socket);
    assert_eq!(socket.ref_count(), 1);
    assert!(socket.is_connected());
    fed.stop();
}

#[test]
fn signals_and_properties_as_the_c_multisocketsink() {
    init();
    // Signals exist once the class was made.
    let _instances =
        [SINK, "multisocketsink"].map(|f| gst::ElementFactory::make(f).build().unwrap());
    let c = gst::ElementFactory::find("multisocketsink")
        .expect("the C multisocketsink (gstreamer1.0-plugins-base) is required")
        .load()
        .unwrap()
        .element_type();
    let rs = gst::ElementFactory::find(SINK)
        .unwrap()
        .load()
        .unwrap()
        .element_type();
    // Our enums have GType names of their own: compare what they stand for.
    let name = |t: glib::Type| {
        t.name()
            .replace("GstRsMultiHandleSink", "GstMultiHandleSink")
    };
    for signal in [
        "add",
        "add-full",
        "remove",
        "remove-flush",
        "get-stats",
        "clear",
        "client-added",
        "client-removed",
        "client-socket-removed",
    ] {
        let query = |t| {
            let q = glib::subclass::SignalId::lookup(signal, t)
                .unwrap_or_else(|| panic!("no {signal}"))
                .query();
            let params: Vec<String> = q.param_types().iter().map(|p| name(p.type_())).collect();
            (params, name(q.return_type().type_()), q.flags())
        };
        assert_eq!(query(rs), query(c), "signal {signal}");
    }
    let props = |t: glib::Type| {
        let class = glib::object::ObjectClass::from_type(t).unwrap();
        class
            .list_properties()
            .iter()
            .map(|p| (p.name().to_string(), p.value_type()))
            .collect::<Vec<_>>()
    };
    let ours = props(rs);
    for (prop, t) in props(c) {
        let mine = ours.iter().find(|(n, _)| *n == prop);
        let mine = mine.unwrap_or_else(|| panic!("no property {prop}"));
        assert_eq!(name(mine.1), name(t), "property {prop}");
    }
    assert!(!ours.iter().any(|(n, _)| n == "handle-read"));
}

/// Reads until what was read ends with `suffix`.
fn read_through(peer: &UnixStream, suffix: &[u8]) -> Vec<u8> {
    let mut got = Vec::new();
    while !got.ends_with(suffix) {
        wait_readable(peer);
        got.extend(read_available(peer));
    }
    got
}

/// Runs one scenario (clients joining at different points, a duplicate add, a
/// removal, flushes) on `factory` and returns what each client's peer read, and the
/// events of each client in order, clients numbered in the order they were added
/// (which client's flush ends first is up to the IO thread).
fn scenario(factory: &str) -> (Vec<Vec<u8>>, Vec<(usize, String)>) {
    let mut fed = harness(factory, &check_suite::C_COMPARISON_PROPS);
    let rec = Recorder::attach(&fed.sink());
    fed.set_src_caps(streamheader_caps(&[b"HEAD1", b"HEAD2"]));
    let mut clients = Vec::new();
    let mut first_client_read = Vec::new();
    for (i, data) in (0..30u32).map(b16).enumerate() {
        // Clients join at different points of the stream.
        if i % 10 == 5 {
            clients.push(socket_pair());
            add(&fed, &clients.last().unwrap().0);
        }
        if i == 12 {
            add(&fed, &clients[0].0);
        }
        fed.push_bytes(&data, i % 3 != 0);
        if i % 10 == 5 {
            // The C element places a new client when its IO thread gets to it:
            // wait for that, so both place it at the same point of the stream.
            wait_readable(&clients.last().unwrap().1);
        }
        if i == 20 {
            // Once the first client has everything so far, nothing is left
            // unwritten when it is removed.
            first_client_read = read_through(&clients[0].1, &data);
            remove(&fed, &clients[0].0);
            rec.wait_socket_removed(&clients[0].0);
        }
    }
    for (socket, _) in &clients[1..] {
        fed.sink().emit_by_name::<()>("remove-flush", &[socket]);
    }
    fed.push_bytes(b"not sent", false);
    let bytes = clients
        .iter()
        .map(|(socket, peer)| {
            rec.wait_socket_removed(socket);
            read_available(peer)
        })
        .enumerate()
        .map(|(i, rest)| match i {
            0 => [std::mem::take(&mut first_client_read), rest].concat(),
            _ => rest,
        })
        .collect();
    fed.stop();
    for (socket, mut peer) in clients {
        wait_released(&socket);
        assert!(!socket.is_blocking(), "{factory} left the socket blocking");
        assert_usable(&socket, &mut peer);
    }
    let mut order = Vec::new();
    let mut number = |s: usize| match order.iter().position(|c| *c == s) {
        Some(n) => n,
        None => {
            order.push(s);
            order.len() - 1
        }
    };
    let mut events: Vec<_> = rec
        .events()
        .into_iter()
        .map(|e| match e {
            Ev::Added(s) => (number(s), "added".to_string()),
            // How much the client had been sent when it was refused depends on
            // when the IO thread ran.
            Ev::Removed(s, status, _) if status == "duplicate" => (number(s), status),
            Ev::Removed(s, status, sent) => (number(s), format!("removed {status} {sent:?}")),
            Ev::SocketRemoved(s, n) => (number(s), format!("socket-removed {n}")),
        })
        .collect();
    events.sort_by_key(|(client, _)| *client);
    (bytes, events)
}

#[test]
fn same_bytes_and_signals_as_the_c_multisocketsink() {
    init();
    assert!(
        gst::ElementFactory::find("multisocketsink").is_some(),
        "the C multisocketsink (gstreamer1.0-plugins-base) is required"
    );
    let (rs_bytes, rs_events) = scenario(SINK);
    let (c_bytes, c_events) = scenario("multisocketsink");
    assert!(
        rs_bytes.iter().all(|b| b.starts_with(b"HEAD1HEAD2")),
        "{rs_bytes:?}"
    );
    check_suite::assert_same_bytes_as_c(
        &rs_bytes,
        &c_bytes,
        "rsmultisocketsink and multisocketsink wrote different bytes",
    );
    assert_eq!(rs_events, c_events);
}

/// A `GstNetworkMessage` or `GstNetworkMessageDispatched` event that reached the
/// test's src pad.
#[derive(Debug, Clone, PartialEq, Eq)]
struct NetworkEvent {
    name: String,
    socket: usize,
    bytes: Vec<u8>,
    buffer: usize,
}

#[derive(Clone, Default)]
struct NetworkEvents {
    inner: Arc<(Mutex<Vec<NetworkEvent>>, Condvar)>,
}

impl NetworkEvents {
    /// Records the network events arriving upstream at `fed`'s src pad.
    fn watch(fed: &Harness) -> NetworkEvents {
        let events = NetworkEvents::default();
        let e = events.clone();
        fed.srcpad()
            .unwrap()
            .add_probe(gst::PadProbeType::EVENT_UPSTREAM, move |_, info| {
                let Some(gst::PadProbeData::Event(event)) = &info.data else {
                    return gst::PadProbeReturn::Ok;
                };
                let Some(s) = event.structure() else {
                    return gst::PadProbeReturn::Ok;
                };
                if s.name().starts_with("GstNetworkMessage") {
                    let object = s.value("object").unwrap();
                    // As C declares it: a GObject, not a GSocket.
                    assert_eq!(object.type_(), glib::Object::static_type());
                    let object = object.get::<glib::Object>().unwrap();
                    assert!(object.is::<gio::Socket>());
                    let buffer = s.get::<gst::Buffer>("buffer").unwrap();
                    let bytes = buffer.map_readable().unwrap().to_vec();
                    let (lock, cv) = &*e.inner;
                    lock.lock().unwrap().push(NetworkEvent {
                        name: s.name().to_string(),
                        socket: object.as_ptr() as usize,
                        bytes,
                        buffer: buffer.as_ptr() as usize,
                    });
                    cv.notify_all();
                }
                gst::PadProbeReturn::Ok
            })
            .unwrap();
        events
    }

    fn all(&self) -> Vec<NetworkEvent> {
        self.inner.0.lock().unwrap().clone()
    }

    /// Waits until `n` events arrived and returns them.
    fn wait(&self, n: usize) -> Vec<NetworkEvent> {
        let (lock, cv) = &*self.inner;
        let start = Instant::now();
        let mut events = lock.lock().unwrap();
        while events.len() < n {
            let left = DEADLINE.saturating_sub(start.elapsed());
            assert!(
                !left.is_zero(),
                "{} of {n} events: {events:?}",
                events.len()
            );
            events = cv.wait_timeout(events, left).unwrap().0;
        }
        events.clone()
    }
}

/// `send-dispatched`: every buffer written whole to a client, streamheader first,
/// comes back upstream as the very buffer queued, naming the client's socket.
#[test]
fn send_dispatched_announces_each_buffer_sent_to_each_client() {
    let mut fed = harness(SINK, &[("send-dispatched", "true")]);
    assert!(fed.sink().property::<bool>("send-dispatched"));
    let net = NetworkEvents::watch(&fed);
    let caps = streamheader_caps(&[b"HEAD"]);
    let head = caps.structure(0).unwrap().get::<gst::Array>("streamheader");
    let head = head.unwrap().first().unwrap().get::<gst::Buffer>().unwrap();
    fed.set_src_caps(caps);
    let (s1, p1) = socket_pair();
    let (s2, p2) = socket_pair();
    add(&fed, &s1);
    let one = buffer(b"one", false, false);
    fed.push_ok(one.clone());
    assert_eq!(read_exact(&p1, 7), b"HEADone");
    add(&fed, &s2);
    let two = buffer(b"two", false, false);
    fed.push_ok(two.clone());
    assert_eq!(read_exact(&p1, 3), b"two");
    assert_eq!(read_exact(&p2, 7), b"HEADtwo");
    let events = net.wait(5);
    let sent = |socket: &gio::Socket, b: &gst::Buffer| NetworkEvent {
        name: "GstNetworkMessageDispatched".into(),
        socket: id(socket),
        bytes: b.map_readable().unwrap().to_vec(),
        buffer: b.as_ptr() as usize,
    };
    let of = |socket: &gio::Socket| {
        events
            .iter()
            .filter(|e| e.socket == id(socket))
            .cloned()
            .collect::<Vec<_>>()
    };
    assert_eq!(
        of(&s1),
        [sent(&s1, &head), sent(&s1, &one), sent(&s1, &two)]
    );
    assert_eq!(of(&s2), [sent(&s2, &head), sent(&s2, &two)]);
    fed.stop();
    assert_eq!(net.all().len(), 5);
}

#[test]
fn no_dispatched_events_by_default() {
    let mut fed = harness(SINK, &[]);
    assert!(!fed.sink().property::<bool>("send-dispatched"));
    let net = NetworkEvents::watch(&fed);
    fed.set_src_caps_str(CHECK_CAPS);
    let (socket, peer) = socket_pair();
    add(&fed, &socket);
    fed.push_bytes(b"quiet", false);
    assert_eq!(read_exact(&peer, 5), b"quiet");
    fed.wait_u64("bytes-served", 5);
    // The IO thread is gone after NULL: whatever it would have pushed, it has.
    fed.stop();
    assert_eq!(net.all(), []);
}

/// `send-messages`: what a client sends comes upstream as a `GstNetworkMessage`;
/// without it, it is read and dropped.
#[test]
fn send_messages_forwards_what_clients_send() {
    let mut fed = harness(SINK, &[("send-messages", "true")]);
    let net = NetworkEvents::watch(&fed);
    let rec = Recorder::attach(&fed.sink());
    fed.set_src_caps_str(CHECK_CAPS);
    let (socket, mut peer) = socket_pair();
    let (other, _other_peer) = socket_pair();
    add(&fed, &socket);
    add(&fed, &other);
    peer.write_all(b"hello").unwrap();
    let message = |bytes: &[u8], e: &NetworkEvent| NetworkEvent {
        name: "GstNetworkMessage".into(),
        socket: id(&socket),
        bytes: bytes.to_vec(),
        buffer: e.buffer,
    };
    let events = net.wait(1);
    assert_eq!(events, [message(b"hello", &events[0])]);
    peer.write_all(b"world").unwrap();
    let events = net.wait(2);
    assert_eq!(events[1], message(b"world", &events[1]));
    // The client goes on being served.
    fed.push_bytes(b"data", false);
    assert_eq!(read_exact(&peer, 4), b"data");
    fed.sink().set_property("send-messages", false);
    peer.write_all(b"dropped").unwrap();
    drop(peer);
    rec.wait_socket_removed(&socket);
    assert_eq!(net.all().len(), 2, "{:?}", net.all());
    assert_eq!(fed.u32("num-handles"), 1);
    fed.stop();
}

/// Runs a send-messages and send-dispatched scenario on `factory`: the events that
/// came upstream, in order, with the socket and buffer identities left out.
fn network_scenario(factory: &str) -> Vec<(String, Vec<u8>)> {
    let mut fed = harness(
        factory,
        &[("send-messages", "true"), ("send-dispatched", "true")],
    );
    let net = NetworkEvents::watch(&fed);
    fed.set_src_caps(streamheader_caps(&[b"HEAD1", b"HEAD2"]));
    let (socket, mut peer) = socket_pair();
    add(&fed, &socket);
    fed.push_bytes(b"first", false);
    assert_eq!(read_exact(&peer, 15), b"HEAD1HEAD2first");
    net.wait(3);
    peer.write_all(b"request").unwrap();
    net.wait(4);
    fed.push_bytes(b"second", true);
    assert_eq!(read_exact(&peer, 6), b"second");
    let events = net.wait(5);
    fed.stop();
    assert!(events.iter().all(|e| e.socket == id(&socket)));
    events.into_iter().map(|e| (e.name, e.bytes)).collect()
}

#[test]
fn network_events_as_the_c_multisocketsink() {
    init();
    let ours = network_scenario(SINK);
    let theirs = network_scenario("multisocketsink");
    assert_eq!(ours, theirs);
    assert_eq!(
        ours[3],
        ("GstNetworkMessage".to_string(), b"request".to_vec())
    );
}

/// A socket closed before `add` is removed as an error (C: closed; README,
/// "Differs from C"), and harms nobody.
#[test]
fn closed_socket_is_removed_as_an_error() {
    let mut fed = harness(SINK, &[]);
    fed.set_src_caps_str(CHECK_CAPS);
    let rec = Recorder::attach(&fed.sink());
    let (client, peer) = socket_pair();
    add(&fed, &client);
    let (closed, _closed_peer) = socket_pair();
    closed.close().unwrap();
    add(&fed, &closed);
    let events = rec.wait_socket_removed(&closed);
    assert_eq!(
        events[1..],
        [
            Ev::Added(id(&closed)),
            Ev::Removed(id(&closed), "error".into(), Some(0)),
            Ev::SocketRemoved(id(&closed), 0)
        ]
    );
    wait_released(&closed);
    fed.push_bytes(b"fine", false);
    assert_eq!(read_exact(&peer, 4), b"fine");
    fed.stop();
}
