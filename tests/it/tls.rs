//! HTTPS on the listener: curl over HTTP/1.1 and HTTP/2 (ALPN) and Python's `ssl` reach the
//! workers, which are told `X-Forwarded-Proto: https`; the certificate is chosen by SNI; on
//! SIGHUP new certificates are read while an open keep-alive connection keeps working and a
//! new one sees the new certificate; a bad pair is refused at start and on reload (the old one
//! keeps serving); a client that never finishes its handshake is closed; idle connections are
//! parked and served again on the same session, and closed with a close_notify; large bodies
//! stream both ways over TLS 1.2 and 1.3, HTTP/1.1 and HTTP/2, many at once; a TLS 1.3 client's
//! key updates and a TLS 1.2 session park and wake like the rest, and a client's close_notify
//! is answered with rip's.
//!
//! Certificates are made for each test with the `openssl` command (Debian: apt install
//! openssl); a test fails, saying so, when it is missing.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use crate::harness::{log_addr, wait_until, Control, Rip, TempDir, WAIT};
use crate::parking::{parked, read_answer_from};

/// A test CA and leaf certificates signed by it, in a directory of their own.
struct Certs {
    dir: TempDir,
}

impl Certs {
    fn new() -> Certs {
        let certs = Certs { dir: TempDir::new() };
        certs.request(&["-x509", "-days", "2"], "ca.key", "ca.pem", "/CN=rip test CA");
        certs
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `openssl req` with a new P-256 key in `key`: a CSR, or with `-x509` a certificate.
    fn request(&self, extra: &[&str], key: &str, out: &str, subject: &str) {
        let mut args = vec!["req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
        args.extend_from_slice(extra);
        args.extend_from_slice(&["-keyout", key, "-out", out, "-subj", subject]);
        self.openssl(&args);
    }

    fn openssl(&self, args: &[&str]) {
        let out = Command::new("openssl").args(args).current_dir(self.dir.path()).output();
        let out = out.unwrap_or_else(|e| {
            panic!("openssl could not be run ({e}): the TLS tests make certificates with it (apt install openssl)")
        });
        assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// `<name>.pem` and `<name>.key`, for `dns` and 127.0.0.1, signed by the CA.
    fn leaf(&self, name: &str, dns: &str) -> (PathBuf, PathBuf) {
        let (key, csr, pem, ext) =
            (format!("{name}.key"), format!("{name}.csr"), format!("{name}.pem"), format!("{name}.ext"));
        std::fs::write(self.path(&ext), format!("subjectAltName=DNS:{dns},IP:127.0.0.1\n")).unwrap();
        self.request(&[], &key, &csr, &format!("/CN={dns}"));
        self.openssl(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            &pem,
            "-days",
            "2",
            "-extfile",
            &ext,
        ]);
        (self.path(&pem), self.path(&key))
    }

    /// The serial number of a certificate file, as Python's `getpeercert` shows it.
    fn serial(&self, pem: &Path) -> String {
        let out =
            Command::new("openssl").args(["x509", "-noout", "-serial", "-in"]).arg(pem).output().unwrap();
        String::from_utf8_lossy(&out.stdout).trim().trim_start_matches("serial=").to_uppercase()
    }
}

/// rip with `--tls-cert`/`--tls-key`, every worker ready (readiness is read from the log: the
/// harness's own probe speaks plain HTTP).
fn serve_tls(certs: &[(PathBuf, PathBuf)], extra: &[&str]) -> Rip {
    let join =
        |paths: Vec<&PathBuf>| paths.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(",");
    let cert = join(certs.iter().map(|(c, _)| c).collect());
    let key = join(certs.iter().map(|(_, k)| k).collect());
    let rip = Rip::builder()
        .args(&["--workers", "2", "--tls-cert", &cert, "--tls-key", &key])
        .args(extra)
        .start_listening();
    rip.wait_all_ready();
    rip
}

/// curl over HTTPS to `host` (resolved to 127.0.0.1), trusting the test CA: (HTTP version, body).
fn curl(rip: &Rip, certs: &Certs, host: &str, path: &str, version: &str) -> (String, String) {
    let port = rip.addr().port();
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "10", version, "--cacert"])
        .arg(certs.path("ca.pem"))
        .args(["--resolve", &format!("{host}:{port}:127.0.0.1"), "-w", "\n%{http_version}"])
        .arg(format!("https://{host}:{port}{path}"))
        .output()
        .expect("running curl");
    assert!(out.status.success(), "curl https://{host}{path}: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, version) = text.rsplit_once('\n').unwrap();
    (version.to_string(), body.to_string())
}

#[test]
fn https_over_http1_and_http2_reaches_the_workers_with_x_forwarded_proto_https() {
    let certs = Certs::new();
    let pair = certs.leaf("a", "localhost");
    let rip = serve_tls(&[pair], &[]);
    let (version, body) = curl(&rip, &certs, "localhost", "/", "--http1.1");
    assert_eq!(version, "1.1");
    assert!(body.starts_with("Hello from rip worker"), "{body}");
    let (version, body) = curl(&rip, &certs, "localhost", "/headers", "--http2");
    assert_eq!(version, "2", "ALPN h2");
    assert!(body.contains(r#""x-forwarded-proto":"https""#), "{body}");

    // Python's ssl module, as a Python client would use it.
    let script = "import http.client, ssl, sys\n\
        ctx = ssl.create_default_context(cafile=sys.argv[2])\n\
        c = http.client.HTTPSConnection('localhost', int(sys.argv[1]), context=ctx)\n\
        for _ in range(3):\n    c.request('GET', '/whoami'); r = c.getresponse(); r.read(); print(r.status, c.sock.version())\n";
    let out = Command::new("python3")
        .args(["-c", script, &rip.addr().port().to_string()])
        .arg(certs.path("ca.pem"))
        .output()
        .expect("python3 is needed (apt install python3)");
    let said = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        said.lines().filter(|l| l.starts_with("200 TLSv1.")).count(),
        3,
        "{said} {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // TLS 1.2 and 1.3 both, and a second connection resumes the first one's session.
    let script = r#"
import socket, ssl, sys
for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
    ctx = ssl.create_default_context(cafile=sys.argv[2])
    ctx.maximum_version = version
    session = None
    for attempt in range(2):
        raw = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
        s = ctx.wrap_socket(raw, server_hostname="localhost", session=session)
        s.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        answer = b""
        while chunk := s.recv(4096):
            answer += chunk
        print(s.version(), answer.split(b" ")[1].decode(), "reused" if s.session_reused else "new")
        session = s.session
        s.close()
"#;
    let out = Command::new("python3")
        .args(["-c", script, &rip.addr().port().to_string()])
        .arg(certs.path("ca.pem"))
        .output()
        .expect("python3");
    let said = String::from_utf8_lossy(&out.stdout);
    let expected = "TLSv1.2 200 new\nTLSv1.2 200 reused\nTLSv1.3 200 new\nTLSv1.3 200 reused\n";
    assert_eq!(said, expected, "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn the_certificate_is_chosen_by_the_name_the_client_asks_for() {
    let certs = Certs::new();
    let first = certs.leaf("a", "localhost");
    let other = certs.leaf("o", "other.test");
    let rip = serve_tls(&[first, other], &[]);
    // curl checks that the certificate is valid for the name: each name gets its own.
    assert_eq!(curl(&rip, &certs, "other.test", "/", "--http1.1").0, "1.1");
    assert_eq!(curl(&rip, &certs, "localhost", "/", "--http2").0, "2");
}

#[test]
fn sighup_reads_new_certificates_an_open_connection_keeps_working_and_a_bad_pair_is_refused() {
    let certs = Certs::new();
    let (a_pem, a_key) = certs.leaf("a", "localhost");
    let (b_pem, b_key) = certs.leaf("b", "localhost");
    let (live_pem, live_key) = (certs.path("live.pem"), certs.path("live.key"));
    std::fs::copy(&a_pem, &live_pem).unwrap();
    std::fs::copy(&a_key, &live_key).unwrap();
    let rip = serve_tls(&[(live_pem.clone(), live_key.clone())], &[]);

    let script = "import http.client, ssl, sys\n\
        ctx = ssl.create_default_context(cafile=sys.argv[2])\n\
        def conn():\n    c = http.client.HTTPSConnection('localhost', int(sys.argv[1]), context=ctx); c.connect(); return c\n\
        def get(c):\n    c.request('GET', '/whoami'); r = c.getresponse(); r.read(); return r.status\n\
        old = conn()\nprint('old', get(old), old.sock.getpeercert()['serialNumber'], flush=True)\n\
        sys.stdin.readline()\nprint('kept', get(old), flush=True)\n\
        new = conn()\nprint('new', get(new), new.sock.getpeercert()['serialNumber'], flush=True)\n";
    let mut python = Command::new("python3")
        .args(["-c", script, &rip.addr().port().to_string()])
        .arg(certs.path("ca.pem"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3 is needed (apt install python3)");
    let mut lines = BufReader::new(python.stdout.take().unwrap()).lines();
    let mut next = || lines.next().and_then(Result::ok).unwrap_or_default();
    assert_eq!(next(), format!("old 200 {}", certs.serial(&a_pem)));

    // A renewal: new files at the same paths, then a reload.
    std::fs::copy(&b_pem, &live_pem).unwrap();
    std::fs::copy(&b_key, &live_key).unwrap();
    let mark = rip.log_mark();
    rip.signal(Signal::SIGHUP);
    rip.wait_for_log_from(mark, |l| l.contains(" reload finished"), WAIT).expect("the reload finished");
    python.stdin.as_mut().unwrap().write_all(b"\n").unwrap();
    assert_eq!(next(), "kept 200", "the connection opened before the reload");
    assert_eq!(
        next(),
        format!("new 200 {}", certs.serial(&b_pem)),
        "a new connection gets the new certificate"
    );
    let _ = python.wait();

    // A key that is not the certificate's, then a file that is no certificate: each reload is
    // refused, naming the file, and the pair in use keeps serving.
    let control = Control::of(&rip);
    std::fs::copy(&a_key, &live_key).unwrap();
    let refused = control.run(&["reload", "--wait"]);
    assert_eq!(refused.status.code(), Some(1), "{refused:?}");
    assert!(
        refused.stderr.contains("does not match the certificate") && refused.stderr.contains("live.key"),
        "{refused:?}"
    );
    std::fs::write(&live_pem, "not a certificate\n").unwrap();
    let refused = control.run(&["reload", "--wait"]);
    assert_eq!(refused.status.code(), Some(1), "{refused:?}");
    assert!(refused.stderr.contains("live.pem"), "{refused:?}");
    assert_eq!(curl(&rip, &certs, "localhost", "/", "--http1.1").0, "1.1", "the old pair still serves");
}

#[test]
fn a_bad_pair_stops_rip_at_start_with_one_line_naming_the_file() {
    let certs = Certs::new();
    let (pem, _) = certs.leaf("a", "localhost");
    let (_, other_key) = certs.leaf("b", "localhost");
    for (cert, key, says) in [
        (pem.clone(), other_key.clone(), "does not match the certificate"),
        (certs.path("missing.pem"), other_key.clone(), "missing.pem"),
        (pem.clone(), pem.clone(), "no private key in"),
    ] {
        let mut rip = Rip::builder().args(&["--tls-cert"]).arg(&cert).arg("--tls-key").arg(&key).spawn();
        let status = rip.wait_exit(WAIT);
        assert_eq!(status.code(), Some(1));
        let logs = rip.logs();
        let last = logs.iter().rev().find(|l| !l.trim().is_empty()).cloned().unwrap_or_default();
        assert!(last.starts_with("rip: ") && last.contains(says), "{logs:#?}");
    }
}

#[test]
fn a_client_that_never_finishes_its_handshake_is_closed_after_the_header_timeout() {
    let certs = Certs::new();
    let pair = certs.leaf("a", "localhost");
    let rip = serve_tls(&[pair], &["--header-timeout", "1s"]);
    let mut silent = std::net::TcpStream::connect(rip.addr()).unwrap();
    let mut half = std::net::TcpStream::connect(rip.addr()).unwrap();
    // The first bytes of a ClientHello record, and no more.
    half.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01]).unwrap();
    let started = Instant::now();
    for stream in [&mut silent, &mut half] {
        stream.set_read_timeout(Some(WAIT)).unwrap();
        let mut buf = [0u8; 64];
        let n = stream.read(&mut buf).unwrap_or(0);
        assert_eq!(n, 0, "expected the connection closed");
    }
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(900) && took < Duration::from_secs(5), "closed after {took:?}");
}

#[test]
fn the_plain_redirect_listener_sends_clients_to_https_on_the_main_port() {
    let certs = Certs::new();
    let pair = certs.leaf("a", "localhost");
    let rip = serve_tls(&[pair], &["--http-redirect", "127.0.0.1:0"]);
    let plain: std::net::SocketAddr = rip
        .wait_for_log(|l| l.contains(" http redirect listener started "), WAIT)
        .and_then(|l| crate::harness::log_field(&l, "addr").and_then(|a| a.parse().ok()))
        .expect("the redirect listener's address is logged");
    // curl follows the redirect from plain HTTP to the TLS port and checks the certificate.
    let port = rip.addr().port();
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "10", "-L", "-w", "\n%{url_effective} %{http_code}", "--cacert"])
        .arg(certs.path("ca.pem"))
        .args(["--resolve", &format!("localhost:{}:127.0.0.1", plain.port())])
        .args(["--resolve", &format!("localhost:{port}:127.0.0.1")])
        .arg(format!("http://localhost:{}/whoami?x=1", plain.port()))
        .output()
        .expect("running curl");
    let text = String::from_utf8_lossy(&out.stdout);
    let last = text.lines().last().unwrap_or_default();
    assert_eq!(
        last,
        format!("https://localhost:{port}/whoami?x=1 200"),
        "{text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A keep-alive HTTPS client of its own (rustls, HTTP/1.1, trusting the test CA).
struct TlsClient(rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream>);

impl TlsClient {
    fn connect(rip: &Rip, certs: &Certs) -> TlsClient {
        TlsClient::connect_over(rip, certs, rustls::DEFAULT_VERSIONS)
    }

    /// A client that offers only `versions`.
    fn connect_over(
        rip: &Rip,
        certs: &Certs,
        versions: &[&'static rustls::SupportedProtocolVersion],
    ) -> TlsClient {
        TlsClient::connect_offering(rip, certs, versions, Vec::new())
    }

    /// A client that offers only `versions`, and `alpn` by ALPN.
    fn connect_offering(
        rip: &Rip,
        certs: &Certs,
        versions: &[&'static rustls::SupportedProtocolVersion],
        alpn: Vec<Vec<u8>>,
    ) -> TlsClient {
        use rustls::pki_types::pem::PemObject;
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls::pki_types::CertificateDer::pem_file_iter(certs.path("ca.pem")).unwrap() {
            roots.add(cert.unwrap()).unwrap();
        }
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(versions)
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = alpn;
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let session = rustls::ClientConnection::new(std::sync::Arc::new(config), name).unwrap();
        let socket = std::net::TcpStream::connect(rip.addr()).unwrap();
        socket.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        TlsClient(rustls::StreamOwned::new(session, socket))
    }

    /// Sends `bytes` as one TLS record.
    fn send(&mut self, bytes: &[u8]) {
        self.0.write_all(bytes).unwrap();
        self.0.flush().unwrap();
    }

    fn get(&mut self, path: &str) -> (u16, String) {
        self.send(format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").as_bytes());
        read_answer_from(&mut self.0)
    }

    /// Waits for the server to end the connection; whether it said close_notify first (a
    /// close without one is an unexpected EOF to rustls).
    fn closed_cleanly(&mut self) -> bool {
        let mut byte = [0u8; 1];
        match self.0.read(&mut byte) {
            Ok(0) => true,
            Ok(_) => panic!("bytes where a close was expected"),
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => false,
            Err(e) => panic!("no close: {e}"),
        }
    }
}

/// HTTPS keep-alive connections park like plain ones — in the shard's lot, their sessions
/// kept with their sockets out of the runtime — and are served again on the same session,
/// many woken at once from threads of their own, a request split over two records among them;
/// at the idle limit and on a stop each is closed with a close_notify.
#[test]
fn idle_https_connections_are_parked_served_again_and_closed_with_a_close_notify() {
    const CLIENTS: usize = 20;
    let certs = Certs::new();
    let pair = certs.leaf("a", "localhost");
    let args = ["--admin", "127.0.0.1:0", "--header-timeout", "4s", "--access-log", "off"];
    let mut rip = serve_tls(&[pair], &args);
    let admin = rip
        .wait_for_log(|l| l.contains(" admin listener started "), WAIT)
        .and_then(|l| log_addr(&l))
        .expect("the admin address is logged");
    let mut clients: Vec<TlsClient> = (0..CLIENTS).map(|_| TlsClient::connect(&rip, &certs)).collect();
    for client in &mut clients {
        assert_eq!(client.get("/").0, 200);
    }
    assert!(wait_until(Duration::from_secs(10), || parked(admin) >= CLIENTS), "{} parked", parked(admin));

    let woken: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(i, mut client)| {
            std::thread::spawn(move || {
                let (status, body) = if i % 2 == 0 {
                    client.get("/whoami")
                } else {
                    client.send(b"GET /who");
                    client.send(b"ami HTTP/1.1\r\nHost: localhost\r\n\r\n");
                    read_answer_from(&mut client.0)
                };
                assert_eq!(status, 200, "{body}");
                assert!(body.contains("\"pid\""), "{body}");
                client
            })
        })
        .collect();
    let mut clients: Vec<TlsClient> = woken.into_iter().map(|t| t.join().expect("a woken client")).collect();
    assert!(wait_until(Duration::from_secs(10), || parked(admin) >= CLIENTS), "not parked again");
    assert_eq!(clients[0].get("/").0, 200, "served a second time");

    // Past --header-timeout since their last requests, the others are closed from the lot.
    let since = Instant::now();
    for client in &mut clients[1..] {
        assert!(client.closed_cleanly(), "closed at the idle limit without a close_notify");
    }
    assert!(since.elapsed() < Duration::from_secs(6), "closed after {:?}", since.elapsed());

    drop(clients);
    assert!(wait_until(Duration::from_secs(5), || parked(admin) == 0), "a closed client stayed parked");
    let mut waiting = TlsClient::connect(&rip, &certs);
    assert_eq!(waiting.get("/").0, 200);
    assert!(wait_until(Duration::from_secs(5), || parked(admin) >= 1), "never parked");
    let stopped = Instant::now();
    rip.signal(Signal::SIGTERM);
    assert!(waiting.closed_cleanly(), "closed on the stop without a close_notify");
    assert!(rip.wait_exit(Duration::from_secs(10)).success());
    assert!(stopped.elapsed() < Duration::from_secs(5), "the stop took {:?}", stopped.elapsed());
}

/// A 1 MiB upload echoed back through the front-end's TLS session, eight at once over both
/// TLS versions and both HTTP versions: every byte comes back, in order, on every one. Records
/// split and join at every boundary a read or a write makes, and each direction waits on the
/// other's window while both are in flight.
#[test]
fn large_bodies_stream_both_ways_over_tls_1_2_and_1_3_on_http1_and_http2_at_once() {
    let certs = Certs::new();
    let pair = certs.leaf("a", "localhost");
    let rip = serve_tls(&[pair], &["--access-log", "off"]);
    let port = rip.addr().port();
    let mut state: u32 = 0x2545_f491;
    let body: Vec<u8> = (0..1 << 20)
        .map(|_| {
            state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (state >> 24) as u8
        })
        .collect();
    let upload = certs.path("upload.bin");
    std::fs::write(&upload, &body).unwrap();
    let variants = [
        ["--tlsv1.2", "--tls-max", "1.2", "--http1.1"],
        ["--tlsv1.2", "--tls-max", "1.2", "--http2"],
        ["--tlsv1.3", "--tls-max", "1.3", "--http1.1"],
        ["--tlsv1.3", "--tls-max", "1.3", "--http2"],
    ];
    let curls: Vec<_> = (0..8)
        .map(|i| {
            let out = certs.path(&format!("echoed-{i}.bin"));
            let child = Command::new("curl")
                .args(["-sS", "--max-time", "30", "--cacert"])
                .arg(certs.path("ca.pem"))
                .args(variants[i % variants.len()])
                .args([
                    "--resolve",
                    &format!("localhost:{port}:127.0.0.1"),
                    "-w",
                    "%{http_code} %{http_version}",
                ])
                .arg("--data-binary")
                .arg(format!("@{}", upload.display()))
                .arg("-o")
                .arg(&out)
                .arg(format!("https://localhost:{port}/echo"))
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("running curl");
            (i, out, child)
        })
        .collect();
    for (i, out, child) in curls {
        let done = child.wait_with_output().unwrap();
        let shown = String::from_utf8_lossy(&done.stdout);
        assert!(
            done.status.success(),
            "curl {:?}: {}",
            variants[i % 4],
            String::from_utf8_lossy(&done.stderr)
        );
        let expected_version = if variants[i % 4][3] == "--http2" { "2" } else { "1.1" };
        assert_eq!(shown, format!("200 {expected_version}"), "{:?}", variants[i % 4]);
        let echoed = std::fs::read(&out).unwrap();
        assert_eq!(echoed.len(), body.len(), "{:?}: echoed length", variants[i % 4]);
        assert!(echoed == body, "{:?}: the echo differs from the upload", variants[i % 4]);
    }
}

/// A TLS 1.3 client that updates its keys, asking rip to update its own, keeps being served,
/// before and after its connection is parked and woken; a TLS 1.2 session parks and wakes the
/// same way; a client's close_notify is answered with rip's before the connection closes.
#[test]
fn key_updates_and_tls_1_2_sessions_are_served_across_parking_and_a_close_notify_is_answered() {
    let certs = Certs::new();
    let pair = certs.leaf("a", "localhost");
    let rip = serve_tls(&[pair], &["--admin", "127.0.0.1:0", "--access-log", "off"]);
    let admin = rip
        .wait_for_log(|l| l.contains(" admin listener started "), WAIT)
        .and_then(|l| log_addr(&l))
        .expect("the admin address is logged");
    let mut modern = TlsClient::connect_over(&rip, &certs, &[&rustls::version::TLS13]);
    let mut older = TlsClient::connect_over(&rip, &certs, &[&rustls::version::TLS12]);
    for round in 0..3 {
        assert_eq!(modern.get("/").0, 200, "round {round}");
        modern.0.conn.refresh_traffic_keys().expect("a key update");
        assert_eq!(modern.get("/whoami").0, 200, "round {round}, after a key update");
        assert_eq!(older.get("/").0, 200, "round {round}, TLS 1.2");
    }
    assert_eq!(modern.0.conn.protocol_version(), Some(rustls::ProtocolVersion::TLSv1_3));
    assert_eq!(older.0.conn.protocol_version(), Some(rustls::ProtocolVersion::TLSv1_2));
    assert!(wait_until(Duration::from_secs(10), || parked(admin) >= 2), "{} parked", parked(admin));
    modern.0.conn.refresh_traffic_keys().expect("a key update");
    assert_eq!(modern.get("/").0, 200, "woken by a key update and a request");
    assert_eq!(older.get("/").0, 200, "a TLS 1.2 session woken");

    for mut client in [modern, older] {
        client.0.conn.send_close_notify();
        client.0.flush().unwrap();
        assert!(client.closed_cleanly(), "a client's close_notify was not answered with one");
    }
    assert!(wait_until(Duration::from_secs(5), || parked(admin) == 0), "a closed client stayed parked");
}

/// A session reads a small first part of a client's first flight, so that what a handshake
/// leaves on the heap is small; a hello many times that size (a long ALPN list, as browsers'
/// post-quantum key shares make them too) grows the buffer read by read and is answered,
/// over TLS 1.2 and 1.3, by several clients at once.
#[test]
fn a_client_hello_larger_than_the_first_read_is_answered_over_tls_1_2_and_1_3() {
    let certs = Certs::new();
    let pair = certs.leaf("a", "localhost");
    let rip = serve_tls(&[pair], &["--access-log", "off"]);
    // 24 names of 250 bytes: a hello of about 6 KiB, then the one rip speaks.
    let mut alpn: Vec<Vec<u8>> =
        (0..24).map(|i| format!("x-{i:02}-{}", "p".repeat(245)).into_bytes()).collect();
    alpn.push(b"http/1.1".to_vec());
    let versions = [&rustls::version::TLS13, &rustls::version::TLS12];
    std::thread::scope(|scope| {
        let clients: Vec<_> = (0..6)
            .map(|i| {
                let (rip, certs, alpn) = (&rip, &certs, alpn.clone());
                let version: &'static rustls::SupportedProtocolVersion = versions[i % 2];
                scope.spawn(move || {
                    let mut client = TlsClient::connect_offering(rip, certs, &[version], alpn);
                    let (status, _) = client.get("/");
                    assert_eq!(status, 200, "{:?}", version.version);
                    assert_eq!(client.0.conn.protocol_version(), Some(version.version));
                    assert_eq!(
                        client.0.conn.alpn_protocol(),
                        Some(&b"http/1.1"[..]),
                        "{:?}",
                        version.version
                    );
                })
            })
            .collect();
        for client in clients {
            client.join().expect("a client with a large hello");
        }
    });
}

/// Sessions on one thread read into one buffer, lent for a read and its decoding; a session
/// left with part of a record keeps what it read while the others read theirs. A request's
/// record sent in parts (inside its header, then inside its payload), with other clients
/// shaking hands and being served on the same shard between the parts, is answered whole.
#[test]
fn a_record_split_across_reads_is_kept_while_other_sessions_on_the_shard_read() {
    let certs = Certs::new();
    let pair = certs.leaf("a", "localhost");
    let rip = serve_tls(&[pair], &["--shards", "1", "--access-log", "off"]);
    let mut split = TlsClient::connect_over(&rip, &certs, &[&rustls::version::TLS13]);
    assert_eq!(split.get("/").0, 200);
    for round in 0..2 {
        split.0.conn.writer().write_all(b"GET /whoami HTTP/1.1\r\nHost: localhost\r\n\r\n").unwrap();
        let mut record = Vec::new();
        while split.0.conn.wants_write() {
            split.0.conn.write_tls(&mut record).unwrap();
        }
        let cuts = [0, 3, record.len() / 2, record.len()];
        for part in cuts.windows(2) {
            split.0.sock.write_all(&record[part[0]..part[1]]).unwrap();
            split.0.sock.flush().unwrap();
            if part[1] == record.len() {
                break;
            }
            std::thread::scope(|scope| {
                let others: Vec<_> = (0..3)
                    .map(|_| {
                        scope.spawn(|| {
                            let mut other = TlsClient::connect(&rip, &certs);
                            (0..3).map(|_| other.get("/").0).collect::<Vec<_>>()
                        })
                    })
                    .collect();
                for other in others {
                    assert_eq!(other.join().unwrap(), [200, 200, 200], "round {round}");
                }
            });
        }
        let (status, body) = read_answer_from(&mut split.0);
        assert_eq!(status, 200, "round {round}: {body}");
    }
}
