// SPDX-License-Identifier: MPL-2.0

//! The little HTTP that `rstcpserversink` speaks: read one request head, answer with
//! a status line and headers, then stream. Plain Rust, fed untrusted bytes, so it
//! never panics and bounds everything.

/// What a client asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub method: Method,
    /// The path of the request target, without query string.
    pub path: String,
    /// The request target as sent, query string included. It may carry a `token`:
    /// never log it as it is (`access_log::redact_token`).
    pub target: String,
    /// The request line (`GET /x HTTP/1.1`), for the access log (same caution).
    pub line: String,
    /// The first `Authorization` header's value (a secret: never logged).
    pub authorization: Option<String>,
    pub referer: Option<String>,
    pub user_agent: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Get,
    Head,
    /// A CORS preflight (answered only where `cors-origin` is set).
    Options,
}

/// Why a request is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Malformed request line or header, or not HTTP.
    BadRequest,
    /// The head grew past the allowed size.
    TooLarge,
    /// A method other than GET, HEAD or OPTIONS.
    MethodNotAllowed,
}

impl Refusal {
    /// The status line's code and reason for this refusal.
    pub fn status(self) -> (u16, &'static str) {
        match self {
            Refusal::BadRequest | Refusal::TooLarge => (400, "Bad Request"),
            Refusal::MethodNotAllowed => (405, "Method Not Allowed"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    /// The head is not complete yet: read more.
    Incomplete,
    Request(Request),
    Refused(Refusal),
}

/// Parses the request head in `buf` (everything read so far). `max_head` bounds the
/// head's size; a longer one is refused even before it completes.
pub fn parse_request(buf: &[u8], max_head: usize) -> Parsed {
    let Some(end) = head_end(buf) else {
        return if buf.len() > max_head {
            Parsed::Refused(Refusal::TooLarge)
        } else if buf.len() >= 4 && !looks_like_http(buf) {
            // Do not wait for a head that will never come from a non-HTTP peer.
            Parsed::Refused(Refusal::BadRequest)
        } else {
            Parsed::Incomplete
        };
    };
    if end > max_head {
        return Parsed::Refused(Refusal::TooLarge);
    }
    let Ok(head) = std::str::from_utf8(&buf[..end]) else {
        return Parsed::Refused(Refusal::BadRequest);
    };
    let mut lines = head.split('\n').map(|l| l.strip_suffix('\r').unwrap_or(l));
    let request_line = lines.next().unwrap_or("");
    let mut parts = request_line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Parsed::Refused(Refusal::BadRequest);
    };
    if !version.starts_with("HTTP/1.") || version.len() != 8 {
        return Parsed::Refused(Refusal::BadRequest);
    }
    if !target.starts_with('/') && !target.starts_with("http://") {
        return Parsed::Refused(Refusal::BadRequest);
    }
    let (mut authorization, mut referer, mut user_agent) = (None, None, None);
    for line in lines.filter(|l| !l.is_empty()) {
        match line.split_once(':') {
            Some((name, value)) if !name.is_empty() && name.bytes().all(is_token_byte) => {
                // The first of each wins; header names are case-insensitive.
                let slot = if name.eq_ignore_ascii_case("authorization") {
                    &mut authorization
                } else if name.eq_ignore_ascii_case("referer") {
                    &mut referer
                } else if name.eq_ignore_ascii_case("user-agent") {
                    &mut user_agent
                } else {
                    continue;
                };
                if slot.is_none() {
                    *slot = Some(value.trim().to_string());
                }
            }
            _ => return Parsed::Refused(Refusal::BadRequest),
        }
    }
    let method = match method {
        "GET" => Method::Get,
        "HEAD" => Method::Head,
        "OPTIONS" => Method::Options,
        m if !m.is_empty() && m.bytes().all(|b| b.is_ascii_uppercase()) => {
            return Parsed::Refused(Refusal::MethodNotAllowed);
        }
        _ => return Parsed::Refused(Refusal::BadRequest),
    };
    // An absolute-form target keeps only its path.
    let path = match target.strip_prefix("http://") {
        Some(rest) => rest.find('/').map_or("/", |i| &rest[i..]),
        None => target,
    };
    let path = path.split(['?', '#']).next().unwrap_or("/");
    Parsed::Request(Request {
        method,
        path: path.to_string(),
        target: target.to_string(),
        line: request_line.to_string(),
        authorization,
        referer,
        user_agent,
    })
}

/// Where the head ends (index just past the blank line), if it does.
fn head_end(buf: &[u8]) -> Option<usize> {
    let crlf = buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4);
    let lf = buf.windows(2).position(|w| w == b"\n\n").map(|i| i + 2);
    match (crlf, lf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

fn looks_like_http(buf: &[u8]) -> bool {
    buf.iter()
        .take_while(|b| **b != b' ')
        .all(|b| b.is_ascii_uppercase())
}

fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// A response head: status line, the headers given, and the blank line.
pub fn response_head(code: u16, reason: &str, headers: &[(&str, &str)]) -> Vec<u8> {
    let mut out = format!("HTTP/1.0 {code} {reason}\r\n");
    for (name, value) in headers {
        out.push_str(name);
        out.push_str(": ");
        out.push_str(value);
        out.push_str("\r\n");
    }
    out.push_str("\r\n");
    out.into_bytes()
}

/// The head of a refusal; the connection is closed after it.
pub fn error_head(code: u16, reason: &str) -> Vec<u8> {
    error_head_with(code, reason, &[])
}

/// The head of a refusal with `extra` headers after the usual ones.
pub fn error_head_with(code: u16, reason: &str, extra: &[(&str, &str)]) -> Vec<u8> {
    let mut headers = vec![("Content-Length", "0"), ("Connection", "close")];
    headers.extend_from_slice(extra);
    response_head(code, reason, &headers)
}

/// The stream's head: 200 with the media type, never cached.
pub fn stream_head(content_type: &str) -> Vec<u8> {
    stream_head_with(content_type, &[])
}

/// The stream's head with `extra` headers after the usual ones.
pub fn stream_head_with(content_type: &str, extra: &[(&str, &str)]) -> Vec<u8> {
    let mut headers = vec![
        ("Content-Type", content_type),
        ("Cache-Control", "no-cache"),
        ("Connection", "close"),
        ("Server", "rstcpserversink"),
    ];
    headers.extend_from_slice(extra);
    response_head(200, "OK", &headers)
}

/// How long browsers may cache a preflight's answer, in seconds.
pub const PREFLIGHT_MAX_AGE: &str = "86400";

/// The answer to a CORS preflight (`OPTIONS`) from `origin`'s pages: GET, HEAD and
/// OPTIONS, with the headers players send (a Bearer token, byte ranges).
pub fn preflight_head(origin: &str) -> Vec<u8> {
    response_head(
        204,
        "No Content",
        &[
            ("Access-Control-Allow-Origin", origin),
            ("Access-Control-Allow-Methods", "GET, HEAD, OPTIONS"),
            ("Access-Control-Allow-Headers", "Authorization, Range"),
            ("Access-Control-Max-Age", PREFLIGHT_MAX_AGE),
            ("Content-Length", "0"),
            ("Connection", "close"),
        ],
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: usize = 4096;

    /// The method and path of a parsed request.
    fn req(parsed: Parsed) -> (Method, String) {
        match parsed {
            Parsed::Request(r) => (r.method, r.path),
            other => panic!("not a request: {other:?}"),
        }
    }

    #[test]
    fn parses_get_head_and_options() {
        assert_eq!(
            req(parse_request(
                b"GET /live.webm HTTP/1.1\r\nHost: x\r\n\r\n",
                MAX
            )),
            (Method::Get, "/live.webm".into())
        );
        assert_eq!(
            req(parse_request(b"HEAD / HTTP/1.0\r\n\r\n", MAX)),
            (Method::Head, "/".into())
        );
        assert_eq!(
            req(parse_request(b"GET /a?x=1 HTTP/1.1\n\n", MAX)),
            (Method::Get, "/a".into())
        );
        assert_eq!(
            req(parse_request(b"GET http://h:8080/s HTTP/1.1\r\n\r\n", MAX)),
            (Method::Get, "/s".into())
        );
        assert_eq!(
            req(parse_request(b"OPTIONS /v HTTP/1.1\r\n\r\n", MAX)),
            (Method::Options, "/v".into())
        );
    }

    #[test]
    fn keeps_target_request_line_and_the_headers_the_server_uses() {
        let Parsed::Request(r) = parse_request(
            b"GET /v?token=a.b.c&x=1 HTTP/1.1\r\nHost: h\r\nuser-agent:  VLC/3.0 \r\n\
              AUTHORIZATION: Bearer t0k\r\nReferer: http://p/\r\nReferer: second\r\n\r\n",
            MAX,
        ) else {
            panic!("not a request");
        };
        assert_eq!(r.path, "/v");
        assert_eq!(r.target, "/v?token=a.b.c&x=1");
        assert_eq!(r.line, "GET /v?token=a.b.c&x=1 HTTP/1.1");
        assert_eq!(r.authorization.as_deref(), Some("Bearer t0k"));
        assert_eq!(r.referer.as_deref(), Some("http://p/"));
        assert_eq!(r.user_agent.as_deref(), Some("VLC/3.0"));
        let Parsed::Request(bare) = parse_request(b"GET / HTTP/1.0\r\n\r\n", MAX) else {
            panic!("not a request");
        };
        assert_eq!(
            (bare.authorization, bare.referer, bare.user_agent),
            (None, None, None)
        );
    }

    #[test]
    fn waits_for_the_whole_head() {
        assert_eq!(
            parse_request(b"GET / HTTP/1.1\r\nHost:", MAX),
            Parsed::Incomplete
        );
        assert_eq!(parse_request(b"GE", MAX), Parsed::Incomplete);
    }

    #[test]
    fn refuses_bad_and_oversized_requests() {
        let bad = Parsed::Refused(Refusal::BadRequest);
        assert_eq!(parse_request(b"\x16\x03\x01\x02\x00", MAX), bad);
        assert_eq!(parse_request(b"GET /\r\n\r\n", MAX), bad);
        assert_eq!(parse_request(b"GET / FTP/1.0\r\n\r\n", MAX), bad);
        assert_eq!(
            parse_request(b"GET / HTTP/1.1\r\nno colon\r\n\r\n", MAX),
            bad
        );
        assert_eq!(
            parse_request(b"GET / HTTP/1.1\r\n\xff: x\r\n\r\n", MAX),
            bad
        );
        assert_eq!(
            parse_request(b"POST / HTTP/1.1\r\n\r\n", MAX),
            Parsed::Refused(Refusal::MethodNotAllowed)
        );
        let long = [b"GET / HTTP/1.1\r\nX: ".as_slice(), &[b'a'; 5000]].concat();
        assert_eq!(
            parse_request(&long, MAX),
            Parsed::Refused(Refusal::TooLarge)
        );
    }

    #[test]
    fn heads_are_well_formed() {
        assert_eq!(
            stream_head("video/webm"),
            b"HTTP/1.0 200 OK\r\nContent-Type: video/webm\r\nCache-Control: no-cache\r\nConnection: close\r\nServer: rstcpserversink\r\n\r\n"
        );
        assert!(error_head(404, "Not Found").starts_with(b"HTTP/1.0 404 Not Found\r\n"));
        assert_eq!(
            error_head_with(302, "Found", &[("Location", "http://e/")]),
            b"HTTP/1.0 302 Found\r\nContent-Length: 0\r\nConnection: close\r\nLocation: http://e/\r\n\r\n"
        );
        assert_eq!(
            preflight_head("*"),
            b"HTTP/1.0 204 No Content\r\nAccess-Control-Allow-Origin: *\r\n\
              Access-Control-Allow-Methods: GET, HEAD, OPTIONS\r\n\
              Access-Control-Allow-Headers: Authorization, Range\r\n\
              Access-Control-Max-Age: 86400\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        );
    }

    #[test]
    fn never_panics_on_any_prefix_of_garbage() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..2000 {
            let len = (seed % 64) as usize;
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    b"GET HEAD / \r\n:HTTP/1.0x\xff"[(seed % 24) as usize]
                })
                .collect();
            let _ = parse_request(&bytes, 32);
        }
    }
}
