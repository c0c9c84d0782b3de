// SPDX-License-Identifier: MPL-2.0

//! GObject glue of `rstcpserversink`: the listening and HTTP properties, joining
//! the port's hub at NULL→READY and leaving it at READY→NULL, and what the element
//! keeps of the clients the hub handed it (their sockets, closed once the engine
//! forgot them; their requests, for the access log; their addresses, for the
//! per-address limit) and of the requests it answered (for the metrics).

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::sync::{Arc, LazyLock, Mutex, Once};
use std::time::Duration;

use gst::glib;
use gst::prelude::*;
use gst::subclass::prelude::*;
use gst_base::subclass::prelude::*;

use crate::access_log::{self, AccessEntry, AccessLog};
use crate::engine::LogLevel;
use crate::hub::{self, ClientInfo, Membership, MountTarget};
use crate::jwt::JwtVerifier;
use crate::metrics::MountFigures;
use crate::multifdsink::{RsMultiFdSink, RsMultiFdSinkImpl};
use crate::multihandlesink::{
    ClientStatus, RsMultiHandleSinkExt, RsMultiHandleSinkImpl, RsMultiHandleSinkImplExt,
    sink_metadata,
};
use crate::server::{self, PortSettings, ServerConfig};
use crate::tls;

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
    proxy_protocol: bool,
    max_pending: u32,
    access_log: Option<String>,
    /// `tls-certificate` and `tls-key`: PEM files, loaded at NULL→READY.
    tls_certificate: Option<String>,
    tls_key: Option<String>,
}

impl Default for ListenSettings {
    fn default() -> Self {
        ListenSettings {
            host: DEFAULT_HOST.into(),
            port: DEFAULT_PORT,
            backlog: DEFAULT_BACKLOG,
            proxy_protocol: false,
            max_pending: 0,
            access_log: None,
            tls_certificate: None,
            tls_key: None,
        }
    }
}

/// The statuses a client can be removed with, in `ClientStatus` order, by nick.
const STATUS_NICKS: [&str; 7] = [
    "ok",
    "closed",
    "removed",
    "slow",
    "error",
    "duplicate",
    "flushing",
];

/// A socket the hub accepted and handed to this element.
struct Accepted {
    /// Closed when dropped, once the engine forgot the fd.
    _socket: OwnedFd,
    info: ClientInfo,
}

/// What the element and its hub target share.
#[derive(Default)]
struct Served {
    clients: Mutex<Clients>,
    tallies: Mutex<Tallies>,
    access_log: Mutex<Option<Arc<AccessLog>>>,
}

#[derive(Default)]
struct Clients {
    by_fd: HashMap<RawFd, Accepted>,
    /// Clients by address (the client's, from a PROXY header if any).
    per_ip: HashMap<IpAddr, usize>,
}

/// Counted since the element was made (Prometheus counters).
#[derive(Default)]
struct Tallies {
    /// By `ClientStatus` value.
    removed: [u64; 7],
    /// By HTTP status code.
    refused: BTreeMap<u16, u64>,
}

impl Served {
    fn insert(&self, fd: RawFd, socket: OwnedFd, info: ClientInfo) {
        let mut c = self.clients.lock().unwrap();
        *c.per_ip.entry(info.address.ip()).or_default() += 1;
        c.by_fd.insert(
            fd,
            Accepted {
                _socket: socket,
                info,
            },
        );
    }

    /// Forgets (and so closes) an accepted socket; false for an fd the element
    /// did not accept (the application's).
    fn release(&self, fd: RawFd) -> bool {
        let removed = {
            let mut c = self.clients.lock().unwrap();
            let removed = c.by_fd.remove(&fd);
            if let Some(a) = &removed {
                let ip = a.info.address.ip();
                if let Some(n) = c.per_ip.get_mut(&ip) {
                    *n -= 1;
                    if *n == 0 {
                        c.per_ip.remove(&ip);
                    }
                }
            }
            removed
        };
        // Closed here, without the lock.
        removed.is_some()
    }

    fn access_log(&self) -> Option<Arc<AccessLog>> {
        self.access_log.lock().unwrap().clone()
    }
}

/// How the port's hub reaches this element.
struct Target {
    element: glib::WeakRef<super::RsTcpServerSink>,
    served: Arc<Served>,
    config: Arc<Mutex<ServerConfig>>,
}

impl MountTarget for Target {
    fn hand_over(&self, socket: OwnedFd, client: ClientInfo) -> bool {
        let Some(element) = self.element.upgrade() else {
            return false;
        };
        let fd = socket.as_raw_fd();
        // Ours before add: the engine may remove it (and we close it) at once.
        self.served.insert(fd, socket, client);
        if element.add_accepted_client(fd) {
            return true;
        }
        self.served.release(fd);
        false
    }

    fn client_count(&self) -> usize {
        self.element.upgrade().map_or(0, |e| e.client_count())
    }

    fn clients_from(&self, ip: IpAddr) -> usize {
        let c = self.served.clients.lock().unwrap();
        c.per_ip.get(&ip).copied().unwrap_or(0)
    }

    fn refusing_clients(&self) -> bool {
        self.element.upgrade().is_some_and(|e| e.refusing_clients())
    }

    fn figures(&self) -> MountFigures {
        let counters = self
            .element
            .upgrade()
            .map(|e| e.counters())
            .unwrap_or_default();
        let tallies = self.served.tallies.lock().unwrap();
        MountFigures {
            mount: self.config.lock().unwrap().mount_label(),
            clients: counters.num_handles,
            bytes_served: counters.bytes_served,
            clients_removed: STATUS_NICKS
                .iter()
                .zip(tallies.removed)
                .map(|(nick, n)| (*nick, n))
                .collect(),
            requests_refused: tallies.refused.iter().map(|(c, n)| (*c, *n)).collect(),
            buffers_queued: counters.buffers_queued,
            bytes_queued: counters.bytes_queued,
        }
    }

    fn answered(&self, entry: &AccessEntry<'_>, refused: bool) {
        if refused {
            *self
                .served
                .tallies
                .lock()
                .unwrap()
                .refused
                .entry(entry.status)
                .or_default() += 1;
        }
        if let Some(log) = self.served.access_log() {
            log.log(access_log::format_line(entry));
        }
    }

    fn log(&self, level: LogLevel, args: fmt::Arguments<'_>) {
        crate::multihandlesink::log_as(*CAT, &self.element, level, args);
    }
}

#[derive(Default)]
pub struct RsTcpServerSink {
    listen: Mutex<ListenSettings>,
    current_port: Mutex<i32>,
    /// The HTTP settings, shared with the port's hub: changes apply to the next
    /// request.
    server_config: Arc<Mutex<ServerConfig>>,
    served: Arc<Served>,
    /// Its place on the port while in READY or above.
    membership: Mutex<Option<Membership>>,
}

/// Asks every access log to reopen its file on SIGHUP (after logrotate), unless
/// the application handles SIGHUP itself: then its handler stays, and a log still
/// follows a rename within a second.
fn install_sighup_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};
        extern "C" fn on_sighup(_: nix::libc::c_int) {
            access_log::reopen_all();
        }
        let ours = SigAction::new(
            SigHandler::Handler(on_sighup),
            SaFlags::SA_RESTART,
            SigSet::empty(),
        );
        // SAFETY: the handler only increments an atomic (async-signal-safe).
        match unsafe { sigaction(Signal::SIGHUP, &ours) } {
            Ok(old) if matches!(old.handler(), SigHandler::SigDfl | SigHandler::SigIgn) => {
                gst::info!(CAT, "SIGHUP reopens the access logs");
            }
            Ok(old) => {
                // SAFETY: puts back the application's own disposition.
                let _ = unsafe { sigaction(Signal::SIGHUP, &old) };
                gst::info!(
                    CAT,
                    "the application handles SIGHUP: access logs reopen when renamed"
                );
            }
            Err(e) => gst::warning!(CAT, "cannot handle SIGHUP: {e}"),
        }
    });
}

impl RsTcpServerSink {
    fn listen(&self) -> Result<(), gst::ErrorMessage> {
        let ListenSettings {
            host,
            port,
            backlog,
            proxy_protocol,
            max_pending,
            tls_certificate,
            tls_key,
            ..
        } = self.listen.lock().unwrap().clone();
        let tls = self.load_tls(tls_certificate, tls_key)?;
        let https = tls.is_some();
        let settings = PortSettings {
            host,
            port: port as u16,
            backlog,
            proxy_protocol,
            max_pending,
            tls,
        };
        let target = Arc::new(Target {
            element: self.obj().downgrade(),
            served: self.served.clone(),
            config: self.server_config.clone(),
        });
        // HTTPS: a new hub wraps each connection with a TLS terminator of its own
        // (which logs as this element, the port's first).
        let log_target: Arc<dyn MountTarget> = target.clone();
        let tls_config = settings.tls.as_ref().map(|t| t.config.clone());
        let make_wrap = move || -> Result<Option<hub::Wrap>, String> {
            let Some(config) = tls_config else {
                return Ok(None);
            };
            let log: tls::LogFn = Arc::new(move |level, args| log_target.log(level, args));
            let terminator = tls::Terminator::new(config, log)
                .map_err(|e| format!("cannot start the TLS thread: {e}"))?;
            Ok(Some(Arc::new(move |tcp, already_read, deadline| {
                terminator.wrap(tcp, already_read, deadline)
            })))
        };
        let membership = hub::join(&settings, self.server_config.clone(), target, make_wrap)
            .map_err(|e| {
                let settings_error = matches!(e, hub::JoinError::Conflict(_));
                // The reason is the message itself: gst-launch-1.0 prints it as is.
                if settings_error {
                    gst::error_msg!(gst::ResourceError::Settings, ("{}", e))
                } else {
                    gst::error_msg!(gst::ResourceError::OpenRead, ("{}", e))
                }
            })?;
        *self.current_port.lock().unwrap() = i32::from(membership.port());
        gst::info!(
            CAT,
            imp = self,
            "listening on {:?} (backlog {backlog}{}{})",
            membership.addrs(),
            if proxy_protocol {
                ", PROXY protocol"
            } else {
                ""
            },
            if https { ", TLS" } else { "" }
        );
        *self.membership.lock().unwrap() = Some(membership);
        self.obj().notify("current-port");
        Ok(())
    }

    /// Reads `tls-certificate` and `tls-key`, if set: both or neither; a file that
    /// cannot be used fails READY with the reason.
    fn load_tls(
        &self,
        certificate: Option<String>,
        key: Option<String>,
    ) -> Result<Option<server::TlsSettings>, gst::ErrorMessage> {
        let (certificate, key) = match (certificate, key) {
            (None, None) => return Ok(None),
            (Some(c), Some(k)) => (c, k),
            (Some(_), None) => {
                return Err(gst::error_msg!(
                    gst::ResourceError::Settings,
                    ("tls-certificate is set but tls-key is not: HTTPS needs both")
                ));
            }
            (None, Some(_)) => {
                return Err(gst::error_msg!(
                    gst::ResourceError::Settings,
                    ("tls-key is set but tls-certificate is not: HTTPS needs both")
                ));
            }
        };
        let config = tls::load_server_config(Path::new(&certificate), Path::new(&key))
            .map_err(|e| gst::error_msg!(gst::ResourceError::OpenRead, ("{}", e)))?;
        gst::info!(CAT, imp = self, "TLS with {certificate} and {key}");
        Ok(Some(server::TlsSettings {
            certificate,
            key,
            config,
        }))
    }

    /// Leaves the port (the last element on it closes it).
    fn leave(&self) {
        let membership = self.membership.lock().unwrap().take();
        drop(membership);
        *self.current_port.lock().unwrap() = 0;
    }

    /// Opens `access-log`, if set, for the clients of this run.
    fn open_access_log(&self) -> Result<(), gst::ErrorMessage> {
        let path = self.listen.lock().unwrap().access_log.clone();
        let Some(path) = path else {
            return Ok(());
        };
        let log = AccessLog::open(&path, access_log::DEFAULT_CAPACITY).map_err(|e| {
            gst::error_msg!(
                gst::ResourceError::OpenWrite,
                ("cannot open the access log {}: {}", path, e)
            )
        })?;
        install_sighup_handler();
        gst::info!(CAT, imp = self, "access log {path}");
        *self.served.access_log.lock().unwrap() = Some(Arc::new(log));
        Ok(())
    }

    /// `host`, `port`, `listen-backlog`, `proxy-protocol`, `max-pending`,
    /// `access-log`: stored in NULL; in READY the element joins its port again at
    /// once; refused (with a warning) while PAUSED or PLAYING, where clients are
    /// being served.
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
                "proxy-protocol" => listen.proxy_protocol = value.get().unwrap(),
                "max-pending" => listen.max_pending = value.get().unwrap(),
                "tls-certificate" => listen.tls_certificate = optional_string(value),
                "tls-key" => listen.tls_key = optional_string(value),
                "access-log" => {
                    listen.access_log = value
                        .get::<Option<String>>()
                        .unwrap()
                        .filter(|p| !p.is_empty())
                }
                _ => listen.backlog = value.get().unwrap(),
            }
        }
        if state == gst::State::Ready {
            if name == "access-log" {
                // Taken at the next NULL→READY: the clients of this run keep theirs.
                return;
            }
            self.leave();
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

/// An optional string property's value: unset or empty is `None`.
fn optional_string(value: &glib::Value) -> Option<String> {
    value
        .get::<Option<String>>()
        .unwrap()
        .filter(|s| !s.is_empty())
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
                    .blurb("In HTTP mode, the path this element serves (several elements on one port serve one mount each); unset serves every path no other element has")
                    .build(),
                glib::ParamSpecUInt::builder("max-clients")
                    .nick("Max clients")
                    .blurb("In HTTP mode, answer 503 (or redirect to redirect-url) beyond this many clients (0 = no limit)")
                    .default_value(server::DEFAULT_MAX_CLIENTS)
                    .build(),
                glib::ParamSpecUInt64::builder("header-timeout")
                    .nick("Header timeout")
                    .blurb("In HTTP mode, nanoseconds a client has to send its request head (and PROXY header)")
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
                glib::ParamSpecString::builder("auth-jwt-secret")
                    .nick("JWT secret")
                    .blurb("In HTTP mode, require an HS256 JSON Web Token signed with this secret (token query parameter or Authorization: Bearer); 401 otherwise")
                    .write_only()
                    .build(),
                glib::ParamSpecUInt::builder("max-clients-per-ip")
                    .nick("Max clients per IP")
                    .blurb("In HTTP mode, answer 429 to an address that already has this many clients on the port (0 = no limit)")
                    .default_value(0)
                    .build(),
                glib::ParamSpecUInt::builder("max-pending")
                    .nick("Max pending connections")
                    .blurb("In HTTP mode, connections that have not finished their request beyond this many: the oldest is dropped (0 = no limit; the port's)")
                    .default_value(0)
                    .mutable_ready()
                    .build(),
                glib::ParamSpecString::builder("redirect-url")
                    .nick("Redirect URL")
                    .blurb("In HTTP mode, answer 302 to this URL instead of 503 when max-clients is reached")
                    .build(),
                glib::ParamSpecBoolean::builder("proxy-protocol")
                    .nick("PROXY protocol")
                    .blurb("In HTTP mode, read a PROXY protocol v1/v2 header before each request; its source is the client's address (the port's)")
                    .default_value(false)
                    .mutable_ready()
                    .build(),
                glib::ParamSpecString::builder("cors-origin")
                    .nick("CORS origin")
                    .blurb("In HTTP mode, Access-Control-Allow-Origin on every answer, and OPTIONS preflights answered")
                    .build(),
                glib::ParamSpecString::builder("metrics-path")
                    .nick("Metrics path")
                    .blurb("In HTTP mode, GET of this path answers Prometheus metrics of every element on the port")
                    .build(),
                glib::ParamSpecString::builder("tls-certificate")
                    .nick("TLS certificate")
                    .blurb("PEM file with the server's certificate, then any intermediates: with tls-key, the port speaks HTTPS (read at READY; the port's)")
                    .mutable_ready()
                    .build(),
                glib::ParamSpecString::builder("tls-key")
                    .nick("TLS key")
                    .blurb("PEM file with the private key of tls-certificate (PKCS#8, PKCS#1 or SEC1, unencrypted)")
                    .mutable_ready()
                    .build(),
                glib::ParamSpecString::builder("access-log")
                    .nick("Access log")
                    .blurb("In HTTP mode, append one line per finished client and per refused request to this file (opened at READY; reopened on SIGHUP or when renamed)")
                    .mutable_ready()
                    .build(),
            ]
        });
        PROPERTIES.as_ref()
    }

    fn set_property(&self, _id: usize, value: &glib::Value, pspec: &glib::ParamSpec) {
        if pspec.name() == "auth-jwt-secret" {
            // The secret stays out of the debug log.
            gst::debug!(CAT, imp = self, "set auth-jwt-secret");
        } else {
            gst::debug!(CAT, imp = self, "set {} to {:?}", pspec.name(), value);
        }
        if matches!(
            pspec.name(),
            "host"
                | "port"
                | "listen-backlog"
                | "proxy-protocol"
                | "max-pending"
                | "access-log"
                | "tls-certificate"
                | "tls-key"
        ) {
            self.set_listen_property(pspec.name(), value);
            return;
        }
        let mut http = self.server_config.lock().unwrap();
        match pspec.name() {
            "http" => http.http = value.get().unwrap(),
            "mount" => http.mount = optional_string(value),
            "max-clients" => http.max_clients = value.get().unwrap(),
            "header-timeout" => {
                http.header_timeout = Duration::from_nanos(value.get().unwrap());
            }
            "max-header-size" => {
                http.max_header_size = value.get::<u32>().unwrap() as usize;
            }
            "auth-jwt-secret" => {
                http.auth = optional_string(value)
                    .map(|secret| Arc::new(JwtVerifier::new(secret.as_bytes())));
            }
            "max-clients-per-ip" => http.max_clients_per_ip = value.get().unwrap(),
            "redirect-url" => http.redirect_url = optional_string(value),
            "cors-origin" => http.cors_origin = optional_string(value),
            "metrics-path" => http.metrics_path = optional_string(value),
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
            "proxy-protocol" => listen.proxy_protocol.to_value(),
            "max-pending" => listen.max_pending.to_value(),
            "access-log" => listen.access_log.to_value(),
            "tls-certificate" => listen.tls_certificate.to_value(),
            "tls-key" => listen.tls_key.to_value(),
            "http" => http.http.to_value(),
            "mount" => http.mount.to_value(),
            "max-clients" => http.max_clients.to_value(),
            "header-timeout" => (http.header_timeout.as_nanos() as u64).to_value(),
            "max-header-size" => (http.max_header_size as u32).to_value(),
            "max-clients-per-ip" => http.max_clients_per_ip.to_value(),
            "redirect-url" => http.redirect_url.to_value(),
            "cors-origin" => http.cors_origin.to_value(),
            "metrics-path" => http.metrics_path.to_value(),
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

    fn change_state(
        &self,
        transition: gst::StateChange,
    ) -> Result<gst::StateChangeSuccess, gst::StateChangeError> {
        let result = self.parent_change_state(transition);
        if transition == gst::StateChange::ReadyToNull {
            // After the clients were removed (and logged): every line is written
            // when the log is dropped.
            let log = self.served.access_log.lock().unwrap().take();
            drop(log);
        }
        result
    }
}

impl BaseSinkImpl for RsTcpServerSink {
    fn set_caps(&self, caps: &gst::Caps) -> Result<(), gst::LoggableError> {
        let content_type = super::content_type(caps);
        gst::debug!(CAT, imp = self, "serving {caps} as {content_type}");
        self.server_config.lock().unwrap().content_type = Some(content_type);
        let result = self.parent_set_caps(caps);
        // Requests that arrived before the caps are answered now.
        if let Some(m) = self.membership.lock().unwrap().as_ref() {
            m.wake();
        }
        result
    }
}

impl RsMultiHandleSinkImpl for RsTcpServerSink {
    fn client_removed(&self, fd: RawFd, status: ClientStatus) {
        self.served.tallies.lock().unwrap().removed[status as usize] += 1;
        let info = {
            let c = self.served.clients.lock().unwrap();
            c.by_fd.get(&fd).map(|a| a.info.clone())
        };
        if let Some(info) = info {
            let body = self
                .obj()
                .client_stats(fd)
                .get::<u64>("bytes-sent")
                .unwrap_or(0);
            let nick = STATUS_NICKS[status as usize];
            let via = if info.socket_peer == info.address {
                String::new()
            } else {
                format!(" (through {})", info.socket_peer)
            };
            gst::info!(
                CAT,
                imp = self,
                "{}{via}: fd {fd} removed ({nick}) after {body} bytes",
                info.address
            );
            if let (Some(log), Some(line)) = (self.served.access_log(), &info.request_line) {
                log.log(access_log::format_line(&AccessEntry {
                    client: info.address.ip(),
                    user: info.user.as_deref(),
                    started: info.started,
                    request_line: line,
                    status: 200,
                    body_bytes: body,
                    referer: info.referer.as_deref(),
                    user_agent: info.user_agent.as_deref(),
                    bytes_sent: info.head_bytes + body,
                    duration: info.started_at.elapsed(),
                    removal: Some(nick),
                }));
            }
        }
        self.parent_client_removed(fd, status);
    }

    fn client_fd_removed(&self, fd: RawFd) {
        self.parent_client_fd_removed(fd);
        // Our own accepted sockets are closed here; fds the app added are not.
        if self.served.release(fd) {
            gst::debug!(CAT, imp = self, "closed accepted socket fd {fd}");
        }
    }

    fn start_serving(&self) -> Result<(), gst::ErrorMessage> {
        self.parent_start_serving()?;
        self.open_access_log()?;
        if let Err(e) = self.listen() {
            self.served.access_log.lock().unwrap().take();
            return Err(e);
        }
        Ok(())
    }

    fn stop_serving(&self) {
        // The listening sockets (if this is the port's last element) and the
        // connections still sending a request go first.
        self.leave();
        self.parent_stop_serving();
    }
}

impl RsMultiFdSinkImpl for RsTcpServerSink {}
