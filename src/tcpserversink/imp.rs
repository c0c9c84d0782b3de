// SPDX-License-Identifier: MPL-2.0

//! GObject glue of `rstcpserversink`: the listening and HTTP properties, and the
//! base class's virtual methods that start and stop the server inside the engine's
//! IO thread and close the sockets it accepted.

use std::os::fd::RawFd;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use gst::glib;
use gst::prelude::*;
use gst::subclass::prelude::*;
use gst_base::subclass::prelude::*;

use crate::multifdsink::{RsMultiFdSink, RsMultiFdSinkImpl};
use crate::multihandlesink::{
    RsMultiHandleSinkExt, RsMultiHandleSinkImpl, RsMultiHandleSinkImplExt, sink_metadata,
};
use crate::server::{self, AcceptedSockets, Server, ServerConfig};

static CAT: LazyLock<gst::DebugCategory> = LazyLock::new(|| {
    gst::DebugCategory::new(
        "rstcpserversink",
        gst::DebugColorFlags::empty(),
        Some("Rust TCP/HTTP server sink"),
    )
});

const DEFAULT_HOST: &str = "localhost";
const DEFAULT_PORT: i32 = 4953;
const DEFAULT_BACKLOG: i32 = server::DEFAULT_BACKLOG;
const DEFAULT_HTTP: bool = false;
const DEFAULT_HEADER_TIMEOUT: u64 = server::DEFAULT_HEADER_TIMEOUT.as_nanos() as u64;

/// Where and how to listen: read when the element starts (NULL→READY).
#[derive(Debug, Clone)]
struct ListenSettings {
    host: String,
    port: i32,
    backlog: i32,
}

impl Default for ListenSettings {
    fn default() -> Self {
        ListenSettings {
            host: DEFAULT_HOST.into(),
            port: DEFAULT_PORT,
            backlog: DEFAULT_BACKLOG,
        }
    }
}

#[derive(Default)]
pub struct RsTcpServerSink {
    listen: Mutex<ListenSettings>,
    current_port: Mutex<i32>,
    /// The HTTP settings, shared with the running server: changes apply to the next
    /// request.
    server_config: Arc<Mutex<ServerConfig>>,
    /// Sockets accepted by us, closed once the engine forgot them.
    owned: AcceptedSockets,
}

impl RsTcpServerSink {
    fn listen(&self) -> Result<(), gst::ErrorMessage> {
        let ListenSettings {
            host,
            port,
            backlog,
        } = self.listen.lock().unwrap().clone();
        let listeners = server::bind_listeners(&host, port as u16, backlog).map_err(|e| {
            gst::error_msg!(
                gst::ResourceError::OpenRead,
                ["cannot listen on {}:{}: {}", host, port, e]
            )
        })?;
        let addrs: Vec<_> = listeners
            .iter()
            .filter_map(|l| l.local_addr().ok())
            .collect();
        let bound = addrs.first().map_or(0, |a| a.port());
        *self.current_port.lock().unwrap() = i32::from(bound);
        gst::info!(
            CAT,
            imp = self,
            "listening on {addrs:?} (backlog {backlog})"
        );
        let srv = Server::new(listeners, self.server_config.clone(), self.owned.clone());
        self.obj().set_service(Some(Box::new(srv))).map_err(|e| {
            gst::error_msg!(
                gst::ResourceError::OpenRead,
                ["cannot watch the listening socket: {}", e]
            )
        })?;
        self.obj().notify("current-port");
        Ok(())
    }
}

impl RsTcpServerSink {
    /// `host`, `port`, `listen-backlog`: stored in NULL; in READY the server listens
    /// again at once; refused (with a warning) while PAUSED or PLAYING, where clients
    /// are being served.
    fn set_listen_property(&self, name: &str, value: &glib::Value) {
        let state = self.obj().highest_state();
        if matches!(state, gst::State::Paused | gst::State::Playing) {
            gst::warning!(
                CAT,
                imp = self,
                "{name} can change only in NULL or READY; not changed"
            );
            return;
        }
        {
            let mut listen = self.listen.lock().unwrap();
            match name {
                "host" => {
                    listen.host = value
                        .get::<Option<String>>()
                        .unwrap()
                        .unwrap_or_else(|| DEFAULT_HOST.into())
                }
                "port" => listen.port = value.get().unwrap(),
                _ => listen.backlog = value.get().unwrap(),
            }
        }
        if state == gst::State::Ready {
            let _ = self.obj().set_service(None);
            if let Err(msg) = self.listen() {
                self.post_error_message(msg);
            }
        }
    }
}

#[glib::object_subclass]
impl ObjectSubclass for RsTcpServerSink {
    const NAME: &'static str = "GstRsTcpServerSink";
    type Type = super::RsTcpServerSink;
    type ParentType = RsMultiFdSink;
}

impl ObjectImpl for RsTcpServerSink {
    fn properties() -> &'static [glib::ParamSpec] {
        static PROPERTIES: LazyLock<Vec<glib::ParamSpec>> = LazyLock::new(|| {
            vec![
                glib::ParamSpecString::builder("host")
                    .nick("host")
                    .blurb("The host/IP to listen on")
                    .default_value(Some(DEFAULT_HOST))
                    .mutable_ready()
                    .build(),
                glib::ParamSpecInt::builder("port")
                    .nick("port")
                    .blurb("The port to listen to (0=random available port)")
                    .minimum(0)
                    .maximum(65535)
                    .default_value(DEFAULT_PORT)
                    .mutable_ready()
                    .build(),
                glib::ParamSpecInt::builder("current-port")
                    .nick("current-port")
                    .blurb("The port number the socket is currently bound to")
                    .minimum(0)
                    .maximum(65535)
                    .default_value(0)
                    .read_only()
                    .build(),
                glib::ParamSpecInt::builder("listen-backlog")
                    .nick("Listen backlog")
                    .blurb("Connections the kernel queues before they are accepted")
                    .minimum(1)
                    .maximum(65535)
                    .default_value(DEFAULT_BACKLOG)
                    .mutable_ready()
                    .build(),
                glib::ParamSpecBoolean::builder("http")
                    .nick("HTTP")
                    .blurb("Read an HTTP request from each client and answer with HTTP headers before the stream")
                    .default_value(DEFAULT_HTTP)
                    .build(),
                glib::ParamSpecString::builder("mount")
                    .nick("Mount path")
                    .blurb("In HTTP mode, the only path served (404 for others); unset serves every path")
                    .build(),
                glib::ParamSpecUInt::builder("max-clients")
                    .nick("Max clients")
                    .blurb("In HTTP mode, answer 503 beyond this many clients (0 = no limit)")
                    .default_value(server::DEFAULT_MAX_CLIENTS)
                    .build(),
                glib::ParamSpecUInt64::builder("header-timeout")
                    .nick("Header timeout")
                    .blurb("In HTTP mode, nanoseconds a client has to send its request head")
                    .minimum(1_000_000)
                    .default_value(DEFAULT_HEADER_TIMEOUT)
                    .build(),
                glib::ParamSpecUInt::builder("max-header-size")
                    .nick("Max header size")
                    .blurb("In HTTP mode, the largest request head accepted, in bytes")
                    .minimum(64)
                    .maximum(1 << 20)
                    .default_value(server::DEFAULT_MAX_HEADER_SIZE)
                    .build(),
            ]
        });
        PROPERTIES.as_ref()
    }

    fn set_property(&self, _id: usize, value: &glib::Value, pspec: &glib::ParamSpec) {
        gst::debug!(CAT, imp = self, "set {} to {:?}", pspec.name(), value);
        if matches!(pspec.name(), "host" | "port" | "listen-backlog") {
            self.set_listen_property(pspec.name(), value);
            return;
        }
        let mut http = self.server_config.lock().unwrap();
        match pspec.name() {
            "http" => http.http = value.get().unwrap(),
            "mount" => {
                http.mount = value
                    .get::<Option<String>>()
                    .unwrap()
                    .filter(|m| !m.is_empty())
            }
            "max-clients" => http.max_clients = value.get().unwrap(),
            "header-timeout" => {
                http.header_timeout = Duration::from_nanos(value.get().unwrap());
            }
            "max-header-size" => {
                http.max_header_size = value.get::<u32>().unwrap() as usize;
            }
            name => unimplemented!("property {name}"),
        }
    }

    fn property(&self, _id: usize, pspec: &glib::ParamSpec) -> glib::Value {
        let listen = self.listen.lock().unwrap();
        let http = self.server_config.lock().unwrap();
        match pspec.name() {
            "host" => listen.host.to_value(),
            "port" => listen.port.to_value(),
            "current-port" => self.current_port.lock().unwrap().to_value(),
            "listen-backlog" => listen.backlog.to_value(),
            "http" => http.http.to_value(),
            "mount" => http.mount.to_value(),
            "max-clients" => http.max_clients.to_value(),
            "header-timeout" => (http.header_timeout.as_nanos() as u64).to_value(),
            "max-header-size" => (http.max_header_size as u32).to_value(),
            name => unimplemented!("property {name}"),
        }
    }
}

impl GstObjectImpl for RsTcpServerSink {}

impl ElementImpl for RsTcpServerSink {
    fn metadata() -> Option<&'static gst::subclass::ElementMetadata> {
        static METADATA: LazyLock<gst::subclass::ElementMetadata> = LazyLock::new(|| {
            sink_metadata(
                "TCP server sink (Rust)",
                "Send data as a server over the network via TCP, optionally as HTTP",
            )
        });
        Some(&*METADATA)
    }
}

impl BaseSinkImpl for RsTcpServerSink {
    fn set_caps(&self, caps: &gst::Caps) -> Result<(), gst::LoggableError> {
        let content_type = super::content_type(caps);
        gst::debug!(CAT, imp = self, "serving {caps} as {content_type}");
        self.server_config.lock().unwrap().content_type = Some(content_type);
        let result = self.parent_set_caps(caps);
        // Requests that arrived before the caps are answered now.
        self.obj().wake_service();
        result
    }
}

impl RsMultiHandleSinkImpl for RsTcpServerSink {
    fn client_fd_removed(&self, fd: RawFd) {
        self.parent_client_fd_removed(fd);
        // Our own accepted sockets are closed here; fds the app added are not.
        if server::release(&self.owned, fd) {
            gst::debug!(CAT, imp = self, "closed accepted socket fd {fd}");
        }
    }

    fn start_serving(&self) -> Result<(), gst::ErrorMessage> {
        self.parent_start_serving()?;
        self.listen()
    }

    fn stop_serving(&self) {
        // The listening socket and connections still sending a request go first.
        if let Err(e) = self.obj().set_service(None) {
            gst::warning!(CAT, imp = self, "cannot stop listening: {e}");
        }
        *self.current_port.lock().unwrap() = 0;
        self.parent_stop_serving();
    }
}

impl RsMultiFdSinkImpl for RsTcpServerSink {}
