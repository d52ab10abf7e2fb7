//! Static files with --root: served, and never a file outside the root.
//!
//! Requests are written by hand on a `TcpStream`, so the request target reaches rip exactly
//! as an attacker would send it; an HTTP client would normalise `..` and escapes away.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::symlink;
use std::path::PathBuf;
use std::time::Duration;

use crate::harness::{header_value, status_code, Rip};

/// What the file outside the root holds; no response may ever contain it.
const SECRET: &str = "OUTSIDE-THE-ROOT-7f3a9c";

/// Starts `rip serve --root <dir>/www --workers 1` over this tree, in the test's own dir,
/// and returns that dir too:
///
/// ```text
/// outside/secret.txt, outside/index.html      SECRET
/// www/hello.txt                               "hello from the root"
/// www/sub/index.html, www/sub/deeper/page.txt
/// www/inner-link -> hello.txt                 stays inside: served
/// www/inner-dir-link -> sub                   stays inside: served
/// www/file-link -> ../outside/secret.txt      leaves: refused
/// www/abs-link -> <dir>/outside/secret.txt    leaves: refused
/// www/link-out -> ../outside                  leaves: refused
/// www/sub/deeper/up-link -> ../../../outside/secret.txt
/// ```
fn start() -> (Rip, PathBuf) {
    let builder = Rip::builder();
    let dir = builder.dir().to_path_buf();
    let outside = dir.join("outside");
    let www = dir.join("www");
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::create_dir_all(www.join("sub/deeper")).unwrap();
    std::fs::write(outside.join("secret.txt"), SECRET).unwrap();
    std::fs::write(outside.join("index.html"), SECRET).unwrap();
    std::fs::write(www.join("hello.txt"), "hello from the root").unwrap();
    std::fs::write(www.join("sub/index.html"), "<h1>sub index</h1>").unwrap();
    std::fs::write(www.join("sub/deeper/page.txt"), "deeper page").unwrap();
    symlink("hello.txt", www.join("inner-link")).unwrap();
    symlink("sub", www.join("inner-dir-link")).unwrap();
    symlink("../outside/secret.txt", www.join("file-link")).unwrap();
    symlink(outside.join("secret.txt"), www.join("abs-link")).unwrap();
    symlink("../outside", www.join("link-out")).unwrap();
    symlink("../../../outside/secret.txt", www.join("sub/deeper/up-link")).unwrap();
    let rip = builder
        .arg("--root")
        .arg(&www)
        .args(&["--workers", "1", "--cache-control", "public, max-age=60"])
        .start();
    (rip, dir)
}

/// A response as read off the wire.
#[derive(Debug)]
struct Raw {
    status: u16,
    head: String,
    body: String,
}

impl Raw {
    fn header(&self, name: &str) -> Option<&str> {
        header_value(&self.head, name)
    }
}

/// Sends `<method> <target> HTTP/1.1` byte for byte, with `Connection: close`, and reads the
/// whole answer.
fn send(addr: SocketAddr, method: &str, target: &str) -> Raw {
    send_with(addr, method, target, "")
}

/// Like [`send`], with `extra` header lines (each ending in `\r\n`).
fn send_with(addr: SocketAddr, method: &str, target: &str, extra: &str) -> Raw {
    let mut stream = TcpStream::connect(addr).expect("connecting to rip");
    stream.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    write!(stream, "{method} {target} HTTP/1.1\r\nHost: {addr}\r\n{extra}Connection: close\r\n\r\n").unwrap();
    let mut bytes = Vec::new();
    stream.read_to_end(&mut bytes).unwrap_or_else(|e| panic!("reading the answer to {target}: {e}"));
    let text = String::from_utf8_lossy(&bytes).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status =
        status_code(head).unwrap_or_else(|| panic!("no HTTP status in the answer to {target}: {text:?}"));
    Raw { status, head: head.to_string(), body: body.to_string() }
}

fn get(addr: SocketAddr, target: &str) -> Raw {
    send(addr, "GET", target)
}

#[test]
fn static_root_serves_files_and_directory_index_pages() {
    let (rip, _) = start();
    let addr = rip.addr();

    let file = get(addr, "/hello.txt");
    assert_eq!((file.status, file.body.as_str()), (200, "hello from the root"));
    assert_eq!(file.header("content-type"), Some("text/plain; charset=utf-8"));
    assert_eq!(file.header("content-length"), Some("19"));
    assert!(file.header("last-modified").is_some(), "{}", file.head);
    assert_eq!(file.header("cache-control"), Some("public, max-age=60"), "--cache-control");

    let head = send(addr, "HEAD", "/hello.txt");
    assert_eq!((head.status, head.body.as_str()), (200, ""));
    assert_eq!(head.header("content-length"), Some("19"));

    let index = get(addr, "/sub/");
    assert_eq!((index.status, index.body.as_str()), (200, "<h1>sub index</h1>"));
    assert_eq!(index.header("content-type"), Some("text/html; charset=utf-8"));
    let redirect = get(addr, "/sub");
    assert_eq!(redirect.status, 307);
    assert_eq!(redirect.header("location"), Some("/sub/"));

    let deeper = get(addr, "/sub/deeper/page.txt");
    assert_eq!((deeper.status, deeper.body.as_str()), (200, "deeper page"));
    let missing = get(addr, "/missing.txt");
    assert_eq!(
        (missing.status, missing.body.as_str()),
        (404, "404 not found\n"),
        "a blank page in a browser"
    );
    assert_eq!(send(addr, "DELETE", "/hello.txt").status, 405);
}

#[test]
fn static_root_answers_if_none_match_with_304_and_if_match_with_412() {
    let (rip, _) = start();
    let addr = rip.addr();
    let file = get(addr, "/hello.txt");
    let etag = file.header("etag").expect("an ETag").to_string();
    for matching in [etag.clone(), "*".to_string()] {
        let again = send_with(addr, "GET", "/hello.txt", &format!("If-None-Match: {matching}\r\n"));
        assert_eq!((again.status, again.body.as_str()), (304, ""), "If-None-Match: {matching}");
        assert_eq!(again.header("etag"), Some(etag.as_str()));
    }
    let changed = send_with(addr, "GET", "/hello.txt", "If-None-Match: \"an-old-version\"\r\n");
    assert_eq!((changed.status, changed.body.as_str()), (200, "hello from the root"));
    let precondition = send_with(addr, "GET", "/hello.txt", "If-Match: \"an-old-version\"\r\n");
    assert_eq!(precondition.status, 412);
}

#[test]
fn static_root_follows_links_that_stay_inside_it() {
    let (rip, _) = start();
    let addr = rip.addr();
    let link = get(addr, "/inner-link");
    assert_eq!((link.status, link.body.as_str()), (200, "hello from the root"));
    let through_dir = get(addr, "/inner-dir-link/deeper/page.txt");
    assert_eq!((through_dir.status, through_dir.body.as_str()), (200, "deeper page"));
    let index = get(addr, "/inner-dir-link/");
    assert_eq!((index.status, index.body.as_str()), (200, "<h1>sub index</h1>"));
}

#[test]
fn static_root_never_serves_a_file_outside_it() {
    let (rip, dir) = start();
    let addr = rip.addr();
    let outside = dir.join("outside/secret.txt");
    let absolute = format!("/{}", outside.display());
    let absolute_form = format!("http://{addr}/../outside/secret.txt");
    let attempts: Vec<&str> = vec![
        // Dot segments, plain and percent-encoded in every case mix.
        "/../outside/secret.txt",
        "/sub/../../outside/secret.txt",
        "/%2e%2e/outside/secret.txt",
        "/%2E%2E/outside/secret.txt",
        "/.%2e/outside/secret.txt",
        "/sub/%2e%2e/%2e%2e/outside/secret.txt",
        // Encoded slashes inside a segment.
        "/sub/..%2f..%2foutside%2fsecret.txt",
        "/..%2Foutside%2Fsecret.txt",
        // Double encoding is decoded once: the name `%2e%2e`, which does not exist.
        "/%252e%252e/outside/secret.txt",
        "/sub/..%252f..%252foutside%252fsecret.txt",
        // NUL, raw and encoded backslashes.
        "/outside/secret.txt%00",
        "/%00/../outside/secret.txt",
        "/..%5coutside%5csecret.txt",
        "/..%5Coutside%5Csecret.txt",
        "/..\\outside\\secret.txt",
        // Absolute paths: under the root, not from /.
        &absolute,
        "//etc/passwd",
        &absolute_form,
        // Links inside the root that lead out: to a file, to a directory, absolute, and
        // from deeper down or through a directory link that itself stays inside.
        "/file-link",
        "/abs-link",
        "/link-out/secret.txt",
        "/link-out/",
        "/link-out",
        "/sub/deeper/up-link",
        "/inner-dir-link/deeper/up-link",
        "/link-out/%2e%2e/outside/secret.txt",
    ];
    for target in attempts {
        let raw = get(addr, target);
        assert!(
            !raw.body.contains(SECRET) && !raw.head.contains(SECRET),
            "{target} leaked the file outside the root: {raw:?}"
        );
        assert!((400..500).contains(&raw.status), "{target} answered {}: {raw:?}", raw.status);
    }

    // Nothing above broke the worker.
    assert_eq!(get(addr, "/hello.txt").status, 200);
}

#[test]
fn static_root_serves_precompressed_siblings_within_it_and_covers_several_ranges() {
    let (rip, dir) = start();
    let addr = rip.addr();
    let www = dir.join("www");
    std::fs::write(www.join("hello.txt.gz"), "gzipped hello").unwrap();
    // A coded sibling that leaves the root is no sibling.
    std::fs::write(www.join("plain.txt"), "plain").unwrap();
    symlink("../outside/secret.txt", www.join("plain.txt.gz")).unwrap();

    let gz = send_with(addr, "GET", "/hello.txt", "Accept-Encoding: gzip\r\n");
    assert_eq!((gz.status, gz.body.as_str()), (200, "gzipped hello"));
    assert_eq!(gz.header("content-encoding"), Some("gzip"));
    assert_eq!(gz.header("vary"), Some("accept-encoding"));
    let plain = get(addr, "/hello.txt");
    assert_eq!((plain.status, plain.body.as_str()), (200, "hello from the root"));
    let kept_in = send_with(addr, "GET", "/plain.txt", "Accept-Encoding: gzip\r\n");
    assert_eq!((kept_in.status, kept_in.body.as_str()), (200, "plain"), "the sibling outside was served");
    assert!(!kept_in.body.contains(SECRET));

    let ranges = send_with(addr, "GET", "/hello.txt", "Range: bytes=0-1,5-6\r\n");
    assert_eq!((ranges.status, ranges.body.as_str()), (206, "hello f"));
    assert_eq!(ranges.header("content-range"), Some("bytes 0-6/19"));
}

/// The front-end answers files itself: with every worker stopped (SIGSTOP), 8 concurrent
/// keep-alive clients still get every file, and once the workers run again a missing file is
/// theirs to answer (the same short 404).
#[test]
fn files_are_served_by_the_front_end_itself_with_every_worker_stopped() {
    let builder = Rip::builder();
    let www = builder.dir().join("www");
    std::fs::create_dir_all(&www).unwrap();
    std::fs::write(www.join("hello.txt"), "hello from the root").unwrap();
    std::fs::write(www.join("index.html"), "<h1>home</h1>").unwrap();
    let rip = builder.arg("--root").arg(&www).args(&["--workers", "2"]).start_all_ready();
    let workers = rip.worker_pids();
    assert_eq!(workers.len(), 2);
    let signal_all = |signal| {
        for &pid in &workers {
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal).unwrap();
        }
    };
    signal_all(nix::sys::signal::Signal::SIGSTOP);
    let reports = crate::harness::runtime().block_on(async {
        let files =
            crate::harness::Load::get("/hello.txt").clients(8).total(400).deadline(Duration::from_secs(20));
        let index = crate::harness::Load::get("/").clients(2).total(50).deadline(Duration::from_secs(20));
        tokio::join!(files.run(rip.addr()), index.run(rip.addr()))
    });
    signal_all(nix::sys::signal::Signal::SIGCONT);
    for (report, body) in [(&reports.0, "hello from the root"), (&reports.1, "<h1>home</h1>")] {
        crate::harness::no_failures(report);
        assert!(report.bodies.iter().all(|b| b == body.as_bytes()), "{}", crate::harness::summary(report));
    }
    assert_eq!(reports.0.ok + reports.1.ok, 450);
    let missing = get(rip.addr(), "/missing.txt");
    assert_eq!((missing.status, missing.body.as_str()), (404, "404 not found\n"));
    let post = send(rip.addr(), "POST", "/hello.txt");
    assert_eq!(post.status, 405, "a worker answers what is not a GET or HEAD");
}

/// A file kept in memory is checked again at least once a second: a change on disk (written
/// in place, or replaced by a rename) is served, with a new tag, within a few seconds, and a
/// removed file becomes a 404.
#[test]
fn a_changed_file_is_served_anew_within_a_second() {
    let (rip, dir) = start();
    let path = dir.join("www/hello.txt");
    let first = get(rip.addr(), "/hello.txt");
    assert_eq!(first.body, "hello from the root");
    let until = |what: &str, pred: &dyn Fn(&Raw) -> bool| -> Raw {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let raw = get(rip.addr(), "/hello.txt");
            if pred(&raw) {
                return raw;
            }
            assert!(std::time::Instant::now() < deadline, "{what} not seen within 5 s: {raw:?}");
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    std::fs::write(&path, "HELLO FROM THE ROOT").unwrap();
    let written = until("a write in place", &|raw| raw.body == "HELLO FROM THE ROOT");
    assert_ne!(written.header("etag"), first.header("etag"));
    std::fs::write(dir.join("www/.next"), "replaced by a deploy").unwrap();
    std::fs::rename(dir.join("www/.next"), &path).unwrap();
    until("a replacement", &|raw| raw.body == "replaced by a deploy");
    std::fs::remove_file(&path).unwrap();
    let gone = until("a removal", &|raw| raw.status == 404);
    assert_eq!(gone.body, "404 not found\n");
}

/// `root` re-read on reload: the front-end serves the new directory's files once the reload
/// is done, and a root that is not a directory is refused with the old one still served.
#[test]
fn reload_moves_the_front_end_to_a_new_root_and_refuses_a_missing_one() {
    let builder = Rip::builder();
    let dir = builder.dir().to_path_buf();
    for (name, body) in [("a", "from root a"), ("b", "from root b")] {
        std::fs::create_dir_all(dir.join(name)).unwrap();
        std::fs::write(dir.join(name).join("page.txt"), body).unwrap();
    }
    let config = dir.join("rip.toml");
    let write_root = |root: &std::path::Path| {
        std::fs::write(&config, format!("workers = 1\nroot = {:?}\n", root.display().to_string())).unwrap();
    };
    write_root(&dir.join("a"));
    let rip = builder.arg("--config").arg(&config).start_all_ready();
    assert_eq!(get(rip.addr(), "/page.txt").body, "from root a");
    let control = crate::harness::Control::of(&rip);
    write_root(&dir.join("b"));
    let out = control.run(&["reload", "--wait"]);
    assert!(out.status.success(), "{}", out.stderr);
    assert_eq!(get(rip.addr(), "/page.txt").body, "from root b");
    write_root(&dir.join("nowhere"));
    let out = control.run(&["reload", "--wait"]);
    assert!(!out.status.success(), "a missing root must be refused");
    let said = &out.stderr;
    assert!(said.contains("nowhere"), "the refusal names the root: {said}");
    assert_eq!(get(rip.addr(), "/page.txt").body, "from root b");
}
