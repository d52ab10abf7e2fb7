//! What a TLS session that is done with its handshake holds on the heap, as the front-end keeps
//! one for each parked HTTPS connection: `SESSIONS` server sessions (rustls's unbuffered API,
//! the front-end's configuration: ring, TLS 1.3 and 1.2, tickets), each through a full
//! handshake with a rustls client in memory, kept; the heap in use (glibc's `mallinfo2`) before
//! and after, per session. The rest of what a parked connection costs the front-end's RSS
//! (`IDLE_CONNS=… benches/compare.sh`) is pages that these few live allocations keep from being
//! given back.
//!
//!     cargo bench --bench tls_session_memory
//!
//! Needs `openssl` for the certificate.

use std::process::Command;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::UnbufferedServerConnection;
use rustls::unbuffered::ConnectionState;

const SESSIONS: usize = 2000;

fn in_use() -> usize {
    // SAFETY: mallinfo2 only reads glibc's allocator statistics.
    unsafe { libc::mallinfo2().uordblks }
}

fn main() {
    let dir = std::env::temp_dir().join(format!("rip-tls-session-memory-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let made = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"])
        .args(["-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost"])
        // webpki refuses a CA as the end entity, which a bare `req -x509` makes.
        .args(["-addext", "basicConstraints=critical,CA:FALSE"])
        .args(["-keyout", "key.pem", "-out", "cert.pem"])
        .current_dir(&dir)
        .output();
    match made {
        Ok(out) if out.status.success() => {}
        Ok(out) => panic!("openssl could not make a certificate: {}", String::from_utf8_lossy(&out.stderr)),
        Err(e) => panic!("openssl could not be run ({e}): apt-get install openssl"),
    }
    let cert = CertificateDer::from_pem_file(dir.join("cert.pem")).unwrap();
    let key = PrivateKeyDer::from_pem_file(dir.join("key.pem")).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut server = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.clone()], key)
        .unwrap();
    server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    server.ticketer = rustls::crypto::ring::Ticketer::new().unwrap();
    let server = Arc::new(server);
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert).unwrap();

    println!("| client offers | heap in use per finished server session |");
    println!("|---|--:|");
    for (name, versions) in
        [("TLS 1.3", &[&rustls::version::TLS13][..]), ("TLS 1.2", &[&rustls::version::TLS12][..])]
    {
        let mut client = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(versions)
            .unwrap()
            .with_root_certificates(roots.clone())
            .with_no_client_auth();
        client.alpn_protocols = vec![b"http/1.1".to_vec()];
        let client = Arc::new(client);
        let mut kept = Vec::with_capacity(SESSIONS);
        let before = in_use();
        for _ in 0..SESSIONS {
            kept.push(Box::new(handshake(&server, &client)));
        }
        let per = (in_use() - before) as f64 / SESSIONS as f64;
        println!("| {name} | {:.2} KiB |", per / 1024.0);
        drop(kept);
    }
}

/// A server session through a whole handshake with a fresh client, the bytes passed in memory.
fn handshake(
    server: &Arc<rustls::ServerConfig>,
    client: &Arc<rustls::ClientConfig>,
) -> UnbufferedServerConnection {
    let name = "localhost".try_into().unwrap();
    let mut client = rustls::ClientConnection::new(client.clone(), name).unwrap();
    let mut session = UnbufferedServerConnection::new(server.clone()).unwrap();
    let mut incoming = Vec::new();
    let mut encoded = vec![0u8; 1 << 16];
    for _ in 0..16 {
        while client.wants_write() {
            client.write_tls(&mut incoming).unwrap();
        }
        let mut to_client = Vec::new();
        loop {
            let status = session.process_tls_records(&mut incoming);
            let discard = status.discard;
            let more = match status.state.expect("the handshake") {
                ConnectionState::EncodeTlsData(mut encode) => {
                    let n = encode.encode(&mut encoded).unwrap();
                    to_client.extend_from_slice(&encoded[..n]);
                    true
                }
                ConnectionState::TransmitTlsData(transmit) => {
                    transmit.done();
                    true
                }
                _ => false,
            };
            incoming.drain(..discard);
            if !more {
                break;
            }
        }
        let mut reading = &to_client[..];
        while !reading.is_empty() {
            client.read_tls(&mut reading).unwrap();
            client.process_new_packets().unwrap();
        }
        if !client.is_handshaking() && !session.is_handshaking() && !client.wants_write() {
            return session;
        }
    }
    panic!("the handshake did not finish");
}
