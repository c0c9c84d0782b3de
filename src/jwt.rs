// SPDX-License-Identifier: MPL-2.0

//! Verification of HS256 JSON Web Tokens, as MediaMTX accepts them, and finding the
//! token in a request. `rstcpserversink` will use it for `auth-jwt-secret` (issue
//! 11): a request whose token is missing or fails here gets 401 and is closed.
//!
//! Only what HS256 needs: the header's `alg` must be `HS256` (so `none` and the
//! public-key algorithms, whose confusion with HMAC is the classic JWT attack, are
//! refused), the HMAC-SHA256 signature is compared in constant time (ring's
//! `hmac::verify`), then `exp` and `nbf` are checked against the caller's clock with
//! [`LEEWAY_SECS`] of slack, and a `mount` claim, if present, must name the mount
//! asked for. A token without `exp` does not expire (RFC 7519 makes it optional, as
//! MediaMTX's library does). Errors never carry the token, so logging them is safe.

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::hmac;
use serde_json::Value;

/// Slack for the clocks of the token's issuer and of this server: a token is still
/// taken this long after `exp`, and already this long before `nbf`.
pub const LEEWAY_SECS: u64 = 30;

/// Longest token considered. Real ones are a few hundred bytes; the bound keeps a
/// hostile request from making the server decode and hash megabytes.
pub const MAX_TOKEN_LEN: usize = 4096;

/// Why a request's token is not accepted. All mean 401.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenError {
    /// No token in the request.
    Missing,
    /// Not three base64url parts of JSON objects, a claim of the wrong type, or too long.
    Malformed,
    /// The header's `alg` is not HS256 (e.g. `none`).
    WrongAlgorithm,
    /// The signature is not the secret's.
    BadSignature,
    /// `exp` has passed.
    Expired,
    /// `nbf` is still to come.
    NotYetValid,
    /// The `mount` claim names another mount.
    WrongMount,
}

impl fmt::Display for TokenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TokenError::Missing => "no token",
            TokenError::Malformed => "malformed token",
            TokenError::WrongAlgorithm => "token not signed with HS256",
            TokenError::BadSignature => "token signature does not match",
            TokenError::Expired => "token expired",
            TokenError::NotYetValid => "token not valid yet",
            TokenError::WrongMount => "token is for another mount",
        })
    }
}

impl std::error::Error for TokenError {}

/// What an accepted token says that the server may log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// The `sub` claim, if it is a string: the user for the access log.
    pub subject: Option<String>,
}

/// Checks tokens against one secret.
pub struct JwtVerifier {
    key: hmac::Key,
}

impl fmt::Debug for JwtVerifier {
    // The secret stays out of debug output.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("JwtVerifier { .. }")
    }
}

impl JwtVerifier {
    pub fn new(secret: &[u8]) -> Self {
        JwtVerifier {
            key: hmac::Key::new(hmac::HMAC_SHA256, secret),
        }
    }

    /// Verifies `token` for a request to `mount` at `now` (seconds since the Unix
    /// epoch). A `mount` claim matches with or without its leading `/`.
    pub fn verify(&self, token: &str, mount: &str, now: u64) -> Result<Verified, TokenError> {
        if token.is_empty() {
            return Err(TokenError::Missing);
        }
        if token.len() > MAX_TOKEN_LEN {
            return Err(TokenError::Malformed);
        }
        let mut parts = token.split('.');
        let (Some(header), Some(payload), Some(signature), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(TokenError::Malformed);
        };
        if json_object(header)?.get("alg").and_then(Value::as_str) != Some("HS256") {
            return Err(TokenError::WrongAlgorithm);
        }
        let signature = URL_SAFE_NO_PAD
            .decode(signature)
            .map_err(|_| TokenError::Malformed)?;
        // The signed input is the two encoded parts as they came, dot included.
        let signed = &token[..header.len() + 1 + payload.len()];
        hmac::verify(&self.key, signed.as_bytes(), &signature)
            .map_err(|_| TokenError::BadSignature)?;

        // Only now, with the signature good, are the claims worth reading.
        let claims = json_object(payload)?;
        let now = now as f64;
        let leeway = LEEWAY_SECS as f64;
        if let Some(exp) = numeric_date(&claims, "exp")?
            && now >= exp + leeway
        {
            return Err(TokenError::Expired);
        }
        if let Some(nbf) = numeric_date(&claims, "nbf")?
            && now + leeway < nbf
        {
            return Err(TokenError::NotYetValid);
        }
        match claims.get("mount") {
            Some(Value::String(claimed))
                if claimed.trim_start_matches('/') != mount.trim_start_matches('/') =>
            {
                return Err(TokenError::WrongMount);
            }
            None | Some(Value::String(_)) => {}
            Some(_) => return Err(TokenError::Malformed),
        }
        Ok(Verified {
            subject: claims.get("sub").and_then(Value::as_str).map(String::from),
        })
    }
}

/// A base64url (unpadded) part that holds a JSON object.
fn json_object(part: &str) -> Result<serde_json::Map<String, Value>, TokenError> {
    let bytes = URL_SAFE_NO_PAD
        .decode(part)
        .map_err(|_| TokenError::Malformed)?;
    match serde_json::from_slice(&bytes) {
        Ok(Value::Object(map)) => Ok(map),
        _ => Err(TokenError::Malformed),
    }
}

/// A NumericDate claim (seconds since the epoch, maybe fractional), if present.
fn numeric_date(
    claims: &serde_json::Map<String, Value>,
    name: &str,
) -> Result<Option<f64>, TokenError> {
    match claims.get(name) {
        None => Ok(None),
        Some(value) => value.as_f64().map(Some).ok_or(TokenError::Malformed),
    }
}

/// The `token` query parameter of a request target (`/video?token=...`),
/// percent-decoded, with `+` as a space, as Go's `url.Query` (MediaMTX) reads it.
/// `None` if there is none or it does not decode to UTF-8.
pub fn token_from_target(target: &str) -> Option<String> {
    let query = target.split('#').next()?.split_once('?')?.1;
    let value = query
        .split('&')
        .find_map(|pair| pair.strip_prefix("token="))?;
    percent_decode(value)
}

/// The token of an `Authorization` header's value, if its scheme is Bearer (in any
/// case, as HTTP's auth schemes are).
pub fn token_from_authorization(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(' ')?;
    let token = token.trim_start();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

fn percent_decode(s: &str) -> Option<String> {
    let mut out = Vec::with_capacity(s.len());
    let mut bytes = s.bytes();
    while let Some(b) = bytes.next() {
        out.push(match b {
            b'+' => b' ',
            b'%' => {
                let hi = char::from(bytes.next()?).to_digit(16)?;
                let lo = char::from(bytes.next()?).to_digit(16)?;
                (hi * 16 + lo) as u8
            }
            b => b,
        });
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"correct horse battery staple";
    const NOW: u64 = 1_800_000_000;

    /// Made outside this code with Python's standard library:
    /// python3 -c 'import hmac, hashlib, base64, json
    /// b = lambda x: base64.urlsafe_b64encode(x).rstrip(b"=").decode()
    /// h = b(json.dumps({"alg":"HS256","typ":"JWT"}, separators=(",",":")).encode())
    /// p = b(json.dumps({"sub":"viewer1","mount":"/video","nbf":1700000000,"exp":1900000000}, separators=(",",":")).encode())
    /// s = b(hmac.new(b"correct horse battery staple", (h+"."+p).encode(), hashlib.sha256).digest())
    /// print(h+"."+p+"."+s)'
    const PYTHON_TOKEN: &str = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiJ2aWV3ZXIxIiwibW91bnQiOiIvdmlkZW8iLCJuYmYiOjE3MDAwMDAwMDAsImV4cCI6MTkwMDAwMDAwMH0.SzjmUAnEGikXFnlMk2sclxEalxVZSMRM33lWdL5Pip4";

    /// jwt.io's example token (secret "your-256-bit-secret"; no exp, no mount),
    /// checked with the same Python hmac/hashlib/base64 as above.
    const JWT_IO_TOKEN: &str = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIiwibmFtZSI6IkpvaG4gRG9lIiwiaWF0IjoxNTE2MjM5MDIyfQ.SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c";

    /// A token signed here with `secret` over the given header and claims.
    fn make(secret: &[u8], header: &str, claims: &str) -> String {
        let signed = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header),
            URL_SAFE_NO_PAD.encode(claims)
        );
        let key = hmac::Key::new(hmac::HMAC_SHA256, secret);
        let tag = hmac::sign(&key, signed.as_bytes());
        format!("{signed}.{}", URL_SAFE_NO_PAD.encode(tag.as_ref()))
    }

    fn hs256(claims: &str) -> String {
        make(SECRET, r#"{"alg":"HS256","typ":"JWT"}"#, claims)
    }

    fn verify(token: &str, mount: &str) -> Result<Verified, TokenError> {
        JwtVerifier::new(SECRET).verify(token, mount, NOW)
    }

    #[test]
    fn accepts_tokens_made_elsewhere() {
        let viewer = Verified {
            subject: Some("viewer1".into()),
        };
        assert_eq!(verify(PYTHON_TOKEN, "/video"), Ok(viewer.clone()));
        assert_eq!(verify(PYTHON_TOKEN, "video"), Ok(viewer));
        assert_eq!(verify(PYTHON_TOKEN, "/audio"), Err(TokenError::WrongMount));
        assert_eq!(
            JwtVerifier::new(b"your-256-bit-secret").verify(JWT_IO_TOKEN, "/any", NOW),
            Ok(Verified {
                subject: Some("1234567890".into())
            })
        );
        assert_eq!(verify(JWT_IO_TOKEN, "/any"), Err(TokenError::BadSignature));
    }

    #[test]
    fn checks_exp_and_nbf_with_leeway() {
        let exp = hs256(&format!(r#"{{"exp":{NOW}}}"#));
        let verifier = JwtVerifier::new(SECRET);
        assert!(verifier.verify(&exp, "/", NOW - 1).is_ok());
        assert!(verifier.verify(&exp, "/", NOW + LEEWAY_SECS - 1).is_ok());
        assert_eq!(
            verifier.verify(&exp, "/", NOW + LEEWAY_SECS),
            Err(TokenError::Expired)
        );
        let nbf = hs256(&format!(r#"{{"nbf":{NOW}}}"#));
        assert!(verifier.verify(&nbf, "/", NOW).is_ok());
        assert!(verifier.verify(&nbf, "/", NOW - LEEWAY_SECS).is_ok());
        assert_eq!(
            verifier.verify(&nbf, "/", NOW - LEEWAY_SECS - 1),
            Err(TokenError::NotYetValid)
        );
        assert_eq!(
            verify(&hs256(r#"{"exp":"tomorrow"}"#), "/"),
            Err(TokenError::Malformed)
        );
        // NumericDate may be fractional.
        assert!(verify(&hs256(r#"{"exp":1800000000.25}"#), "/").is_ok());
        assert_eq!(verify(&hs256("{}"), "/"), Ok(Verified { subject: None }));
    }

    #[test]
    fn refuses_other_algorithms_and_secrets() {
        let claims = r#"{"sub":"x"}"#;
        let none = format!(
            "{}.{}.",
            URL_SAFE_NO_PAD.encode(r#"{"alg":"none","typ":"JWT"}"#),
            URL_SAFE_NO_PAD.encode(claims)
        );
        assert_eq!(verify(&none, "/"), Err(TokenError::WrongAlgorithm));
        // Signed with our secret but calling itself something else: still refused.
        for alg in [
            r#"{"alg":"HS512"}"#,
            r#"{"alg":"RS256"}"#,
            r#"{"typ":"JWT"}"#,
        ] {
            assert_eq!(
                verify(&make(SECRET, alg, claims), "/"),
                Err(TokenError::WrongAlgorithm)
            );
        }
        let other = make(b"another secret", r#"{"alg":"HS256"}"#, claims);
        assert_eq!(verify(&other, "/"), Err(TokenError::BadSignature));
        // A claim changed after signing.
        let good = hs256(r#"{"mount":"/video"}"#);
        let (signed, sig) = good.rsplit_once('.').unwrap();
        let (head, _) = signed.split_once('.').unwrap();
        let forged = format!(
            "{head}.{}.{sig}",
            URL_SAFE_NO_PAD.encode(r#"{"mount":"/audio"}"#)
        );
        assert_eq!(verify(&forged, "/audio"), Err(TokenError::BadSignature));
        // A truncated signature.
        assert_eq!(
            verify(&good[..good.len() - 3], "/video"),
            Err(TokenError::BadSignature)
        );
    }

    #[test]
    fn refuses_malformed_tokens() {
        let good = hs256("{}");
        assert_eq!(verify("", "/"), Err(TokenError::Missing));
        for bad in [
            "abc".to_string(),
            "a.b".into(),
            "a.b.c.d".into(),
            format!("{good}.x"),
            format!("{good}="),      // padding
            format!("!{good}"),      // not base64url
            hs256("[1,2]"),          // claims not an object
            hs256(r#"{"mount":7}"#), // mount not a string
            make(SECRET, "not json", "{}"),
            "a".repeat(MAX_TOKEN_LEN + 1),
        ] {
            assert_eq!(verify(&bad, "/"), Err(TokenError::Malformed), "{bad}");
        }
    }

    #[test]
    fn errors_never_show_the_token() {
        let verifier = JwtVerifier::new(SECRET);
        let token = hs256(r#"{"exp":1}"#);
        let err = verifier.verify(&token, "/", NOW).unwrap_err();
        assert_eq!(err.to_string(), "token expired");
        let shown = format!("{err} {err:?} {verifier:?}");
        assert!(
            !shown.contains(&token[..10]) && !shown.contains("horse"),
            "{shown}"
        );
    }

    #[test]
    fn finds_the_token_in_the_request() {
        assert_eq!(
            token_from_target("/video?token=abc.def.ghi").as_deref(),
            Some("abc.def.ghi")
        );
        assert_eq!(
            token_from_target("/v?a=1&token=a%2Eb%2ec+d&token=second#frag").as_deref(),
            Some("a.b.c d")
        );
        assert_eq!(token_from_target("/v?x=1#?token=no"), None);
        assert_eq!(token_from_target("/v?mytoken=no"), None);
        assert_eq!(token_from_target("/v"), None);
        assert_eq!(token_from_target("/v?token=%zz"), None);
        assert_eq!(token_from_target("/v?token=%ff"), None);
        assert_eq!(token_from_target("/v?token=").as_deref(), Some(""));

        assert_eq!(token_from_authorization("Bearer abc.def"), Some("abc.def"));
        assert_eq!(token_from_authorization("bearer   abc "), Some("abc"));
        assert_eq!(token_from_authorization("Basic dXNlcjpwdw=="), None);
        assert_eq!(token_from_authorization("Bearer"), None);
        assert_eq!(token_from_authorization("Bearer  "), None);
    }
}
