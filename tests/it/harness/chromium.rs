//! Headless Chromium driven over the DevTools protocol, for the status page: the page loads
//! once, and the test reads its DOM again and again (`Runtime.evaluate`) while rip changes
//! under it. Debian's `chromium` is installed when absent (as root, with apt-get); without it
//! the test fails and says how to install it.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::websocket::WebSocket;
use super::TempDir;

/// The browser binary, installed first if need be.
fn chromium() -> PathBuf {
    static INSTALL: Mutex<()> = Mutex::new(());
    let _one_at_a_time = INSTALL.lock().unwrap_or_else(|e| e.into_inner());
    let found =
        || ["/usr/bin/chromium", "/usr/bin/chromium-browser"].iter().map(PathBuf::from).find(|p| p.exists());
    if let Some(path) = found() {
        return path;
    }
    let apt = |args: &[&str]| {
        Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if nix::unistd::geteuid().is_root() && !apt(&["install", "-y", "-q", "chromium"]) {
        apt(&["update", "-q"]);
        apt(&["install", "-y", "-q", "chromium"]);
    }
    found().unwrap_or_else(|| {
        panic!("the status page test needs Chromium and could not install it: apt-get install chromium (as root)")
    })
}

/// A headless Chromium showing one page, killed (with its helper processes) on drop.
pub struct Browser {
    child: Child,
    page: WebSocket,
    next_id: u64,
    _profile: TempDir,
}

impl Browser {
    pub fn open(url: &str) -> Browser {
        let profile = TempDir::new();
        let mut child = Command::new(chromium())
            .args([
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--remote-debugging-port=0",
                "--remote-allow-origins=*",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg(url)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .process_group(0)
            .spawn()
            .expect("starting chromium");
        // "DevTools listening on ws://127.0.0.1:PORT/devtools/browser/…"
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(rest) = line.split("ws://127.0.0.1:").nth(1) {
                    let _ = tx.send(rest.split('/').next().unwrap_or_default().to_string());
                }
            }
        });
        let port: u16 = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("chromium did not say where its DevTools listen")
            .parse()
            .expect("a DevTools port");
        let devtools = SocketAddr::from(([127, 0, 0, 1], port));
        let path = page_socket(devtools, url);
        let page = WebSocket::connect(devtools, &path);
        Browser { child, page, next_id: 1, _profile: profile }
    }

    /// The value of `expression` evaluated in the page.
    pub fn eval(&mut self, expression: &str) -> serde_json::Value {
        let id = self.next_id;
        self.next_id += 1;
        let call = serde_json::json!({
            "id": id,
            "method": "Runtime.evaluate",
            "params": { "expression": expression, "returnByValue": true },
        });
        self.page.send_text(&call.to_string());
        loop {
            let text = self.page.read_text(Duration::from_secs(10));
            let answer: serde_json::Value = serde_json::from_str(&text).expect("a DevTools message");
            if answer["id"] == id {
                return answer["result"]["result"]["value"].clone();
            }
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let group = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL);
        let _ = self.child.wait();
    }
}

/// The DevTools WebSocket path of the page showing `url`, once the browser lists it.
fn page_socket(devtools: SocketAddr, url: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(path) = list_pages(devtools).into_iter().find_map(|page| {
            let is_ours = page["type"] == "page" && page["url"].as_str().is_some_and(|u| u.starts_with(url));
            let socket = page["webSocketDebuggerUrl"].as_str()?;
            let path = socket.split_once("://")?.1.split_once('/')?.1;
            is_ours.then(|| format!("/{path}"))
        }) {
            return path;
        }
        assert!(Instant::now() < deadline, "chromium never listed a page for {url}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn list_pages(devtools: SocketAddr) -> Vec<serde_json::Value> {
    let Ok(mut stream) = TcpStream::connect(devtools) else { return Vec::new() };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let request = format!("GET /json/list HTTP/1.1\r\nHost: {devtools}\r\nConnection: close\r\n\r\n");
    if stream.write_all(request.as_bytes()).is_err() {
        return Vec::new();
    }
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    let body = response.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    serde_json::from_str(body).unwrap_or_default()
}
