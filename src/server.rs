// SPDX-License-Identifier: MPL-2.0

//! What `rstcpserversink` serves and how, in plain Rust: each element's HTTP policy
//! ([`ServerConfig`]), the settings of its port ([`PortSettings`]), binding the
//! listening sockets, routing a request to the element whose mount matches
//! ([`route`]) and the answer that element's policy gives it ([`decide`]). The
//! per-port hub (`hub`) runs the sockets and asks these functions.

use std::io::ErrorKind;
use std::net::{IpAddr, SocketAddr, TcpListener, ToSocketAddrs};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Duration;

use nix::sys::socket::{
    AddressFamily, Backlog, SockFlag, SockType, SockaddrStorage, bind, listen, setsockopt, socket,
    sockopt,
};

use crate::http::{Method, Request};
use crate::jwt::{self, JwtVerifier};

/// How long a client has to send its request head, by default.
pub const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest request head accepted, by default.
pub const DEFAULT_MAX_HEADER_SIZE: u32 = 8192;
/// No limit on clients, by default.
pub const DEFAULT_MAX_CLIENTS: u32 = 0;
/// The kernel's queue of connections not yet accepted, by default.
pub const DEFAULT_BACKLOG: i32 = 128;

/// One element's HTTP policy; the element keeps it current, the hub reads it for
/// each request, so changes apply to the next one.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Speak HTTP: read a request, answer with headers. Off: raw TCP as `tcpserversink`.
    pub http: bool,
    /// Only this path is served by this element; `None` serves any path that no
    /// other element on the port has.
    pub mount: Option<String>,
    /// 503 (or a redirect) beyond this many clients; 0 is no limit.
    pub max_clients: u32,
    /// Applies before the request says which element it is for, so the port
    /// uses its first element's (the others must agree when they join).
    pub header_timeout: Duration,
    /// As `header_timeout`, port-wide.
    pub max_header_size: usize,
    /// From the caps; `None` until caps arrive.
    pub content_type: Option<String>,
    /// `auth-jwt-secret`: requests need an HS256 token signed with it.
    pub auth: Option<Arc<JwtVerifier>>,
    /// 429 for an address that already has this many clients on the port; 0: none.
    pub max_clients_per_ip: u32,
    /// Where clients beyond `max_clients` are sent (302) instead of a 503.
    pub redirect_url: Option<String>,
    /// `Access-Control-Allow-Origin` on every answer, and preflights answered.
    pub cors_origin: Option<String>,
    /// GET of this path answers the metrics of every element on the port.
    pub metrics_path: Option<String>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            http: false,
            mount: None,
            max_clients: DEFAULT_MAX_CLIENTS,
            header_timeout: DEFAULT_HEADER_TIMEOUT,
            max_header_size: DEFAULT_MAX_HEADER_SIZE as usize,
            content_type: None,
            auth: None,
            max_clients_per_ip: 0,
            redirect_url: None,
            cors_origin: None,
            metrics_path: None,
        }
    }
}

impl ServerConfig {
    /// The `mount` label of this element's metrics: its mount, or `*` (any path).
    pub fn mount_label(&self) -> String {
        self.mount.clone().unwrap_or_else(|| "*".into())
    }
}

/// Where and how an element listens: read when it goes to READY. Elements that
/// share a port must agree on all but `host`/`port`, which name the port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortSettings {
    pub host: String,
    pub port: u16,
    pub backlog: i32,
    /// A PROXY protocol header (v1 or v2) comes before each request.
    pub proxy_protocol: bool,
    /// Connections still sending their PROXY header or request (or waiting for
    /// the stream's caps) beyond this many: the oldest is dropped. 0: no cap.
    pub max_pending: u32,
    /// HTTPS: every connection is TLS, terminated by `tls::Terminator`.
    pub tls: Option<TlsSettings>,
}

/// `tls-certificate` and `tls-key`, and the configuration loaded from them when the
/// element went to READY. Elements on one port agree when they name the same files.
#[derive(Debug, Clone)]
pub struct TlsSettings {
    pub certificate: String,
    pub key: String,
    pub config: Arc<rustls::ServerConfig>,
}

impl PartialEq for TlsSettings {
    fn eq(&self, other: &Self) -> bool {
        self.certificate == other.certificate && self.key == other.key
    }
}

impl Eq for TlsSettings {}

/// Binds every address `host` resolves to, on `port` (0: a free port, the same for
/// all), with the given listen backlog. Fails only if none can be bound.
pub fn bind_listeners(host: &str, port: u16, backlog: i32) -> std::io::Result<Vec<TcpListener>> {
    let mut addrs: Vec<SocketAddr> = (host, port).to_socket_addrs()?.collect();
    addrs.dedup();
    // IPv4 first, so port 0 picks a port that IPv6 then usually also has free.
    addrs.sort_by_key(|a| a.is_ipv6());
    let mut bound: Vec<TcpListener> = Vec::new();
    let mut last = None;
    for mut addr in addrs {
        if let Some(first) = bound.first() {
            addr.set_port(first.local_addr()?.port());
        }
        match bind_one(addr, backlog) {
            Ok(l) => bound.push(l),
            Err(e) => last = Some(e),
        }
    }
    if bound.is_empty() {
        return Err(last.unwrap_or_else(|| {
            std::io::Error::new(
                ErrorKind::NotFound,
                format!("{host} resolves to no address"),
            )
        }));
    }
    Ok(bound)
}

fn bind_one(addr: SocketAddr, backlog: i32) -> std::io::Result<TcpListener> {
    let family = if addr.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    let fd = socket(
        family,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )?;
    setsockopt(&fd, sockopt::ReuseAddr, &true)?;
    bind(fd.as_raw_fd(), &SockaddrStorage::from(addr))?;
    listen(
        &fd,
        Backlog::new(backlog.clamp(1, i32::MAX)).map_err(std::io::Error::from)?,
    )?;
    Ok(TcpListener::from(fd))
}

/// `addr` with an IPv4-mapped IPv6 address (`::ffff:192.0.2.7`, as a dual-stack
/// socket reports IPv4 peers) written as the IPv4 address it is, so limits and logs
/// see one address per client whatever socket it came through.
pub fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(canonical_ip(addr.ip()), addr.port())
}

pub fn canonical_ip(ip: IpAddr) -> IpAddr {
    ip.to_canonical()
}

/// Which of the port's elements serves `path`, given their mounts in the order they
/// joined: the one whose mount is exactly `path`, else the first without a mount.
pub fn route<'a>(mounts: impl IntoIterator<Item = Option<&'a str>>, path: &str) -> Option<usize> {
    let mut any = None;
    for (i, mount) in mounts.into_iter().enumerate() {
        match mount {
            Some(m) if m == path => return Some(i),
            None if any.is_none() => any = Some(i),
            _ => {}
        }
    }
    any
}

/// What the chosen element's figures are when its policy is applied.
#[derive(Debug, Clone, Copy, Default)]
pub struct Situation {
    /// The element's clients now.
    pub clients: usize,
    /// Clients of the request's address on the whole port now.
    pub clients_from_ip: usize,
    /// The element's IO threads are overloaded and it refuses new clients.
    pub refusing: bool,
    /// Seconds since the Unix epoch (for token expiry).
    pub now: u64,
}

/// A request that is not served, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    pub code: u16,
    pub reason: &'static str,
    /// For a redirect.
    pub location: Option<String>,
    /// For the debug log (never holds a token).
    pub why: String,
}

impl Refused {
    pub fn new(code: u16, reason: &'static str, why: impl Into<String>) -> Refused {
        Refused {
            code,
            reason,
            location: None,
            why: why.into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Serve the stream (GET) or its head (HEAD); `user` is the token's subject.
    Serve {
        user: Option<String>,
    },
    /// Answer a CORS preflight with 204.
    Preflight,
    Refuse(Refused),
}

/// What `config` (the policy of the element the request was routed to) answers to
/// `req`: a preflight, a refusal, or the stream. Checked in this order: the token
/// (401), the address's clients (429), the element's clients or overload (302 to
/// `redirect_url`, else 503).
pub fn decide(config: &ServerConfig, req: &Request, s: &Situation) -> Decision {
    if req.method == Method::Options {
        return match config.cors_origin {
            Some(_) => Decision::Preflight,
            None => Decision::Refuse(Refused::new(
                405,
                "Method Not Allowed",
                "OPTIONS without cors-origin",
            )),
        };
    }
    let mut user = None;
    if let Some(verifier) = &config.auth {
        let token = jwt::token_from_target(&req.target).or_else(|| {
            req.authorization
                .as_deref()
                .and_then(jwt::token_from_authorization)
                .map(String::from)
        });
        // A token is for the mount asked for (the path, for an element serving any).
        let mount = config.mount.as_deref().unwrap_or(&req.path);
        match verifier.verify(token.as_deref().unwrap_or(""), mount, s.now) {
            Ok(verified) => user = verified.subject,
            Err(e) => return Decision::Refuse(Refused::new(401, "Unauthorized", e.to_string())),
        }
    }
    if config.max_clients_per_ip > 0 && s.clients_from_ip >= config.max_clients_per_ip as usize {
        return Decision::Refuse(Refused::new(
            429,
            "Too Many Requests",
            format!(
                "the address has {} clients (max-clients-per-ip)",
                s.clients_from_ip
            ),
        ));
    }
    let full = config.max_clients > 0 && s.clients >= config.max_clients as usize;
    if full || s.refusing {
        let why = if full {
            format!("{} clients (max-clients)", s.clients)
        } else {
            "the sink is overloaded".to_string()
        };
        return Decision::Refuse(match &config.redirect_url {
            Some(url) => Refused {
                code: 302,
                reason: "Found",
                location: Some(url.clone()),
                why: format!("{why}: redirected"),
            },
            None => Refused::new(503, "Service Unavailable", why),
        });
    }
    Decision::Serve { user }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::{Parsed, parse_request};

    fn request(text: &str) -> Request {
        match parse_request(text.as_bytes(), 8192) {
            Parsed::Request(r) => r,
            other => panic!("{other:?}"),
        }
    }

    fn code(d: Decision) -> u16 {
        match d {
            Decision::Serve { .. } => 200,
            Decision::Preflight => 204,
            Decision::Refuse(r) => r.code,
        }
    }

    /// A token signed with `secret` carrying `claims` (JSON).
    fn token(secret: &[u8], claims: &str) -> String {
        use base64::Engine;
        use base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let head = URL_SAFE_NO_PAD.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
        let body = URL_SAFE_NO_PAD.encode(claims);
        let signed = format!("{head}.{body}");
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
        let sig = URL_SAFE_NO_PAD.encode(ring::hmac::sign(&key, signed.as_bytes()));
        format!("{signed}.{sig}")
    }

    #[test]
    fn routes_exact_mount_first_then_the_element_without_one() {
        let mounts = [Some("/video"), None, Some("/audio")];
        assert_eq!(route(mounts, "/audio"), Some(2));
        assert_eq!(route(mounts, "/video"), Some(0));
        assert_eq!(route(mounts, "/other"), Some(1));
        assert_eq!(route([Some("/video"), Some("/audio")], "/"), None);
        assert_eq!(route([Some("/video")], "/video/x"), None);
    }

    #[test]
    fn canonical_unmaps_ipv4_mapped_addresses() {
        let mapped: SocketAddr = "[::ffff:192.0.2.7]:5000".parse().unwrap();
        assert_eq!(canonical(mapped), "192.0.2.7:5000".parse().unwrap());
        let v6: SocketAddr = "[2001:db8::1]:80".parse().unwrap();
        assert_eq!(canonical(v6), v6);
    }

    #[test]
    fn limits_in_order_and_redirect() {
        let cfg = ServerConfig {
            http: true,
            max_clients: 2,
            max_clients_per_ip: 1,
            ..Default::default()
        };
        let get = request("GET / HTTP/1.1\r\n\r\n");
        let at = |clients, from_ip| Situation {
            clients,
            clients_from_ip: from_ip,
            ..Default::default()
        };
        assert_eq!(code(decide(&cfg, &get, &at(1, 0))), 200);
        assert_eq!(code(decide(&cfg, &get, &at(1, 1))), 429);
        assert_eq!(code(decide(&cfg, &get, &at(2, 0))), 503);
        let refusing = Situation {
            refusing: true,
            ..Default::default()
        };
        assert_eq!(code(decide(&cfg, &get, &refusing)), 503);
        let redirecting = ServerConfig {
            redirect_url: Some("http://edge2/live".into()),
            ..cfg
        };
        match decide(&redirecting, &get, &at(2, 0)) {
            Decision::Refuse(r) => {
                assert_eq!(
                    (r.code, r.location.as_deref()),
                    (302, Some("http://edge2/live"))
                )
            }
            d => panic!("{d:?}"),
        }
    }

    #[test]
    fn preflight_only_with_cors_origin() {
        let options = request("OPTIONS /v HTTP/1.1\r\n\r\n");
        let s = Situation::default();
        assert_eq!(code(decide(&ServerConfig::default(), &options, &s)), 405);
        let cors = ServerConfig {
            cors_origin: Some("*".into()),
            ..Default::default()
        };
        assert_eq!(decide(&cors, &options, &s), Decision::Preflight);
    }

    #[test]
    fn jwt_from_query_or_bearer_with_mount_claim() {
        let cfg = ServerConfig {
            mount: Some("/v".into()),
            auth: Some(Arc::new(JwtVerifier::new(b"sekrit"))),
            ..Default::default()
        };
        let now = 1_800_000_000;
        let s = Situation {
            now,
            ..Default::default()
        };
        let good = token(b"sekrit", r#"{"sub":"ann","mount":"v","exp":1900000000}"#);
        let decided = decide(
            &cfg,
            &request(&format!("GET /v?token={good} HTTP/1.1\r\n\r\n")),
            &s,
        );
        assert_eq!(
            decided,
            Decision::Serve {
                user: Some("ann".into())
            }
        );
        let bearer = format!("GET /v HTTP/1.1\r\nAuthorization: Bearer {good}\r\n\r\n");
        assert_eq!(code(decide(&cfg, &request(&bearer), &s)), 200);
        for bad in [
            token(b"other", r#"{"exp":1900000000}"#),
            token(b"sekrit", r#"{"exp":1700000000}"#),
            token(b"sekrit", r#"{"mount":"/a"}"#),
            "garbage".into(),
        ] {
            let req = request(&format!("GET /v?token={bad} HTTP/1.1\r\n\r\n"));
            match decide(&cfg, &req, &s) {
                Decision::Refuse(r) => {
                    assert_eq!(r.code, 401);
                    assert!(!r.why.contains(&bad), "the token leaks into {}", r.why);
                }
                d => panic!("{d:?}"),
            }
        }
        assert_eq!(
            code(decide(&cfg, &request("GET /v HTTP/1.1\r\n\r\n"), &s)),
            401
        );
    }
}
