// SPDX-License-Identifier: MPL-2.0

//! GObject glue of `rsmultifdsink`: the fd-typed action signals and `client-*`
//! signals, and `handle-read`. Everything else is the base class's.

use std::os::fd::RawFd;
use std::sync::LazyLock;

use gst::glib;
use gst::prelude::*;
use gst::subclass::prelude::*;
use gst_base::subclass::prelude::*;

use super::ClientStatus;
use crate::multihandlesink::{
    RsMultiHandleSinkExt, RsMultiHandleSinkImpl, RsMultiHandleSinkImplExt, client_action_signals,
    client_signals, sink_metadata,
};

static CAT: LazyLock<gst::DebugCategory> = LazyLock::new(|| {
    gst::DebugCategory::new(
        "rsmultifdsink",
        gst::DebugColorFlags::empty(),
        Some("Rust multi filedescriptor sink"),
    )
});

const DEFAULT_HANDLE_READ: bool = true;

#[derive(Default)]
pub struct RsMultiFdSink;

#[glib::object_subclass]
impl ObjectSubclass for RsMultiFdSink {
    const NAME: &'static str = "GstRsMultiFdSink";
    type Type = super::RsMultiFdSink;
    type ParentType = crate::multihandlesink::RsMultiHandleSink;
}

/// The fd an action signal names: it is the handle itself.
fn fd_argument(_element: &glib::Object, value: &glib::Value) -> Option<RawFd> {
    value.get::<i32>().ok()
}

impl ObjectImpl for RsMultiFdSink {
    fn properties() -> &'static [glib::ParamSpec] {
        static PROPERTIES: LazyLock<Vec<glib::ParamSpec>> = LazyLock::new(|| {
            vec![
                glib::ParamSpecBoolean::builder("handle-read")
                    .nick("Handle Read")
                    .blurb("Handle client reads and discard the data")
                    .default_value(DEFAULT_HANDLE_READ)
                    .build(),
            ]
        });
        PROPERTIES.as_ref()
    }

    fn signals() -> &'static [glib::subclass::Signal] {
        static SIGNALS: LazyLock<Vec<glib::subclass::Signal>> = LazyLock::new(|| {
            let fd = i32::static_type();
            let mut signals = client_action_signals(fd, fd_argument, fd_argument);
            signals.extend(client_signals(fd, fd, "client-fd-removed"));
            signals
        });
        SIGNALS.as_ref()
    }

    fn set_property(&self, _id: usize, value: &glib::Value, pspec: &glib::ParamSpec) {
        match pspec.name() {
            "handle-read" => self.obj().set_handle_read(value.get().unwrap()),
            name => unimplemented!("property {name}"),
        }
        gst::debug!(CAT, imp = self, "set {} to {:?}", pspec.name(), value);
    }

    fn property(&self, _id: usize, pspec: &glib::ParamSpec) -> glib::Value {
        match pspec.name() {
            "handle-read" => self.obj().handle_read().to_value(),
            name => unimplemented!("property {name}"),
        }
    }
}

impl GstObjectImpl for RsMultiFdSink {}

impl ElementImpl for RsMultiFdSink {
    fn metadata() -> Option<&'static gst::subclass::ElementMetadata> {
        static METADATA: LazyLock<gst::subclass::ElementMetadata> = LazyLock::new(|| {
            sink_metadata(
                "Multi filedescriptor sink (Rust)",
                "Send data to multiple filedescriptors",
            )
        });
        Some(&*METADATA)
    }
}

impl BaseSinkImpl for RsMultiFdSink {}

impl RsMultiHandleSinkImpl for RsMultiFdSink {
    fn client_added(&self, fd: RawFd) {
        self.obj().emit_by_name::<()>("client-added", &[&fd]);
        self.parent_client_added(fd);
    }

    fn client_removed(&self, fd: RawFd, status: ClientStatus) {
        self.obj()
            .emit_by_name::<()>("client-removed", &[&fd, &status]);
        self.parent_client_removed(fd, status);
    }

    fn client_fd_removed(&self, fd: RawFd) {
        self.obj().emit_by_name::<()>("client-fd-removed", &[&fd]);
        self.parent_client_fd_removed(fd);
    }
}

impl super::RsMultiFdSinkImpl for RsMultiFdSink {}
