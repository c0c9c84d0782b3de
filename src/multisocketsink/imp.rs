// SPDX-License-Identifier: MPL-2.0

//! GObject glue of `rsmultisocketsink`: `GSocket`-typed action and `client-*`
//! signals over the base class's fd clients, and `send-messages`/`send-dispatched`,
//! which turn what clients send and what was sent to them into upstream events.
//!
//! The base class and the engine know a client by its fd. This element keeps the
//! `GSocket` of every client (a reference, so the fd stays open and the number is
//! not reused while the engine knows it) and turns fds back into sockets for the
//! signals it emits.

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{LazyLock, Mutex};

use gio::prelude::*;
use gst::glib;
use gst::glib::translate::UnsafeFrom;
use gst::prelude::*;
use gst::subclass::prelude::*;
use gst_base::subclass::prelude::*;

use crate::multihandlesink::{
    ClientStatus, RsMultiHandleSinkExt, RsMultiHandleSinkImpl, RsMultiHandleSinkImplExt,
    client_action_signals, client_signals, sink_metadata,
};

static CAT: LazyLock<gst::DebugCategory> = LazyLock::new(|| {
    gst::DebugCategory::new(
        "rsmultisocketsink",
        gst::DebugColorFlags::empty(),
        Some("Rust multi socket sink"),
    )
});

const DEFAULT_SEND_DISPATCHED: bool = false;
const DEFAULT_SEND_MESSAGES: bool = false;

thread_local! {
    /// The socket an `add`/`add-full` on this thread is adding, from the moment its
    /// fd is handed to the base class until the base class reports the outcome
    /// (`client_added`, or `client_removed` with `duplicate`), both inside the
    /// adding call. Weak: a refused add (in NULL, bad burst limits) reports nothing,
    /// and must not keep the application's socket open.
    static ADDING: RefCell<Option<(RawFd, glib::WeakRef<gio::Socket>)>> =
        const { RefCell::new(None) };
}

/// The socket being added on this thread as `fd`, if any.
fn take_adding(fd: RawFd) -> Option<gio::Socket> {
    ADDING
        .take()
        .filter(|(adding, _)| *adding == fd)
        .and_then(|(_, socket)| socket.upgrade())
}

/// A client's socket, kept by the element whatever thread reports on the client.
/// gio-rs leaves `GSocket` without `Send` because its IO is not meant to be shared
/// between threads; the element does no IO on it (the engine writes the fd), it
/// only compares it, takes and drops references (atomic in GObject) and hands it to
/// signal handlers, as the C element does from its own thread.
#[derive(PartialEq)]
struct HeldSocket(gio::Socket);

// SAFETY: see above; no method of the socket that touches its state is called
// through a `HeldSocket`.
unsafe impl Send for HeldSocket {}
unsafe impl Sync for HeldSocket {}

#[derive(Default)]
pub struct RsMultiSocketSink {
    /// The sockets of the clients the engine knows, by fd. More than one only while
    /// a socket whose client is being removed is added again: the oldest is the one
    /// the next removal signals name.
    sockets: Mutex<HashMap<RawFd, VecDeque<HeldSocket>>>,
    send_dispatched: Mutex<bool>,
    send_messages: Mutex<bool>,
}

/// The custom upstream event of C multisocketsink: `name` with the client's socket
/// (typed `GObject`, as C) and a buffer.
fn network_event(name: &str, socket: gio::Socket, buffer: gst::Buffer) -> gst::Event {
    let object = socket.upcast::<glib::Object>().to_value();
    // SAFETY: as for `HeldSocket`: whoever reads the event gets a reference to the
    // socket, which may be taken and dropped on any thread.
    let object = unsafe { glib::SendValue::unsafe_from(object.into_raw()) };
    let mut structure = gst::Structure::new_empty(name);
    structure.set_value("object", object);
    structure.set("buffer", buffer);
    gst::event::CustomUpstream::new(structure)
}

impl RsMultiSocketSink {
    /// The socket of the oldest client with `fd`.
    fn socket_of(&self, fd: RawFd) -> Option<gio::Socket> {
        let sockets = self.sockets.lock().unwrap();
        sockets
            .get(&fd)
            .and_then(|s| s.front())
            .map(|s| s.0.clone())
    }

    /// Pushes `name` upstream for the client `fd`, if it is still a client.
    fn push_network_event(&self, name: &str, fd: RawFd, buffer: gst::Buffer) {
        let Some(socket) = self.socket_of(fd) else {
            return;
        };
        let event = network_event(name, socket, buffer);
        let handled = self
            .obj()
            .static_pad("sink")
            .is_some_and(|pad| pad.push_event(event));
        gst::log!(
            CAT,
            imp = self,
            "client fd {fd}: {name} (handled: {handled})"
        );
    }
}

#[glib::object_subclass]
impl ObjectSubclass for RsMultiSocketSink {
    const NAME: &'static str = "GstRsMultiSocketSink";
    type Type = super::RsMultiSocketSink;
    type ParentType = crate::multihandlesink::RsMultiHandleSink;
}

/// The fd of the socket `add`/`add-full` names; the socket waits in `ADDING` for
/// the base class's answer.
fn socket_to_add(_element: &glib::Object, value: &glib::Value) -> Option<RawFd> {
    let socket = value.get::<gio::Socket>().ok()?;
    let fd = socket.as_raw_fd();
    ADDING.set(Some((fd, socket.downgrade())));
    Some(fd)
}

/// The fd of a client's socket, when the socket is a client of `element`.
fn client_socket(element: &glib::Object, value: &glib::Value) -> Option<RawFd> {
    let socket = value.get::<gio::Socket>().ok()?;
    let fd = socket.as_raw_fd();
    let element = element.downcast_ref::<super::RsMultiSocketSink>()?;
    let sockets = element.imp().sockets.lock().unwrap();
    sockets
        .get(&fd)?
        .contains(&HeldSocket(socket))
        .then_some(fd)
}

impl ObjectImpl for RsMultiSocketSink {
    fn properties() -> &'static [glib::ParamSpec] {
        static PROPERTIES: LazyLock<Vec<glib::ParamSpec>> = LazyLock::new(|| {
            vec![
                glib::ParamSpecBoolean::builder("send-dispatched")
                    .nick("Send Dispatched")
                    .blurb("If GstNetworkMessageDispatched events should be pushed")
                    .default_value(DEFAULT_SEND_DISPATCHED)
                    .build(),
                glib::ParamSpecBoolean::builder("send-messages")
                    .nick("Send Messages")
                    .blurb("If GstNetworkMessage events should be pushed")
                    .default_value(DEFAULT_SEND_MESSAGES)
                    .build(),
            ]
        });
        PROPERTIES.as_ref()
    }

    fn signals() -> &'static [glib::subclass::Signal] {
        static SIGNALS: LazyLock<Vec<glib::subclass::Signal>> = LazyLock::new(|| {
            let socket = gio::Socket::static_type();
            let mut signals = client_action_signals(socket, socket_to_add, client_socket);
            // client-added has a GObject, not a GSocket, as in the C element.
            signals.extend(client_signals(
                glib::Object::static_type(),
                socket,
                "client-socket-removed",
            ));
            signals
        });
        SIGNALS.as_ref()
    }

    fn set_property(&self, _id: usize, value: &glib::Value, pspec: &glib::ParamSpec) {
        match pspec.name() {
            "send-dispatched" => {
                let on = value.get().unwrap();
                *self.send_dispatched.lock().unwrap() = on;
                self.obj().set_report_sent_buffers(on);
            }
            "send-messages" => {
                let on = value.get().unwrap();
                *self.send_messages.lock().unwrap() = on;
                self.obj().set_keep_client_input(on);
            }
            name => unimplemented!("property {name}"),
        }
        gst::debug!(CAT, imp = self, "set {} to {:?}", pspec.name(), value);
    }

    fn property(&self, _id: usize, pspec: &glib::ParamSpec) -> glib::Value {
        match pspec.name() {
            "send-dispatched" => self.send_dispatched.lock().unwrap().to_value(),
            "send-messages" => self.send_messages.lock().unwrap().to_value(),
            name => unimplemented!("property {name}"),
        }
    }
}

impl GstObjectImpl for RsMultiSocketSink {}

impl ElementImpl for RsMultiSocketSink {
    fn metadata() -> Option<&'static gst::subclass::ElementMetadata> {
        static METADATA: LazyLock<gst::subclass::ElementMetadata> = LazyLock::new(|| {
            sink_metadata("Multi socket sink (Rust)", "Send data to multiple sockets")
        });
        Some(&*METADATA)
    }
}

impl BaseSinkImpl for RsMultiSocketSink {}

impl RsMultiHandleSinkImpl for RsMultiSocketSink {
    fn client_added(&self, fd: RawFd) {
        let socket = take_adding(fd);
        match &socket {
            Some(socket) => {
                // As C does: the socket's own calls no longer block either.
                socket.set_blocking(false);
                let mut sockets = self.sockets.lock().unwrap();
                sockets
                    .entry(fd)
                    .or_default()
                    .push_back(HeldSocket(socket.clone()));
                gst::debug!(CAT, imp = self, "client socket {socket:?} (fd {fd}) added");
            }
            // Added through the base class's `add_client`, not the `add` signal.
            None => gst::warning!(CAT, imp = self, "client fd {fd} added without a socket"),
        }
        let object = socket.map(|s| s.upcast::<glib::Object>());
        self.obj().emit_by_name::<()>("client-added", &[&object]);
        self.parent_client_added(fd);
    }

    fn client_removed(&self, fd: RawFd, status: ClientStatus) {
        // A duplicate names the socket of the refused add, which is not a client.
        let socket = match status {
            ClientStatus::Duplicate => take_adding(fd),
            _ => None,
        }
        .or_else(|| self.socket_of(fd));
        gst::debug!(
            CAT,
            imp = self,
            "client socket {socket:?} (fd {fd}) removed: {status:?}"
        );
        self.obj()
            .emit_by_name::<()>("client-removed", &[&socket, &status]);
        self.parent_client_removed(fd, status);
    }

    fn client_fd_removed(&self, fd: RawFd) {
        let socket = {
            let mut sockets = self.sockets.lock().unwrap();
            let socket = sockets.get_mut(&fd).and_then(VecDeque::pop_front);
            if sockets.get(&fd).is_some_and(VecDeque::is_empty) {
                sockets.remove(&fd);
            }
            socket.map(|s| s.0)
        };
        self.obj()
            .emit_by_name::<()>("client-socket-removed", &[&socket]);
        self.parent_client_fd_removed(fd);
        // Our reference goes here; the socket stays open as long as the application
        // holds one.
        drop(socket);
    }

    fn client_input(&self, fd: RawFd, data: gst::Buffer) {
        self.push_network_event("GstNetworkMessage", fd, data.clone());
        self.parent_client_input(fd, data);
    }

    fn buffer_sent(&self, fd: RawFd, buffer: gst::Buffer) {
        self.push_network_event("GstNetworkMessageDispatched", fd, buffer.clone());
        self.parent_buffer_sent(fd, buffer);
    }
}
