//! Fuzzes what `rstcpserversink` does with the first bytes on its TLS port (issue 11):
//! the first-byte check that tells plain HTTP from TLS, then rustls' ClientHello
//! reader with the server configuration `load_server_config` builds, fed as the
//! terminator feeds it (`read_tls` in pieces, `process_new_packets`, its answers
//! taken with `write_tls`). Any bytes must give a handshake in progress or an error,
//! never a panic, and the connection must stop taking bytes after an error.
//!
//! Half the inputs (odd first byte) are a real ClientHello (from a rustls client)
//! with the rest of the input XORed over it, so the fuzzer starts deep in the
//! handshake instead of having to find a valid record first.
//!
//! The certificate is made once with the `openssl` CLI into a temporary folder.
#![no_main]

use std::process::Command;
use std::sync::{Arc, OnceLock};

use gstrsmultifdsink::tls::{ServerConfig, ServerConnection, first_byte_kind, load_server_config};
use libfuzzer_sys::fuzz_target;

fn config() -> Arc<ServerConfig> {
    static CONFIG: OnceLock<Arc<ServerConfig>> = OnceLock::new();
    CONFIG
        .get_or_init(|| {
            let dir = std::env::temp_dir().join(format!("rsmfd-fuzz-tls-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            let cert = dir.join("cert.pem");
            let key = dir.join("key.pem");
            let out = Command::new("openssl")
                .args([
                    "req",
                    "-x509",
                    "-newkey",
                    "ec",
                    "-pkeyopt",
                    "ec_paramgen_curve:P-256",
                ])
                .args(["-nodes", "-days", "2", "-subj", "/CN=localhost"])
                .args(["-addext", "subjectAltName=DNS:localhost"])
                .arg("-keyout")
                .arg(&key)
                .arg("-out")
                .arg(&cert)
                .output()
                .expect("openssl");
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            let config = load_server_config(&cert, &key).unwrap();
            let _ = std::fs::remove_dir_all(&dir);
            config
        })
        .clone()
}

/// The first flight of a rustls client (ALPN http/1.1, SNI localhost).
fn client_hello() -> &'static [u8] {
    static HELLO: OnceLock<Vec<u8>> = OnceLock::new();
    HELLO.get_or_init(|| {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let name = "localhost".try_into().unwrap();
        let mut conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
        let mut out = Vec::new();
        while conn.wants_write() {
            conn.write_tls(&mut out).unwrap();
        }
        out
    })
}

fuzz_target!(|input: &[u8]| {
    let mutated;
    let data = match input.split_first() {
        Some((&mode, rest)) if mode & 1 == 1 => {
            let mut hello = client_hello().to_vec();
            let len = hello.len();
            for (i, b) in rest.iter().enumerate() {
                hello[i % len] ^= b;
            }
            // The mode byte's high bits cut it short, or not.
            let keep = hello.len() * usize::from(mode >> 1).max(1) / 127;
            hello.truncate(keep.max(1));
            mutated = hello;
            &mutated[..]
        }
        _ => input,
    };
    if let Some(&b) = data.first() {
        let _ = first_byte_kind(b);
    }
    let mut conn = ServerConnection::new(config()).unwrap();
    // In pieces of varying size, as reads return them: the first byte says how big.
    let step = usize::from(data.first().copied().unwrap_or(1)).max(1);
    let mut rest = data;
    let mut answer = Vec::new();
    while !rest.is_empty() {
        let mut piece = &rest[..step.min(rest.len())];
        let n = match conn.read_tls(&mut piece) {
            Ok(n) => n,
            Err(_) => break,
        };
        rest = &rest[n..];
        let processed = conn.process_new_packets();
        while conn.wants_write() {
            conn.write_tls(&mut answer).unwrap();
        }
        if processed.is_err() {
            // A failed connection gives the same error again, whatever follows.
            assert!(conn.process_new_packets().is_err());
            break;
        }
        if n == 0 {
            break;
        }
    }
});
