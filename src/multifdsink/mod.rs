// SPDX-License-Identifier: MPL-2.0

//! `rsmultifdsink`: sends one stream to many file descriptors, a drop-in for
//! GStreamer's `multifdsink` with the same properties, signals and behaviour.
//!
//! The application accepts connections (or opens files, pipes) itself, writes
//! whatever headers its protocol needs, then hands each fd over with `add`. It owns
//! the fd: the element never closes it, and `client-fd-removed` says when it may.
//!
//! ## Example pipeline
//! ```sh
//! gst-launch-1.0 videotestsrc is-live=true ! theoraenc ! oggmux ! rsmultifdsink name=sink
//! ```
//! (clients come from the application: `g_signal_emit_by_name (sink, "add", fd)`)

use gst::glib;
use gst::prelude::*;

use crate::multihandlesink::{RsMultiHandleSink, RsMultiHandleSinkImpl};

pub use crate::multihandlesink::{ClientStatus, RecoverPolicy, SyncMethod};

mod imp;

glib::wrapper! {
    pub struct RsMultiFdSink(ObjectSubclass<imp::RsMultiFdSink>)
        @extends RsMultiHandleSink, gst_base::BaseSink, gst::Element, gst::Object;
}

/// Subclasses of `rsmultifdsink` (`rstcpserversink`) inherit its fd signals and
/// `handle-read`; they override the base class's virtual methods.
pub trait RsMultiFdSinkImpl: RsMultiHandleSinkImpl {}

unsafe impl<T: RsMultiFdSinkImpl> glib::subclass::types::IsSubclassable<T> for RsMultiFdSink {}

pub fn register(plugin: &gst::Plugin) -> Result<(), glib::BoolError> {
    gst::Element::register(
        Some(plugin),
        "rsmultifdsink",
        gst::Rank::NONE,
        RsMultiFdSink::static_type(),
    )
}
