//! GObject glue of `rstcpserversink`: the listening properties and the start and
//! stop of the server inside the engine's IO thread.

use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use gst::glib;
use gst::prelude::*;
use gst::subclass::prelude::*;
use gst_base::subclass::prelude::*;

use crate::multifdsink::{RsMultiFdSink, RsMultiFdSinkImpl};
use crate::server::{self, AcceptedSockets, DEFAULT_BACKLOG, Server, ServerConfig};

static CAT: LazyLock<gst::DebugCategory> = LazyLock::new(|| {
    gst::DebugCategory::new(
        "rstcpserversink",
        gst::DebugColorFlags::empty(),
        Some("Rust TCP/HTTP server sink"),
    )
});

const DEFAULT_HOST: &str = "localhost";
const DEFAULT_PORT: i32 = 4953;

#[derive(Debug, Clone)]
struct Settings {
    host: String,
    port: i32,
    backlog: i32,
    http: bool,
    mount: Option<String>,
    max_clients: u32,
    header_timeout: u64,
    max_header_size: u32,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            host: DEFAULT_HOST.into(),
            port: DEFAULT_PORT,
            backlog: DEFAULT_BACKLOG,
            http: false,
            mount: None,
            max_clients: 0,
            header_timeout: 10_000_000_000,
            max_header_size: 8192,
        }
    }
}

#[derive(Default)]
pub struct RsTcpServerSink {
    settings: Mutex<Settings>,
    current_port: Mutex<i32>,
    /// Shared with the running server: changes apply to the next request.
    server_config: Arc<Mutex<ServerConfig>>,
    /// Sockets accepted by us, closed once the engine forgot them.
    owned: AcceptedSockets,
}

impl RsTcpServerSink {
    /// Runs `f` with the `rsmultifdsink` part of this element.
    fn with_base<R>(&self, f: impl FnOnce(&crate::multifdsink::imp::RsMultiFdSink) -> R) -> R {
        let obj = self.obj();
        f(obj.upcast_ref::<RsMultiFdSink>().imp())
    }

    fn sync_server_config(&self) {
        let s = self.settings.lock().unwrap();
        let mut c = self.server_config.lock().unwrap();
        c.http = s.http;
        c.mount = s.mount.clone().filter(|m| !m.is_empty());
        c.max_clients = s.max_clients;
        c.header_timeout = Duration::from_nanos(s.header_timeout);
        c.max_header_size = s.max_header_size as usize;
    }

    fn start_server(&self) -> Result<(), gst::ErrorMessage> {
        let (host, port, backlog) = {
            let s = self.settings.lock().unwrap();
            (s.host.clone(), s.port, s.backlog)
        };
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
        self.sync_server_config();
        let srv = Server::new(listeners, self.server_config.clone(), self.owned.clone());
        self.with_base(|base| base.engine().set_service(Some(Box::new(srv))))
            .map_err(|e| {
                gst::error_msg!(
                    gst::ResourceError::OpenRead,
                    ["cannot watch the listening socket: {}", e]
                )
            })?;
        self.obj().notify("current-port");
        Ok(())
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
                    .build(),
                glib::ParamSpecInt::builder("port")
                    .nick("port")
                    .blurb("The port to listen to (0=random available port)")
                    .minimum(0)
                    .maximum(65535)
                    .default_value(DEFAULT_PORT)
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
                    .build(),
                glib::ParamSpecBoolean::builder("http")
                    .nick("HTTP")
                    .blurb("Read an HTTP request from each client and answer with HTTP headers before the stream")
                    .default_value(false)
                    .build(),
                glib::ParamSpecString::builder("mount")
                    .nick("Mount path")
                    .blurb("In HTTP mode, the only path served (404 for others); unset serves every path")
                    .build(),
                glib::ParamSpecUInt::builder("max-clients")
                    .nick("Max clients")
                    .blurb("In HTTP mode, answer 503 beyond this many clients (0 = no limit)")
                    .default_value(0)
                    .build(),
                glib::ParamSpecUInt64::builder("header-timeout")
                    .nick("Header timeout")
                    .blurb("In HTTP mode, nanoseconds a client has to send its request head")
                    .minimum(1_000_000)
                    .default_value(10_000_000_000)
                    .build(),
                glib::ParamSpecUInt::builder("max-header-size")
                    .nick("Max header size")
                    .blurb("In HTTP mode, the largest request head accepted, in bytes")
                    .minimum(64)
                    .maximum(1 << 20)
                    .default_value(8192)
                    .build(),
            ]
        });
        PROPERTIES.as_ref()
    }

    fn set_property(&self, _id: usize, value: &glib::Value, pspec: &glib::ParamSpec) {
        let mut s = self.settings.lock().unwrap();
        match pspec.name() {
            "host" => {
                s.host = value
                    .get::<Option<String>>()
                    .unwrap()
                    .unwrap_or_else(|| DEFAULT_HOST.into())
            }
            "port" => s.port = value.get().unwrap(),
            "listen-backlog" => s.backlog = value.get().unwrap(),
            "http" => s.http = value.get().unwrap(),
            "mount" => s.mount = value.get().unwrap(),
            "max-clients" => s.max_clients = value.get().unwrap(),
            "header-timeout" => s.header_timeout = value.get().unwrap(),
            "max-header-size" => s.max_header_size = value.get().unwrap(),
            name => unimplemented!("property {name}"),
        }
        gst::debug!(CAT, imp = self, "set {} to {:?}", pspec.name(), value);
        drop(s);
        self.sync_server_config();
    }

    fn property(&self, _id: usize, pspec: &glib::ParamSpec) -> glib::Value {
        let s = self.settings.lock().unwrap();
        match pspec.name() {
            "host" => s.host.to_value(),
            "port" => s.port.to_value(),
            "current-port" => self.current_port.lock().unwrap().to_value(),
            "listen-backlog" => s.backlog.to_value(),
            "http" => s.http.to_value(),
            "mount" => s.mount.to_value(),
            "max-clients" => s.max_clients.to_value(),
            "header-timeout" => s.header_timeout.to_value(),
            "max-header-size" => s.max_header_size.to_value(),
            name => unimplemented!("property {name}"),
        }
    }

    fn constructed(&self) {
        self.parent_constructed();
        let owned = self.owned.clone();
        self.with_base(|base| {
            let _ = base.fd_removed_hook.set(Box::new(move |fd| {
                // Our own accepted sockets are closed here; fds the app added are not.
                server::release(&owned, fd);
            }));
        });
    }
}

impl GstObjectImpl for RsTcpServerSink {}

impl ElementImpl for RsTcpServerSink {
    fn metadata() -> Option<&'static gst::subclass::ElementMetadata> {
        static METADATA: LazyLock<gst::subclass::ElementMetadata> = LazyLock::new(|| {
            gst::subclass::ElementMetadata::new(
                "TCP server sink (Rust)",
                "Sink/Network",
                "Send data as a server over the network via TCP, optionally as HTTP",
                "The rsmultifdsink authors",
            )
        });
        Some(&*METADATA)
    }

    fn change_state(
        &self,
        transition: gst::StateChange,
    ) -> Result<gst::StateChangeSuccess, gst::StateChangeError> {
        let result = self.parent_change_state(transition)?;
        if transition == gst::StateChange::NullToReady {
            if let Err(msg) = self.start_server() {
                self.post_error_message(msg);
                // Undo the base's start; clients cannot have been added yet.
                let _ = self.parent_change_state(gst::StateChange::ReadyToNull);
                return Err(gst::StateChangeError);
            }
        } else if transition == gst::StateChange::ReadyToNull {
            *self.current_port.lock().unwrap() = 0;
        }
        Ok(result)
    }
}

impl BaseSinkImpl for RsTcpServerSink {
    fn set_caps(&self, caps: &gst::Caps) -> Result<(), gst::LoggableError> {
        let content_type = super::content_type(caps);
        gst::debug!(CAT, imp = self, "serving {caps} as {content_type}");
        self.server_config.lock().unwrap().content_type = Some(content_type);
        let result = self.parent_set_caps(caps);
        // Requests that arrived before the caps are answered now.
        self.with_base(|base| base.engine().wake());
        result
    }
}

impl RsMultiFdSinkImpl for RsTcpServerSink {}
