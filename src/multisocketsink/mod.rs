// SPDX-License-Identifier: MPL-2.0

//! `rsmultisocketsink`: sends one stream to many `GSocket`s, a drop-in for
//! GStreamer's `multisocketsink` with the same properties, signals and behaviour,
//! over the same engine as `rsmultifdsink`.
//!
//! The application accepts connections itself (a `GSocketService`, or sockets from
//! any other source wrapped in a `GSocket`), writes whatever its protocol needs
//! first, then hands each socket over with `add`. It owns the socket: the element
//! keeps a reference while the socket is a client, drops it after
//! `client-socket-removed`, and never closes it.
//!
//! With `send-messages`, what a client sends arrives upstream as a custom
//! `GstNetworkMessage` event; with `send-dispatched`, every buffer written whole to a
//! client is announced upstream by a `GstNetworkMessageDispatched` event.
//!
//! ## Example pipeline
//! ```sh
//! gst-launch-1.0 videotestsrc is-live=true ! theoraenc ! oggmux ! rsmultisocketsink name=sink
//! ```
//! (clients come from the application: `g_signal_emit_by_name (sink, "add", socket)`)

use gst::glib;
use gst::prelude::*;

use crate::multihandlesink::RsMultiHandleSink;

mod imp;

glib::wrapper! {
    pub struct RsMultiSocketSink(ObjectSubclass<imp::RsMultiSocketSink>)
        @extends RsMultiHandleSink, gst_base::BaseSink, gst::Element, gst::Object;
}

pub fn register(plugin: &gst::Plugin) -> Result<(), glib::BoolError> {
    gst::Element::register(
        Some(plugin),
        "rsmultisocketsink",
        gst::Rank::NONE,
        RsMultiSocketSink::static_type(),
    )
}
