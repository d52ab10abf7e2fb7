//! Static files from a root directory. Invariant: no request can read a file outside the
//! root, whether by `..`, encoded separators, or a symbolic link that points out of it,
//! because the kernel resolves every path relative to a descriptor of the root and refuses
//! to leave it, and what is served is exactly the file that was resolved.
//!
//! Why not tower-http's `ServeDir` plus a `canonicalize()` check: the check and `ServeDir`
//! decode the request path separately and resolve it separately, so a link swapped in
//! between the check and the open (by anyone who can write under the root) is followed
//! out, and any difference between the two decoders is a hole. Here the path is decoded
//! once ([`decode`]), resolved once with `openat2(RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS)`
//! to an `O_PATH` descriptor, and that descriptor's file is handed to tower-http's
//! `ServeFile` through `/proc/self/fd/N`, which reopens that inode itself, not a path. So
//! `ServeFile` still does the HTTP of large files and ranges: HEAD, Content-Length,
//! Last-Modified, If-Modified-Since, ranges. What it lacks, entity tags, is done here
//! ([`validate`]): a strong ETag from the file's inode, modification time and size (nginx
//! makes its own from the last two), with `If-None-Match` (304) and `If-Match` (412) by
//! RFC 9110 §13.
//!
//! Small files (up to [`WHOLE_MAX`]) are read whole and kept in memory ([`Cache`]), in the
//! spirit of nginx's `open_file_cache`: an entry answers by itself for [`VALID`] after it was
//! last checked, then the next request resolves the path again (as strictly as the first
//! time) and compares the file's identity — inode, size, modification and change times —
//! before the kept bytes answer again. So a changed, replaced or removed file is seen within
//! [`VALID`], and a hot file costs no system call at all in between.
//!
//! The front-end serves `--root` itself through [`Files`] (no hop to a worker), and passes
//! to the workers whatever finds no file; the workers' router ([`static_files`]) answers
//! those from the same code.
//!
//! Kernels without `openat2` (before 5.6, or behind a seccomp filter that hides it) get a
//! walk that opens one component at a time with `O_NOFOLLOW` and follows no links at all.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::Request;
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::Router;
use bytes::Bytes;
use nix::errno::Errno;
use nix::fcntl::{openat, openat2, OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::{fstat, FileStat, Mode, SFlag};
use tower::ServiceExt;
use tower_http::services::ServeFile;
use tracing::{debug, error, warn};

/// How many times a lookup is retried when the kernel reports that a concurrent rename
/// made `RESOLVE_BENEATH` unable to vouch for the result (EAGAIN); more means an attack
/// or a storm of renames, and a 404 is the right answer to either.
const RESOLVE_ATTEMPTS: usize = 3;

/// Largest file read whole and kept in memory; larger ones stream through ServeFile.
const WHOLE_MAX: i64 = 256 * 1024;
/// How long a kept file answers before its path is resolved and its identity checked again:
/// nginx's `open_file_cache_valid` is 60 s; one second keeps a deploy's new files prompt
/// and still spares a hot file all but one check a second.
const VALID: Duration = Duration::from_secs(1);
/// Most memory the kept files take, their names and bookkeeping included; past it, entries
/// that are due for a check are dropped, and if that is not enough the new one is not kept.
const CACHE_BYTES: usize = 32 * 1024 * 1024;
/// Most paths remembered as naming no file (an app's routes behind `--root`), each for
/// [`VALID`] after its lookup, as nginx's `open_file_cache_errors` does: a request for one goes
/// on without a trip to the blocking pool. Past it, due ones are dropped, then none is added.
const MISSES: usize = 4096;
/// What an entry costs beside its bytes and its name, for [`CACHE_BYTES`].
const ENTRY_OVERHEAD: usize = 512;

/// A router serving files under `root` (index.html for directories) to GET and HEAD.
pub fn static_files(root: &Path) -> Router {
    static_files_with(root, None)
}

/// [`static_files`], each file sent with `cache_control` as its Cache-Control, if given.
pub fn static_files_with(root: &Path, cache_control: Option<&str>) -> Router {
    match Files::open(root, cache_control) {
        Ok(files) => {
            let files = Arc::new(files);
            Router::new().fallback(move |req: Request| {
                let files = files.clone();
                async move {
                    match files.answer(req).await {
                        Answer::Served(response) => response.map(Content::into_body),
                        Answer::Missed(_, miss) => miss.response().map(Content::into_body),
                    }
                }
            })
        }
        Err(e) => {
            // `rip serve` checked the root at startup, so this is a root removed since.
            error!(root = %root.display(), error = %e, "static root open failed");
            Router::new().fallback(|| async { StatusCode::INTERNAL_SERVER_ERROR })
        }
    }
}

/// A response body as [`Files`] makes it: bytes at hand (kept files, short answers), or a
/// file streamed by ServeFile.
pub enum Content {
    Full(Bytes),
    Stream(Body),
}

impl Content {
    pub fn into_body(self) -> Body {
        match self {
            Content::Full(bytes) => Body::from(bytes),
            Content::Stream(body) => body,
        }
    }
}

type Answered = http::Response<Content>;

fn answer(status: StatusCode) -> Answered {
    let mut response = http::Response::new(Content::Full(Bytes::new()));
    *response.status_mut() = status;
    response
}

/// What [`Files::answer`] made of a request.
pub enum Answer<B> {
    /// A file (or 304, 412, 206), or a redirect to a directory's slashed URL.
    Served(Answered),
    /// No file answers it: the request back, for whoever serves what is not a file, and why.
    Missed(http::Request<B>, Miss),
}

/// Why a request found no file to serve.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Miss {
    /// Not GET or HEAD.
    Method,
    /// A path that names no file we would serve.
    Refused(Refusal),
    NotFound,
    /// The lookup failed for another reason (logged).
    Failed,
}

impl Miss {
    /// The answer when nothing else serves the request.
    pub fn response(self) -> Answered {
        match self {
            Miss::Method => {
                let mut response = answer(StatusCode::METHOD_NOT_ALLOWED);
                response.headers_mut().insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
                response
            }
            Miss::Refused(refusal) => answer(refusal.status()),
            Miss::NotFound => not_found(),
            Miss::Failed => answer(StatusCode::INTERNAL_SERVER_ERROR),
        }
    }
}

/// What [`Files::probe`] learnt of a request it could not answer from memory.
pub struct Probe {
    codings: usize,
    plain: bool,
    /// A kept file due for a check: if it is still the same file, its bytes answer again.
    kept: Option<Arc<Kept>>,
    /// The path named no file when it was last looked up, less than [`VALID`] ago.
    missed: bool,
}

/// The files under one root, with the small ones kept in memory.
pub struct Files {
    root: Root,
    cache_control: Option<HeaderValue>,
    cache: Cache,
}

impl std::fmt::Debug for Files {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Files").field("root", &self.root).finish_non_exhaustive()
    }
}

impl Files {
    /// The files under `root`, each sent with `cache_control` as its Cache-Control, if given.
    pub fn open(root: &Path, cache_control: Option<&str>) -> std::io::Result<Files> {
        Files::open_with(root, cache_control, Cache::new(VALID, CACHE_BYTES))
    }

    fn open_with(root: &Path, cache_control: Option<&str>, cache: Cache) -> std::io::Result<Files> {
        Ok(Files {
            root: Root::open(root)?,
            cache_control: cache_control.and_then(|v| HeaderValue::from_str(v).ok()),
            cache,
        })
    }

    /// The answer from a kept file that is not due for a check, without a system call; else
    /// what this first look found, for [`look`](Self::look) to go on from.
    pub fn probe<B>(&self, req: &http::Request<B>) -> Result<Answered, Probe> {
        let codings = accepted_codings(req.headers());
        let plain = is_plain(req.headers());
        let kept =
            (is_fetch(req.method()) && plain).then(|| self.cache.get(req.uri().path(), codings)).flatten();
        match kept {
            Some(entry) if self.cache.fresh(&entry) => Ok(self.finish(entry.answer(req))),
            None if is_fetch(req.method()) && self.cache.missed(req.uri().path()) => {
                Err(Probe { codings, plain, kept: None, missed: true })
            }
            kept => Err(Probe { codings, plain, kept, missed: false }),
        }
    }

    /// [`probe`](Self::probe)'s answer, for a test that wants only what memory holds.
    #[cfg(test)]
    fn kept<B>(&self, req: &http::Request<B>) -> Option<Answered> {
        self.probe(req).ok()
    }

    /// Looks `req` up under the root: the file's answer, or the request back.
    pub async fn answer<B: Send + 'static>(self: &Arc<Self>, req: http::Request<B>) -> Answer<B> {
        match self.probe(&req) {
            Ok(answered) => Answer::Served(answered),
            Err(probe) => self.look(req, probe).await,
        }
    }

    /// Looks `req` up on disk, after [`probe`](Self::probe) found no answer in memory.
    pub async fn look<B: Send + 'static>(self: &Arc<Self>, req: http::Request<B>, probe: Probe) -> Answer<B> {
        if !is_fetch(req.method()) {
            return Answer::Missed(req, Miss::Method);
        }
        let Probe { codings, plain, kept, missed } = probe;
        if missed {
            return Answer::Missed(req, Miss::NotFound);
        }
        let segments = match decode(req.uri().path()) {
            Ok(segments) => segments,
            Err(refusal) => {
                debug!(path = req.uri().path(), ?refusal, "static path refused");
                return Answer::Missed(req, Miss::Refused(refusal));
            }
        };
        let wants_dir = req.uri().path().ends_with('/');
        let (files, was_kept) = (self.clone(), kept.is_some());
        // Lookups are syscalls that may wait on a slow disk; keep them off the async thread.
        let found = tokio::task::spawn_blocking(move || {
            let found = files.root.find(&segments, wants_dir)?;
            // A precompressed sibling the client accepts (`page.html.br`, `page.html.gz`),
            // found as strictly as the file itself.
            let encoded = matches!(found, Found::File { .. })
                .then(|| {
                    CODINGS.iter().enumerate().filter(|(bit, _)| codings & (1 << bit) != 0).find_map(
                        |(_, (coding, suffix))| {
                            files.root.find_sibling(&segments, wants_dir, suffix).map(|fd| (*coding, fd))
                        },
                    )
                })
                .flatten();
            // A small file asked for plainly is read whole here, in the same trip to the
            // blocking pool (or, unchanged since it was kept, not read at all).
            let whole = match (&found, &encoded) {
                (Found::File { .. }, Some((_, fd))) | (Found::File { fd, .. }, None) if plain => {
                    read_small(fd, kept.as_deref())
                }
                _ => None,
            };
            Ok::<_, Errno>((found, encoded, whole))
        })
        .await;
        let path = req.uri().path();
        match found {
            Ok(Ok((Found::File { name, .. }, encoded, Some((st, bytes))))) => {
                let coding = encoded.as_ref().map(|(coding, _)| *coding);
                let entry = Arc::new(Kept::new(&st, bytes, &name, coding, self.cache.now()));
                self.cache.insert(path, codings, entry.clone());
                Answer::Served(self.finish(entry.answer(&req)))
            }
            Ok(Ok((Found::File { name, .. }, Some((coding, fd)), None))) => {
                let mut response = serve_file(fd, &name, req).await;
                let success = response.status().is_success();
                let headers = response.headers_mut();
                headers.insert(header::VARY, HeaderValue::from_static("accept-encoding"));
                if success {
                    headers.insert(header::CONTENT_ENCODING, HeaderValue::from_static(coding));
                }
                Answer::Served(self.finish(response))
            }
            Ok(Ok((Found::File { fd, name }, None, None))) => {
                Answer::Served(self.finish(serve_file(fd, &name, req).await))
            }
            Ok(Ok((Found::Directory, _, _))) => Answer::Served(redirect_to_directory(req.uri())),
            Ok(Err(errno)) if is_not_found(errno) => {
                debug!(path, %errno, "static file not found");
                if was_kept {
                    self.cache.remove(path, codings);
                }
                self.cache.miss(path);
                Answer::Missed(req, Miss::NotFound)
            }
            Ok(Err(errno)) => {
                warn!(path, %errno, "static file lookup failed");
                Answer::Missed(req, Miss::Failed)
            }
            Err(e) => {
                warn!(path, error = %e, "static file lookup task failed");
                Answer::Missed(req, Miss::Failed)
            }
        }
    }

    /// The configured Cache-Control on a file's answer (a 304 included), not on errors.
    fn finish(&self, mut response: Answered) -> Answered {
        let status = response.status();
        if let Some(value) =
            self.cache_control.as_ref().filter(|_| status.is_success() || status == StatusCode::NOT_MODIFIED)
        {
            response.headers_mut().insert(header::CACHE_CONTROL, value.clone());
        }
        response
    }
}

fn is_fetch(method: &Method) -> bool {
    method == Method::GET || method == Method::HEAD
}

/// Serves the file behind `fd`. `/proc/self/fd/N` is a magic link to the open file itself,
/// so whatever happens to the name meanwhile, `ServeFile` opens the inode we resolved.
async fn serve_file<B: Send + 'static>(fd: OwnedFd, name: &OsStr, mut req: http::Request<B>) -> Answered {
    let stat = fstat(fd.as_raw_fd()).ok();
    let etag = stat.as_ref().map(entity_tag);
    if let Some(st) = &stat {
        // ServeFile answers several ranges with 416; RFC 9110 §14.2 lets a server send one
        // range that covers them instead, which every client that asks for several reads.
        let covering = req
            .headers()
            .get(header::RANGE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| covering_range(v, st.st_size.max(0) as u64));
        if let Some(range) = covering.and_then(|r| HeaderValue::from_str(&r).ok()) {
            req.headers_mut().insert(header::RANGE, range);
        }
    }
    if let Some(etag) = &etag {
        if let Some(answer) = precondition(req.headers(), etag, None) {
            return answer;
        }
        // RFC 9110 §13.2.2: with If-None-Match, If-Modified-Since is not evaluated.
        if req.headers().contains_key(header::IF_NONE_MATCH) {
            req.headers_mut().remove(header::IF_MODIFIED_SINCE);
        }
    }
    let path = format!("/proc/self/fd/{}", fd.as_raw_fd());
    let mut response = match ServeFile::new(path).oneshot(req).await {
        Ok(response) => response.map(|body| Content::Stream(Body::new(body))),
        Err(never) => match never {},
    };
    // Only now may the descriptor close: ServeFile has opened (or stat'ed, for HEAD) it.
    drop(fd);
    if response.status().is_success() {
        response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type(name)));
    }
    match etag {
        Some(etag) if response.status().is_success() || response.status() == StatusCode::NOT_MODIFIED => {
            with_etag(response, &etag)
        }
        _ => response,
    }
}

/// No header that only ServeFile answers (ranges): such a request can be answered from the
/// file's bytes in memory.
fn is_plain(headers: &HeaderMap) -> bool {
    !headers.contains_key(header::RANGE) && !headers.contains_key(header::IF_RANGE)
}

/// The file behind `fd` with its stat, if it is a regular file of at most [`WHOLE_MAX`]
/// bytes: `kept`'s bytes if it is still that file, else read whole. `None` sends the request
/// down ServeFile's path instead.
fn read_small(fd: &OwnedFd, kept: Option<&Kept>) -> Option<(FileStat, Bytes)> {
    let st = fstat(fd.as_raw_fd()).ok()?;
    if SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits()) != SFlag::S_IFREG
        || st.st_size > WHOLE_MAX
    {
        return None;
    }
    if let Some(kept) = kept.filter(|k| k.identity == Identity::of(&st)) {
        return Some((st, kept.body.clone()));
    }
    // The lookup's descriptor is O_PATH, which reads nothing; its /proc/self/fd link opens
    // the very inode it resolved, as ServeFile's path does.
    let file = std::fs::File::open(format!("/proc/self/fd/{}", fd.as_raw_fd())).ok()?;
    let mut bytes = vec![0u8; st.st_size as usize];
    let mut read = 0;
    while read < bytes.len() {
        match nix::sys::uio::pread(&file, &mut bytes[read..], read as i64) {
            Ok(0) => return None, // shorter than its stat said: let ServeFile deal with it
            Ok(n) => read += n,
            Err(Errno::EINTR) => {}
            Err(_) => return None,
        }
    }
    Some((st, Bytes::from(bytes)))
}

/// What tells one version of a file from another: a new inode (a file replaced, as deploys
/// and most editors do), a write (size, mtime), or a metadata change that may hide one
/// (ctime: mtime can be set back, ctime cannot).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Identity {
    dev: u64,
    ino: u64,
    size: i64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Identity {
    fn of(st: &FileStat) -> Identity {
        Identity {
            dev: st.st_dev,
            ino: st.st_ino,
            size: st.st_size,
            mtime: (st.st_mtime, st.st_mtime_nsec),
            ctime: (st.st_ctime, st.st_ctime_nsec),
        }
    }
}

/// A small file in memory, with the headers of its answer made once.
#[derive(Debug)]
struct Kept {
    identity: Identity,
    body: Bytes,
    content_type: &'static str,
    coding: Option<&'static str>,
    etag: String,
    etag_value: HeaderValue,
    /// Seconds since the epoch, as Last-Modified has it.
    modified: i64,
    last_modified: Option<HeaderValue>,
    /// When it was last resolved and found to be this file, in ms since the cache's start.
    checked: u64,
}

impl Kept {
    fn new(st: &FileStat, body: Bytes, name: &OsStr, coding: Option<&'static str>, now: u64) -> Kept {
        let etag = entity_tag(st);
        let modified = std::time::UNIX_EPOCH + Duration::new(st.st_mtime.max(0) as u64, 0);
        Kept {
            identity: Identity::of(st),
            body,
            content_type: content_type(name),
            coding,
            etag_value: HeaderValue::from_str(&etag).unwrap_or(HeaderValue::from_static("\"\"")),
            etag,
            modified: st.st_mtime,
            last_modified: HeaderValue::from_str(&httpdate::fmt_http_date(modified)).ok(),
            checked: now,
        }
    }

    fn is_fresh(&self, now: u64, valid: u64) -> bool {
        now.saturating_sub(self.checked) < valid
    }

    /// A 200 (or 304, 412) with the headers ServeFile would send.
    fn answer<B>(&self, req: &http::Request<B>) -> Answered {
        let status = match validate(req.headers(), &self.etag, Some(self.modified)) {
            Validated::Serve => StatusCode::OK,
            Validated::NotModified => StatusCode::NOT_MODIFIED,
            Validated::Failed => StatusCode::PRECONDITION_FAILED,
        };
        let mut response = answer(status);
        let headers = response.headers_mut();
        headers.insert(header::ETAG, self.etag_value.clone());
        if status != StatusCode::OK {
            return response;
        }
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(self.content_type));
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(self.body.len()));
        headers.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
        if let Some(value) = &self.last_modified {
            headers.insert(header::LAST_MODIFIED, value.clone());
        }
        // As on ServeFile's path: Vary only when a sibling was chosen.
        if let Some(coding) = self.coding {
            headers.insert(header::CONTENT_ENCODING, HeaderValue::from_static(coding));
            headers.insert(header::VARY, HeaderValue::from_static("accept-encoding"));
        }
        if req.method() != Method::HEAD {
            *response.body_mut() = Content::Full(self.body.clone());
        }
        response
    }
}

/// The kept files, by request path and the set of codings the client accepts (which decides
/// which sibling, if any, answers). A lock held for a map operation only, never across I/O.
struct Cache {
    epoch: Instant,
    /// [`VALID`] in ms, and [`CACHE_BYTES`]; tests set their own.
    valid: u64,
    capacity: usize,
    state: Mutex<CacheState>,
}

#[derive(Default)]
struct CacheState {
    entries: HashMap<Box<str>, [Option<Arc<Kept>>; 1 << CODINGS.len()]>,
    bytes: usize,
    /// Paths that named no file, with when they were looked up.
    misses: HashMap<Box<str>, u64>,
}

fn cost(path: &str, entry: &Kept) -> usize {
    entry.body.len() + path.len() + ENTRY_OVERHEAD
}

impl Cache {
    fn new(valid: Duration, capacity: usize) -> Cache {
        Cache { epoch: Instant::now(), valid: valid.as_millis() as u64, capacity, state: Mutex::default() }
    }

    fn now(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// `entry`, if it answers by itself now.
    fn fresh(&self, entry: &Arc<Kept>) -> bool {
        entry.is_fresh(self.now(), self.valid)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, CacheState> {
        // Nothing panics while holding it; a poisoned map is still a consistent map.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn get(&self, path: &str, codings: usize) -> Option<Arc<Kept>> {
        self.lock().entries.get(path).and_then(|slots| slots[codings].clone())
    }

    /// `path` named no file at its lookup, less than [`VALID`] ago.
    fn missed(&self, path: &str) -> bool {
        let now = self.now();
        self.lock().misses.get(path).is_some_and(|&at| now.saturating_sub(at) < self.valid)
    }

    /// Remembers that `path` names no file, if there is room.
    fn miss(&self, path: &str) {
        let now = self.now();
        let valid = self.valid;
        let mut state = self.lock();
        if state.misses.len() >= MISSES && !state.misses.contains_key(path) {
            state.misses.retain(|_, at| now.saturating_sub(*at) < valid);
            if state.misses.len() >= MISSES {
                return;
            }
        }
        state.misses.insert(path.into(), now);
    }

    fn insert(&self, path: &str, codings: usize, entry: Arc<Kept>) {
        let now = self.now();
        let mut state = self.lock();
        let state = &mut *state;
        if let Some(old) = state.entries.get_mut(path).and_then(|slots| slots[codings].take()) {
            state.bytes -= cost(path, &old);
        }
        let needed = cost(path, &entry);
        if state.bytes + needed > self.capacity {
            // Entries due for a check cost a lookup either way; keep the ones in use.
            let mut freed = 0;
            let valid = self.valid;
            state.entries.retain(|path, slots| {
                for slot in slots.iter_mut() {
                    if slot.as_ref().is_some_and(|e| !e.is_fresh(now, valid)) {
                        freed += slot.take().map_or(0, |e| cost(path, &e));
                    }
                }
                slots.iter().any(Option::is_some)
            });
            state.bytes -= freed;
            if state.bytes + needed > self.capacity {
                return;
            }
        }
        state.bytes += needed;
        state.entries.entry(path.into()).or_default()[codings] = Some(entry);
    }

    fn remove(&self, path: &str, codings: usize) {
        let mut state = self.lock();
        let state = &mut *state;
        if let Some(old) = state.entries.get_mut(path).and_then(|slots| slots[codings].take()) {
            state.bytes -= cost(path, &old);
        }
    }
}

/// For a `Range` of several byte ranges over a file of `size` bytes, the one range from the
/// first byte any of them asks for to the last; `None` for a single range (ServeFile's to
/// answer) or anything that is not a list of byte ranges.
fn covering_range(value: &str, size: u64) -> Option<String> {
    let specs = value.trim().strip_prefix("bytes=")?;
    if !specs.contains(',') || size == 0 {
        return None;
    }
    let mut span: Option<(u64, u64)> = None;
    for spec in specs.split(',') {
        let (first, last) = spec.trim().split_once('-')?;
        let (start, end) = match (first.trim(), last.trim()) {
            ("", suffix) => (size.saturating_sub(suffix.parse::<u64>().ok()?), size - 1),
            (first, "") => (first.parse().ok()?, size - 1),
            (first, last) => (first.parse().ok()?, last.parse::<u64>().ok()?.min(size - 1)),
        };
        if start > end || start >= size {
            // Unsatisfiable alone; the others may still be served.
            continue;
        }
        span = Some(span.map_or((start, end), |(s, e)| (s.min(start), e.max(end))));
    }
    span.map(|(start, end)| format!("bytes={start}-{end}"))
}

/// The precompressed siblings rip looks for, best first: coding and file suffix.
const CODINGS: [(&str, &str); 2] = [("br", ".br"), ("gzip", ".gz")];

/// The [`CODINGS`] the client accepts, as a set of bits (bit i for `CODINGS[i]`).
fn accepted_codings(headers: &HeaderMap) -> usize {
    let mut accepted = 0;
    for value in headers.get_all(header::ACCEPT_ENCODING).iter().filter_map(|v| v.to_str().ok()) {
        for item in value.split(',') {
            let mut parts = item.split(';');
            let name = parts.next().unwrap_or("").trim();
            let refused = parts.any(|p| {
                p.trim().strip_prefix("q=").is_some_and(|q| q.trim().parse::<f32>().is_ok_and(|q| q == 0.0))
            });
            if refused {
                continue;
            }
            for (bit, (coding, _)) in CODINGS.iter().enumerate() {
                if name.eq_ignore_ascii_case(coding) || name == "*" {
                    accepted |= 1 << bit;
                }
            }
        }
    }
    accepted
}

/// A short text body, so that a browser shows something rather than a blank page.
fn not_found() -> Answered {
    let mut response = answer(StatusCode::NOT_FOUND);
    *response.body_mut() = Content::Full(Bytes::from_static(b"404 not found\n"));
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    response
}

/// `"inode-mtime-size"` in hex, mtime in nanoseconds: it changes whenever the file is
/// replaced (a new inode, as deploys and editors that write a new file do) or written to.
fn entity_tag(st: &nix::sys::stat::FileStat) -> String {
    let mtime = (st.st_mtime as i128) * 1_000_000_000 + st.st_mtime_nsec as i128;
    format!("\"{:x}-{:x}-{:x}\"", st.st_ino, mtime, st.st_size)
}

fn with_etag<B>(mut response: http::Response<B>, etag: &str) -> http::Response<B> {
    if let Ok(value) = HeaderValue::from_str(etag) {
        response.headers_mut().insert(header::ETAG, value);
    }
    response
}

/// What the request's entity-tag preconditions say.
#[derive(Debug, PartialEq, Eq)]
enum Validated {
    Serve,
    /// `If-None-Match` matched (weak comparison, `*` included): 304.
    NotModified,
    /// `If-Match` did not (strong comparison): 412.
    Failed,
}

/// The 304 or 412 the request's entity-tag preconditions (and, given the file's `modified`
/// time, its date preconditions) call for, if any.
fn precondition(headers: &HeaderMap, etag: &str, modified: Option<i64>) -> Option<Answered> {
    let status = match validate(headers, etag, modified) {
        Validated::Serve => return None,
        Validated::NotModified => StatusCode::NOT_MODIFIED,
        Validated::Failed => StatusCode::PRECONDITION_FAILED,
    };
    Some(with_etag(answer(status), etag))
}

/// RFC 9110 §13.2.2's order for a GET or HEAD of an existing file: If-Match, else
/// If-Unmodified-Since; then If-None-Match, else If-Modified-Since. The dates are weighed
/// only when `modified` (seconds since the epoch) is given.
fn validate(headers: &HeaderMap, etag: &str, modified: Option<i64>) -> Validated {
    let lists = |name| headers.get_all(name).iter().filter_map(|v| v.to_str().ok()).collect::<Vec<_>>();
    let matches = |list: &[&str], weak: bool| {
        list.iter().flat_map(|v| v.split(',')).map(str::trim).any(|tag| {
            tag == "*" || tag == etag || (weak && tag.strip_prefix("W/").is_some_and(|t| t == etag))
        })
    };
    // A date that does not parse is ignored, as §13.1.3 and .4 say.
    let date = |name| {
        let value = headers.get(name)?.to_str().ok()?;
        let when = httpdate::parse_http_date(value).ok()?;
        Some(when.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64))
    };
    let if_match = lists(header::IF_MATCH);
    if !if_match.is_empty() {
        if !matches(&if_match, false) {
            return Validated::Failed;
        }
    } else if let (Some(modified), Some(since)) = (modified, date(header::IF_UNMODIFIED_SINCE)) {
        if modified > since {
            return Validated::Failed;
        }
    }
    let if_none_match = lists(header::IF_NONE_MATCH);
    if !if_none_match.is_empty() {
        if matches(&if_none_match, true) {
            return Validated::NotModified;
        }
    } else if let (Some(modified), Some(since)) = (modified, date(header::IF_MODIFIED_SINCE)) {
        if modified <= since {
            return Validated::NotModified;
        }
    }
    Validated::Serve
}

/// A directory asked for without its trailing slash: send the client to the slashed URL,
/// so that the index page's relative links resolve inside the directory.
fn redirect_to_directory(uri: &Uri) -> Answered {
    // Leading slashes collapse to one: `//host/dir` must not become a link to another host.
    let mut location = format!("/{}/", uri.path().trim_start_matches('/'));
    if let Some(query) = uri.query() {
        location.push('?');
        location.push_str(query);
    }
    match HeaderValue::try_from(location) {
        Ok(location) => {
            let mut response = answer(StatusCode::TEMPORARY_REDIRECT);
            response.headers_mut().insert(header::LOCATION, location);
            response
        }
        Err(_) => answer(StatusCode::BAD_REQUEST),
    }
}

/// Why a request path names no file we would serve.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Not a path at all: a broken percent escape, a NUL, no leading slash.
    Malformed,
    /// A well-formed path that tries to leave its directory: `..`, an encoded slash, a
    /// backslash. There is no such file, so the answer is the same as for a missing one.
    Escape,
}

impl Refusal {
    fn status(self) -> StatusCode {
        match self {
            Refusal::Malformed => StatusCode::BAD_REQUEST,
            Refusal::Escape => StatusCode::NOT_FOUND,
        }
    }
}

/// Turns a request path into file-name segments, percent-decoding each segment exactly once
/// (so `%252e` is the name `%2e`, never `.`). Empty and `.` segments are dropped; `..`, and
/// any segment whose decoded bytes hold `/`, `\` or NUL, are refused rather than resolved.
fn decode(uri_path: &str) -> Result<Vec<OsString>, Refusal> {
    let Some(rest) = uri_path.strip_prefix('/') else {
        return Err(Refusal::Malformed);
    };
    let mut segments = Vec::new();
    for raw in rest.split('/') {
        let name = percent_decode(raw.as_bytes()).ok_or(Refusal::Malformed)?;
        if name.contains(&0) {
            return Err(Refusal::Malformed);
        }
        if name.contains(&b'/') || name.contains(&b'\\') || name == b".." {
            return Err(Refusal::Escape);
        }
        if name.is_empty() || name == b"." {
            continue;
        }
        segments.push(OsString::from_vec(name));
    }
    Ok(segments)
}

fn percent_decode(raw: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(raw.len());
    let mut bytes = raw.iter();
    while let Some(&b) = bytes.next() {
        if b == b'%' {
            let hi = hex_digit(*bytes.next()?)?;
            let lo = hex_digit(*bytes.next()?)?;
            out.push(hi << 4 | lo);
        } else {
            out.push(b);
        }
    }
    Some(out)
}

fn hex_digit(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// The errors that mean "no file of that name under the root": missing, a path through a
/// file, a way out of the root (EXDEV from RESOLVE_BENEATH, ELOOP for links refused or
/// looping), unreadable, or absurdly long.
fn is_not_found(errno: Errno) -> bool {
    matches!(
        errno,
        Errno::ENOENT
            | Errno::ENOTDIR
            | Errno::EXDEV
            | Errno::ELOOP
            | Errno::EACCES
            | Errno::EPERM
            | Errno::ENAMETOOLONG
            | Errno::EAGAIN
    )
}

/// What a request path resolved to.
#[derive(Debug)]
enum Found {
    /// A regular file to serve, and the name its Content-Type comes from.
    File { fd: OwnedFd, name: OsString },
    /// A directory asked for without a trailing slash.
    Directory,
}

/// How names are resolved under the root.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Resolution {
    /// `openat2(RESOLVE_BENEATH)`: links are followed as long as they stay inside.
    Beneath,
    /// One component at a time with `O_NOFOLLOW`: links are never followed.
    NoLinks,
}

/// The root directory, held open: renaming or replacing the root's path after start does
/// not move what is served.
#[derive(Debug)]
struct Root {
    dir: OwnedFd,
    resolution: Resolution,
}

impl Root {
    fn open(path: &Path) -> std::io::Result<Root> {
        let dir: OwnedFd =
            std::fs::OpenOptions::new().read(true).custom_flags(OFlag::O_DIRECTORY.bits()).open(path)?.into();
        let resolution = match open_beneath(dir.as_fd(), OsStr::new(".")) {
            Err(Errno::ENOSYS) | Err(Errno::EPERM) => {
                warn!(
                    root = %path.display(),
                    "openat2 is unavailable; symbolic links under the root will not be followed"
                );
                Resolution::NoLinks
            }
            _ => Resolution::Beneath,
        };
        if !Path::new("/proc/self/fd").is_dir() {
            error!(root = %path.display(), "/proc is not mounted; every static file will be a 404");
        }
        Ok(Root { dir, resolution })
    }

    /// Resolves `segments` under the root to a regular file, the directory's index.html
    /// when `wants_dir`, or a redirect for a directory named without its slash.
    fn find(&self, segments: &[OsString], wants_dir: bool) -> nix::Result<Found> {
        let fd = self.resolve(self.dir.as_fd(), segments)?;
        let kind = file_kind(&fd)?;
        if kind == SFlag::S_IFDIR {
            if !wants_dir {
                return Ok(Found::Directory);
            }
            let name = OsString::from("index.html");
            let index = self.resolve(fd.as_fd(), std::slice::from_ref(&name))?;
            return match file_kind(&index)? {
                SFlag::S_IFREG => Ok(Found::File { fd: index, name }),
                _ => Err(Errno::ENOENT),
            };
        }
        // A file named with a trailing slash, a FIFO, a device or a socket is no page.
        if kind != SFlag::S_IFREG || wants_dir {
            return Err(Errno::ENOENT);
        }
        let name = segments.last().cloned().unwrap_or_default();
        Ok(Found::File { fd, name })
    }

    /// The regular file `suffix` away from what `find` resolves for the same request: the
    /// file's name, or a directory's index.html, with `suffix` appended.
    fn find_sibling(&self, segments: &[OsString], wants_dir: bool, suffix: &str) -> Option<OwnedFd> {
        let mut sibling = segments.to_vec();
        if wants_dir {
            sibling.push(OsString::from("index.html"));
        }
        let last = sibling.last_mut()?;
        last.push(suffix);
        let fd = self.resolve(self.dir.as_fd(), &sibling).ok()?;
        (file_kind(&fd).ok()? == SFlag::S_IFREG).then_some(fd)
    }

    fn resolve(&self, dir: BorrowedFd<'_>, segments: &[OsString]) -> nix::Result<OwnedFd> {
        match self.resolution {
            Resolution::Beneath => {
                let mut path = OsString::from(".");
                for segment in segments {
                    path.push("/");
                    path.push(segment);
                }
                let mut attempt = 1;
                loop {
                    match open_beneath(dir, &path) {
                        Err(Errno::EAGAIN) if attempt < RESOLVE_ATTEMPTS => attempt += 1,
                        result => return result,
                    }
                }
            }
            Resolution::NoLinks => open_without_links(dir, segments),
        }
    }
}

/// Opens `path` relative to `dir` as an `O_PATH` descriptor, which reads nothing and so
/// cannot block on a FIFO or wake a device, without ever leaving `dir`.
fn open_beneath(dir: BorrowedFd<'_>, path: &OsStr) -> nix::Result<OwnedFd> {
    let how = OpenHow::new()
        .flags(OFlag::O_PATH | OFlag::O_CLOEXEC)
        .resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_MAGICLINKS);
    owned(openat2(dir.as_raw_fd(), path, how))
}

/// Opens `segments` one at a time under `dir`, refusing every symbolic link. The segments
/// hold no `/` and no `..` ([`decode`] saw to that), so this cannot leave `dir`.
fn open_without_links(dir: BorrowedFd<'_>, segments: &[OsString]) -> nix::Result<OwnedFd> {
    let flags = OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let mut current = owned(openat(Some(dir.as_raw_fd()), ".", flags, Mode::empty()))?;
    for segment in segments {
        let next = owned(openat(Some(current.as_raw_fd()), segment.as_os_str(), flags, Mode::empty()))?;
        if file_kind(&next)? == SFlag::S_IFLNK {
            return Err(Errno::ELOOP);
        }
        current = next;
    }
    Ok(current)
}

fn owned(fd: nix::Result<RawFd>) -> nix::Result<OwnedFd> {
    // SAFETY: the descriptor was just returned by openat/openat2 and nothing else owns it.
    fd.map(|fd| unsafe { OwnedFd::from_raw_fd(fd) })
}

fn file_kind(fd: &OwnedFd) -> nix::Result<SFlag> {
    let stat = fstat(fd.as_raw_fd())?;
    Ok(SFlag::from_bits_truncate(stat.st_mode) & SFlag::S_IFMT)
}

/// The Content-Type for a file name, by extension; unknown kinds are octet streams, which
/// browsers download rather than render. Text is declared UTF-8.
fn content_type(name: &OsStr) -> &'static str {
    let extension =
        Path::new(name).extension().map(|e| e.as_bytes().to_ascii_lowercase()).unwrap_or_default();
    match extension.as_slice() {
        b"html" | b"htm" => "text/html; charset=utf-8",
        b"css" => "text/css; charset=utf-8",
        b"js" | b"mjs" => "text/javascript; charset=utf-8",
        b"txt" | b"text" | b"log" => "text/plain; charset=utf-8",
        b"md" | b"markdown" => "text/markdown; charset=utf-8",
        b"csv" => "text/csv; charset=utf-8",
        b"xml" => "text/xml; charset=utf-8",
        b"json" | b"map" => "application/json",
        b"webmanifest" => "application/manifest+json",
        b"wasm" => "application/wasm",
        b"pdf" => "application/pdf",
        b"zip" => "application/zip",
        b"gz" => "application/gzip",
        b"tar" => "application/x-tar",
        b"svg" => "image/svg+xml",
        b"png" => "image/png",
        b"jpg" | b"jpeg" => "image/jpeg",
        b"gif" => "image/gif",
        b"webp" => "image/webp",
        b"avif" => "image/avif",
        b"ico" => "image/x-icon",
        b"bmp" => "image/bmp",
        b"woff" => "font/woff",
        b"woff2" => "font/woff2",
        b"ttf" => "font/ttf",
        b"otf" => "font/otf",
        b"mp3" => "audio/mpeg",
        b"ogg" | b"oga" => "audio/ogg",
        b"wav" => "audio/wav",
        b"mp4" => "video/mp4",
        b"webm" => "video/webm",
        _ => "application/octet-stream",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::{HeaderMap, Request};
    use http_body_util::BodyExt;
    use std::os::unix::fs::symlink;
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicUsize, Ordering};

    const SECRET: &str = "TOP-SECRET-MARKER";

    /// A scratch directory: `root/` to serve and `outside/secret.txt` beside it, with links
    /// that stay inside and links that try to leave. Removed on drop.
    struct Tree {
        base: PathBuf,
    }

    impl Tree {
        fn new() -> Tree {
            static NEXT: AtomicUsize = AtomicUsize::new(0);
            let base = std::env::temp_dir().join(format!(
                "rip-static-unit-{}-{}",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            ));
            let _ = std::fs::remove_dir_all(&base);
            let root = base.join("root");
            std::fs::create_dir_all(root.join("sub/deeper")).unwrap();
            std::fs::create_dir_all(base.join("outside")).unwrap();
            std::fs::write(base.join("outside/secret.txt"), SECRET).unwrap();
            std::fs::write(root.join("hello.txt"), "hello world").unwrap();
            std::fs::write(root.join("sub/index.html"), "<h1>sub</h1>").unwrap();
            std::fs::write(root.join("sub/deeper/file.txt"), "deep").unwrap();
            symlink("hello.txt", root.join("inner-link")).unwrap();
            symlink("sub", root.join("inner-dir-link")).unwrap();
            symlink("../hello.txt", root.join("sub/up-but-inside")).unwrap();
            symlink("../outside/secret.txt", root.join("file-link")).unwrap();
            symlink(base.join("outside/secret.txt"), root.join("abs-link")).unwrap();
            symlink(root.join("hello.txt"), root.join("abs-inside-link")).unwrap();
            symlink("../outside", root.join("link-out")).unwrap();
            symlink("../../../outside/secret.txt", root.join("sub/deeper/up-link")).unwrap();
            symlink("/proc/self/root/etc/hostname", root.join("proc-link")).unwrap();
            nix::unistd::mkfifo(&root.join("fifo"), Mode::S_IRWXU).unwrap();
            Tree { base }
        }

        fn root(&self) -> PathBuf {
            self.base.join("root")
        }
    }

    impl Drop for Tree {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.base);
        }
    }

    fn segments(path: &str) -> Vec<OsString> {
        decode(path).unwrap()
    }

    fn names(list: &[&str]) -> Vec<OsString> {
        list.iter().map(OsString::from).collect()
    }

    #[test]
    fn decode_keeps_plain_names_and_drops_empty_and_dot_segments() {
        let cases: &[(&str, &[&str])] = &[
            ("/", &[]),
            ("/a/b.txt", &["a", "b.txt"]),
            ("//a//./b/", &["a", "b"]),
            ("/caf%C3%A9", &["café"]),
            ("/with%20space", &["with space"]),
            // Decoded once: the double-encoded dots are the literal name `%2e%2e`.
            ("/%252e%252e/secret", &["%2e%2e", "secret"]),
            ("/...", &["..."]),
            ("/.hidden", &[".hidden"]),
        ];
        for (path, expected) in cases {
            assert_eq!(decode(path), Ok(names(expected)), "{path}");
        }
        assert_eq!(
            decode("/%ff"),
            Ok(vec![OsString::from_vec(vec![0xff])]),
            "names are bytes, not necessarily UTF-8"
        );
    }

    #[test]
    fn decode_refuses_every_way_out() {
        let escapes = [
            "/../secret",
            "/a/../../secret",
            "/%2e%2e/secret",
            "/%2E%2E/secret",
            "/.%2e/secret",
            "/%2e./secret",
            "/sub/..%2f..%2fsecret",
            "/a%2Fb",
            "/a%2fb",
            "/a\\b",
            "/..\\secret",
            "/a%5cb",
            "/a%5C..%5Csecret",
        ];
        for path in escapes {
            assert_eq!(decode(path), Err(Refusal::Escape), "{path}");
        }
    }

    #[test]
    fn decode_refuses_malformed_paths() {
        let malformed = ["/a%00b", "/%00", "/a%zz", "/a%2", "/a%", "/a%g0", "relative", ""];
        for path in malformed {
            assert_eq!(decode(path), Err(Refusal::Malformed), "{path:?}");
        }
    }

    #[test]
    fn refusals_map_to_404_and_400() {
        assert_eq!(Refusal::Escape.status(), StatusCode::NOT_FOUND);
        assert_eq!(Refusal::Malformed.status(), StatusCode::BAD_REQUEST);
    }

    fn root_with(tree: &Tree, resolution: Resolution) -> Root {
        let mut root = Root::open(&tree.root()).unwrap();
        root.resolution = resolution;
        root
    }

    fn read_found(found: nix::Result<Found>) -> String {
        match found {
            Ok(Found::File { fd, .. }) => {
                std::fs::read_to_string(format!("/proc/self/fd/{}", fd.as_raw_fd())).unwrap()
            }
            other => panic!("expected a file, got {other:?}"),
        }
    }

    #[test]
    fn beneath_follows_links_that_stay_inside() {
        let tree = Tree::new();
        let root = root_with(&tree, Resolution::Beneath);
        let find = |path: &str| root.find(&segments(path), path.ends_with('/'));
        assert_eq!(read_found(find("/hello.txt")), "hello world");
        assert_eq!(read_found(find("/inner-link")), "hello world");
        assert_eq!(read_found(find("/sub/up-but-inside")), "hello world");
        assert_eq!(read_found(find("/inner-dir-link/")), "<h1>sub</h1>");
        assert_eq!(read_found(find("/inner-dir-link/deeper/file.txt")), "deep");
    }

    #[test]
    fn beneath_refuses_links_that_leave() {
        let tree = Tree::new();
        let root = root_with(&tree, Resolution::Beneath);
        for path in [
            "/file-link",
            "/abs-link",
            "/link-out/secret.txt",
            "/link-out/",
            "/sub/deeper/up-link",
            "/inner-dir-link/deeper/up-link",
            "/proc-link",
        ] {
            let found = root.find(&segments(path), path.ends_with('/'));
            match found {
                Err(errno) => assert!(is_not_found(errno), "{path}: {errno}"),
                Ok(found) => panic!("{path} resolved to {found:?}"),
            }
        }
    }

    #[test]
    fn absolute_links_are_refused_even_when_they_point_inside() {
        let tree = Tree::new();
        let root = root_with(&tree, Resolution::Beneath);
        assert_eq!(root.find(&segments("/abs-inside-link"), false).unwrap_err(), Errno::EXDEV);
    }

    #[test]
    fn without_openat2_no_link_is_followed_and_plain_files_still_are_served() {
        let tree = Tree::new();
        let root = root_with(&tree, Resolution::NoLinks);
        let find = |path: &str| root.find(&segments(path), path.ends_with('/'));
        assert_eq!(read_found(find("/hello.txt")), "hello world");
        assert_eq!(read_found(find("/sub/")), "<h1>sub</h1>");
        assert_eq!(read_found(find("/sub/deeper/file.txt")), "deep");
        for path in [
            "/inner-link",
            "/inner-dir-link/",
            "/file-link",
            "/abs-link",
            "/link-out/secret.txt",
            "/sub/deeper/up-link",
        ] {
            assert_eq!(find(path).unwrap_err(), Errno::ELOOP, "{path}");
        }
    }

    #[test]
    fn directories_redirect_without_slash_and_odd_files_are_not_found() {
        let tree = Tree::new();
        for resolution in [Resolution::Beneath, Resolution::NoLinks] {
            let root = root_with(&tree, resolution);
            let find = |path: &str| root.find(&segments(path), path.ends_with('/'));
            assert!(matches!(find("/sub"), Ok(Found::Directory)));
            assert!(matches!(find("/sub/deeper/"), Err(Errno::ENOENT)), "no index");
            assert!(matches!(find("/hello.txt/"), Err(Errno::ENOENT)));
            assert!(matches!(find("/fifo"), Err(Errno::ENOENT)), "fifo is no page");
            assert!(matches!(find("/missing"), Err(Errno::ENOENT)));
        }
    }

    #[test]
    fn content_type_follows_the_extension() {
        let cases = [
            ("index.html", "text/html; charset=utf-8"),
            ("A.HTM", "text/html; charset=utf-8"),
            ("app.js", "text/javascript; charset=utf-8"),
            ("style.css", "text/css; charset=utf-8"),
            ("data.json", "application/json"),
            ("logo.svg", "image/svg+xml"),
            ("photo.JPG", "image/jpeg"),
            ("font.woff2", "font/woff2"),
            ("module.wasm", "application/wasm"),
            ("README", "application/octet-stream"),
            (".bashrc", "application/octet-stream"),
        ];
        for (name, expected) in cases {
            assert_eq!(content_type(OsStr::new(name)), expected, "{name}");
        }
    }

    async fn call(router: &Router, req: Request<Body>) -> (StatusCode, HeaderMap, String) {
        let resp = router.clone().oneshot(req).await.unwrap();
        let (parts, body) = resp.into_parts();
        let body = body.collect().await.unwrap().to_bytes();
        (parts.status, parts.headers, String::from_utf8_lossy(&body).into_owned())
    }

    fn get(path: &str) -> Request<Body> {
        Request::get(path).body(Body::empty()).unwrap()
    }

    /// A small file read whole answers as ServeFile does (ServeFile answers when the request
    /// carries a date precondition, here one that always holds), GET and HEAD, plain and
    /// precompressed; a file past the limit takes ServeFile's path and answers the same too.
    #[tokio::test]
    async fn a_file_read_whole_answers_with_the_headers_servefile_sends() {
        let tree = Tree::new();
        std::fs::write(tree.root().join("big.bin"), vec![7u8; WHOLE_MAX as usize + 1]).unwrap();
        std::fs::write(tree.root().join("hello.txt.gz"), b"not really gzip").unwrap();
        let app = static_files(&tree.root());
        let compared = [
            header::CONTENT_TYPE,
            header::CONTENT_LENGTH,
            header::LAST_MODIFIED,
            header::ETAG,
            header::ACCEPT_RANGES,
        ];
        for (path, gzip) in [("/hello.txt", false), ("/hello.txt", true), ("/big.bin", false)] {
            for method in [Method::GET, Method::HEAD] {
                let request = |precondition: bool| {
                    let mut req = Request::builder().method(method.clone()).uri(path);
                    if gzip {
                        req = req.header(header::ACCEPT_ENCODING, "gzip");
                    }
                    if precondition {
                        // If-Range without Range changes nothing, but only ServeFile answers it.
                        req = req.header(header::IF_RANGE, "\"another\"");
                    }
                    req.body(Body::empty()).unwrap()
                };
                // Read, then kept, then ServeFile's.
                let (read_status, read, read_body) = call(&app, request(false)).await;
                let (fast_status, fast, fast_body) = call(&app, request(false)).await;
                let (slow_status, slow, slow_body) = call(&app, request(true)).await;
                assert_eq!(
                    (read_status, fast_status, slow_status),
                    (StatusCode::OK, StatusCode::OK, StatusCode::OK),
                    "{method} {path}"
                );
                for name in &compared {
                    assert_eq!(read.get(name), fast.get(name), "{method} {path} gzip={gzip}: {name}");
                    assert_eq!(fast.get(name), slow.get(name), "{method} {path} gzip={gzip}: {name}");
                    assert!(fast.get(name).is_some(), "{method} {path}: no {name}");
                }
                assert_eq!(fast.get(header::CONTENT_ENCODING), slow.get(header::CONTENT_ENCODING));
                assert_eq!((&read_body, &fast_body), (&slow_body, &slow_body), "{method} {path}");
            }
        }
    }

    #[tokio::test]
    async fn serves_files_with_the_headers_a_browser_expects() {
        let tree = Tree::new();
        let app = static_files(&tree.root());

        let (status, headers, body) = call(&app, get("/hello.txt")).await;
        assert_eq!((status, body.as_str()), (StatusCode::OK, "hello world"));
        assert_eq!(headers[header::CONTENT_TYPE], "text/plain; charset=utf-8");
        assert_eq!(headers[header::CONTENT_LENGTH], "11");
        let modified = headers[header::LAST_MODIFIED].clone();

        let req = Request::get("/hello.txt")
            .header(header::IF_MODIFIED_SINCE, modified)
            .body(Body::empty())
            .unwrap();
        let (status, _, body) = call(&app, req).await;
        assert_eq!((status, body.as_str()), (StatusCode::NOT_MODIFIED, ""));

        let req = Request::get("/hello.txt").header(header::RANGE, "bytes=6-10").body(Body::empty()).unwrap();
        let (status, headers, body) = call(&app, req).await;
        assert_eq!((status, body.as_str()), (StatusCode::PARTIAL_CONTENT, "world"));
        assert_eq!(headers[header::CONTENT_RANGE], "bytes 6-10/11");

        let req = Request::head("/hello.txt").body(Body::empty()).unwrap();
        let (status, headers, body) = call(&app, req).await;
        assert_eq!((status, body.as_str()), (StatusCode::OK, ""));
        assert_eq!(headers[header::CONTENT_LENGTH], "11");
    }

    #[tokio::test]
    async fn entity_tags_answer_if_none_match_with_304_and_if_match_with_412() {
        let tree = Tree::new();
        let app = static_files(&tree.root());
        let (status, headers, _) = call(&app, get("/hello.txt")).await;
        assert_eq!(status, StatusCode::OK);
        let etag = headers[header::ETAG].to_str().unwrap().to_string();
        assert!(etag.starts_with('"') && etag.ends_with('"') && !etag.starts_with("W/"), "{etag}");
        let with = |name: header::HeaderName, value: &str| {
            Request::get("/hello.txt").header(name, value).body(Body::empty()).unwrap()
        };
        for matching in [etag.clone(), "*".into(), format!("W/{etag}"), format!("\"other\", {etag}")] {
            let (status, headers, body) = call(&app, with(header::IF_NONE_MATCH, &matching)).await;
            assert_eq!((status, body.as_str()), (StatusCode::NOT_MODIFIED, ""), "If-None-Match: {matching}");
            assert_eq!(headers[header::ETAG], etag.as_str());
        }
        let (status, _, body) = call(&app, with(header::IF_NONE_MATCH, "\"other\"")).await;
        assert_eq!((status, body.as_str()), (StatusCode::OK, "hello world"));
        // If-None-Match wins over an If-Modified-Since that alone would give 304.
        let req = Request::get("/hello.txt")
            .header(header::IF_NONE_MATCH, "\"other\"")
            .header(header::IF_MODIFIED_SINCE, "Fri, 01 Jan 2100 00:00:00 GMT")
            .body(Body::empty())
            .unwrap();
        assert_eq!(call(&app, req).await.0, StatusCode::OK);
        assert_eq!(call(&app, with(header::IF_MATCH, "\"other\"")).await.0, StatusCode::PRECONDITION_FAILED);
        assert_eq!(
            call(&app, with(header::IF_MATCH, &format!("W/{etag}"))).await.0,
            StatusCode::PRECONDITION_FAILED
        );
        assert_eq!(call(&app, with(header::IF_MATCH, &etag)).await.0, StatusCode::OK);
        // A file written anew gets a new tag: a_kept_file_that_changed_is_read_again_….
    }

    #[test]
    fn several_ranges_become_the_one_that_covers_them() {
        assert_eq!(covering_range("bytes=0-1,5-6", 11).as_deref(), Some("bytes=0-6"));
        assert_eq!(covering_range("bytes=6-,-2", 11).as_deref(), Some("bytes=6-10"));
        assert_eq!(covering_range("bytes=2-3, 0-0, 100-200", 11).as_deref(), Some("bytes=0-3"));
        assert_eq!(covering_range("bytes=0-1", 11), None, "a single range is ServeFile's");
        assert_eq!(covering_range("bytes=100-200,300-", 11), None, "none satisfiable");
        assert_eq!(covering_range("items=0-1,2-3", 11), None);
        assert_eq!(covering_range("bytes=a-b,0-1", 11), None);
    }

    #[tokio::test]
    async fn several_ranges_are_answered_with_one_covering_range() {
        let tree = Tree::new();
        let app = static_files(&tree.root());
        let req =
            Request::get("/hello.txt").header(header::RANGE, "bytes=0-1,6-7").body(Body::empty()).unwrap();
        let (status, headers, body) = call(&app, req).await;
        assert_eq!((status, body.as_str()), (StatusCode::PARTIAL_CONTENT, "hello wo"));
        assert_eq!(headers[header::CONTENT_RANGE], "bytes 0-7/11");
    }

    #[tokio::test]
    async fn a_precompressed_sibling_is_served_to_a_client_that_accepts_its_coding() {
        let tree = Tree::new();
        let root = tree.root();
        std::fs::write(root.join("hello.txt.gz"), "gzipped hello").unwrap();
        std::fs::write(root.join("sub/index.html.br"), "brotli index").unwrap();
        std::fs::write(root.join("sub/index.html.gz"), "gzipped index").unwrap();
        let app = static_files(&root);
        let asking = |path: &str, accept: &str| {
            Request::get(path).header(header::ACCEPT_ENCODING, accept).body(Body::empty()).unwrap()
        };
        let (status, headers, body) = call(&app, asking("/hello.txt", "gzip, deflate")).await;
        assert_eq!((status, body.as_str()), (StatusCode::OK, "gzipped hello"));
        assert_eq!(headers[header::CONTENT_ENCODING], "gzip");
        assert_eq!(
            headers[header::CONTENT_TYPE],
            "text/plain; charset=utf-8",
            "the type of what was asked for"
        );
        assert_eq!(headers[header::VARY], "accept-encoding");
        let (_, headers, body) = call(&app, asking("/sub/", "gzip, br")).await;
        assert_eq!(body, "brotli index", "br first");
        assert_eq!(headers[header::CONTENT_ENCODING], "br");
        for plain in ["gzip;q=0", "identity", ""] {
            let (_, headers, body) = call(&app, asking("/hello.txt", plain)).await;
            assert_eq!(body, "hello world", "Accept-Encoding: {plain}");
            assert!(!headers.contains_key(header::CONTENT_ENCODING));
        }
        // No coded sibling: the file itself, to anyone.
        let (_, headers, body) = call(&app, asking("/sub/deeper/file.txt", "br, gzip")).await;
        assert_eq!(body, "deep");
        assert!(!headers.contains_key(header::CONTENT_ENCODING));
    }

    #[tokio::test]
    async fn files_carry_the_configured_cache_control_and_errors_do_not() {
        let tree = Tree::new();
        let app = static_files_with(&tree.root(), Some("public, max-age=60"));
        let (status, headers, _) = call(&app, get("/hello.txt")).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(headers[header::CACHE_CONTROL], "public, max-age=60");
        let (status, headers, _) = call(&app, get("/nope.txt")).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert!(!headers.contains_key(header::CACHE_CONTROL));
        let (_, headers, _) = call(&static_files(&tree.root()), get("/hello.txt")).await;
        assert!(!headers.contains_key(header::CACHE_CONTROL), "none unless configured");
    }

    #[tokio::test]
    async fn a_missing_file_gets_a_short_text_404() {
        let tree = Tree::new();
        let app = static_files(&tree.root());
        let (status, headers, body) = call(&app, get("/nope.txt")).await;
        assert_eq!((status, body.as_str()), (StatusCode::NOT_FOUND, "404 not found\n"));
        assert_eq!(headers[header::CONTENT_TYPE], "text/plain; charset=utf-8");
    }

    #[tokio::test]
    async fn directories_get_their_index_after_a_slash_redirect() {
        let tree = Tree::new();
        let app = static_files(&tree.root());
        let (status, headers, _) = call(&app, get("/sub?x=1")).await;
        assert_eq!(status, StatusCode::TEMPORARY_REDIRECT);
        assert_eq!(headers[header::LOCATION], "/sub/?x=1");
        let (status, headers, body) = call(&app, get("/sub/")).await;
        assert_eq!((status, body.as_str()), (StatusCode::OK, "<h1>sub</h1>"));
        assert_eq!(headers[header::CONTENT_TYPE], "text/html; charset=utf-8");
    }

    #[tokio::test]
    async fn a_redirect_never_points_at_another_host() {
        let tree = Tree::new();
        let app = static_files(&tree.root());
        let (status, headers, _) = call(&app, get("//sub")).await;
        assert_eq!(status, StatusCode::TEMPORARY_REDIRECT);
        assert_eq!(headers[header::LOCATION], "/sub/");
    }

    #[tokio::test]
    async fn only_get_and_head_are_allowed() {
        let tree = Tree::new();
        let app = static_files(&tree.root());
        let req = Request::post("/hello.txt").body(Body::from("x")).unwrap();
        let (status, headers, _) = call(&app, req).await;
        assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(headers[header::ALLOW], "GET, HEAD");
    }

    #[tokio::test]
    async fn nothing_outside_the_root_is_ever_served() {
        let tree = Tree::new();
        let app = static_files(&tree.root());
        let attempts = [
            ("/../outside/secret.txt", StatusCode::NOT_FOUND),
            ("/%2e%2e/outside/secret.txt", StatusCode::NOT_FOUND),
            ("/sub/..%2f..%2foutside%2fsecret.txt", StatusCode::NOT_FOUND),
            ("/%252e%252e/outside/secret.txt", StatusCode::NOT_FOUND),
            ("/file-link", StatusCode::NOT_FOUND),
            ("/abs-link", StatusCode::NOT_FOUND),
            ("/link-out/secret.txt", StatusCode::NOT_FOUND),
            ("/sub/deeper/up-link", StatusCode::NOT_FOUND),
            ("/hello.txt%00.html", StatusCode::BAD_REQUEST),
            ("/missing", StatusCode::NOT_FOUND),
        ];
        for (path, expected) in attempts {
            let (status, _, body) = call(&app, get(path)).await;
            assert_eq!(status, expected, "{path}");
            assert!(!body.contains(SECRET), "{path} leaked the secret");
        }
    }

    /// The race a check-then-open design loses: a link flipped between a target inside and
    /// one outside while requests arrive. Each flip is an atomic rename, so every lookup
    /// sees one link or the other, and the outside one must never be served. Nothing is
    /// answered from memory (a validity of zero), so that every request is a lookup.
    #[tokio::test]
    async fn a_link_swapped_during_requests_never_leads_out() {
        let tree = Tree::new();
        let root = tree.root();
        symlink("hello.txt", root.join("racy")).unwrap();
        let files = files_with(&tree, Duration::ZERO, CACHE_BYTES);
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let swapper = std::thread::spawn({
            let (root, stop) = (root.clone(), stop.clone());
            move || {
                let targets = ["hello.txt", "../outside/secret.txt"];
                let mut i = 0;
                while !stop.load(Ordering::Relaxed) {
                    i += 1;
                    let staged = root.join(".racy-next");
                    let _ = std::fs::remove_file(&staged);
                    let swapped = symlink(targets[i % 2], &staged)
                        .and_then(|()| std::fs::rename(&staged, root.join("racy")));
                    if swapped.is_err() {
                        break; // the tree is gone: the test failed and dropped it
                    }
                }
            }
        });
        let mut served = 0;
        for _ in 0..400 {
            let (status, _, body) = fetch(&files, get("/racy")).await;
            assert!(!body.contains(SECRET), "the swapped link leaked the secret");
            if status == StatusCode::OK {
                assert_eq!(body, "hello world");
                served += 1;
            } else {
                assert_eq!(status, StatusCode::NOT_FOUND);
            }
        }
        stop.store(true, Ordering::Relaxed);
        swapper.join().unwrap();
        assert!(served > 0, "the inside target was never served");
    }

    fn files_with(tree: &Tree, valid: Duration, capacity: usize) -> Arc<Files> {
        Arc::new(Files::open_with(&tree.root(), None, Cache::new(valid, capacity)).unwrap())
    }

    async fn fetch(files: &Arc<Files>, req: Request<Body>) -> (StatusCode, HeaderMap, String) {
        let response = match files.answer(req).await {
            Answer::Served(response) => response,
            Answer::Missed(_, miss) => miss.response(),
        };
        let (parts, content) = response.into_parts();
        let body = content.into_body().collect().await.unwrap().to_bytes();
        (parts.status, parts.headers, String::from_utf8_lossy(&body).into_owned())
    }

    #[tokio::test]
    async fn within_its_validity_a_kept_file_answers_without_looking() {
        let tree = Tree::new();
        let files = files_with(&tree, Duration::from_secs(3600), CACHE_BYTES);
        assert!(files.kept(&get("/hello.txt")).is_none(), "nothing is kept before a first read");
        assert_eq!(fetch(&files, get("/hello.txt")).await.2, "hello world");
        std::fs::remove_file(tree.root().join("hello.txt")).unwrap();
        // Gone from the disk, still answered: no lookup was made.
        let kept = files.kept(&get("/hello.txt")).expect("kept after one read");
        assert_eq!(kept.status(), StatusCode::OK);
        assert_eq!(fetch(&files, get("/hello.txt")).await.2, "hello world");
        // A range is ServeFile's to answer, from the disk.
        let mut ranged = get("/hello.txt");
        ranged.headers_mut().insert(header::RANGE, HeaderValue::from_static("bytes=0-1"));
        assert!(files.kept(&ranged).is_none());
        assert_eq!(fetch(&files, ranged).await.0, StatusCode::NOT_FOUND);
    }

    #[tokio::test]
    async fn a_path_that_named_no_file_is_answered_from_memory_until_due() {
        let tree = Tree::new();
        let files = files_with(&tree, Duration::from_secs(3600), CACHE_BYTES);
        assert_eq!(fetch(&files, get("/later.txt")).await.0, StatusCode::NOT_FOUND);
        assert_eq!(fetch(&files, get("/other.txt")).await.0, StatusCode::NOT_FOUND);
        assert!(files.probe(&get("/later.txt")).err().expect("a miss is not an answer").missed);
        // Created since: within the validity of the miss, no lookup is made.
        std::fs::write(tree.root().join("later.txt"), "later").unwrap();
        assert_eq!(fetch(&files, get("/later.txt")).await.0, StatusCode::NOT_FOUND);
        assert!(
            !files.probe(&get("/hello.txt")).err().expect("not kept yet").missed,
            "only paths that missed"
        );
        // A method the files never answer is not a lookup, and not remembered.
        let post = Request::post("/x.txt").body(Body::empty()).unwrap();
        assert!(!files.probe(&post).err().expect("not an answer").missed);

        let due = files_with(&tree, Duration::ZERO, CACHE_BYTES);
        assert_eq!(fetch(&due, get("/new.txt")).await.0, StatusCode::NOT_FOUND);
        std::fs::write(tree.root().join("new.txt"), "new").unwrap();
        assert_eq!(fetch(&due, get("/new.txt")).await.2, "new", "a miss due for a check is looked up again");

        let bounded = files_with(&tree, Duration::from_secs(3600), CACHE_BYTES);
        for i in 0..MISSES + 10 {
            bounded.cache.miss(&format!("/missing/{i}"));
        }
        assert_eq!(bounded.cache.lock().misses.len(), MISSES, "remembered misses stay within their bound");
    }

    #[tokio::test]
    async fn a_kept_file_that_changed_is_read_again_once_due_for_a_check() {
        let tree = Tree::new();
        let files = files_with(&tree, Duration::ZERO, CACHE_BYTES);
        let path = tree.root().join("hello.txt");
        let (_, first, body) = fetch(&files, get("/hello.txt")).await;
        assert_eq!(body, "hello world");
        // Written in place, same size: mtime and ctime tell.
        std::fs::write(&path, "HELLO WORLD").unwrap();
        let (_, second, body) = fetch(&files, get("/hello.txt")).await;
        assert_eq!(body, "HELLO WORLD");
        assert_ne!(first[header::ETAG], second[header::ETAG]);
        // Replaced by a rename, as deploys do: a new inode.
        std::fs::write(tree.root().join(".next"), "replaced!!!").unwrap();
        std::fs::rename(tree.root().join(".next"), &path).unwrap();
        assert_eq!(fetch(&files, get("/hello.txt")).await.2, "replaced!!!");
        // Unchanged: the kept bytes answer again, with the same tag.
        let (_, again, _) = fetch(&files, get("/hello.txt")).await;
        let (_, twice, body) = fetch(&files, get("/hello.txt")).await;
        assert_eq!(
            (again[header::ETAG].clone(), body.as_str()),
            (twice[header::ETAG].clone(), "replaced!!!")
        );
        std::fs::remove_file(&path).unwrap();
        assert_eq!(fetch(&files, get("/hello.txt")).await.0, StatusCode::NOT_FOUND);
        assert!(files.cache.get("/hello.txt", 0).is_none(), "a removed file is forgotten");
    }

    #[tokio::test]
    async fn kept_files_answer_date_preconditions_after_entity_tags() {
        let tree = Tree::new();
        let files = files_with(&tree, Duration::from_secs(3600), CACHE_BYTES);
        fetch(&files, get("/hello.txt")).await;
        let with = |headers: &[(header::HeaderName, &'static str)]| {
            let mut req = get("/hello.txt");
            for (name, value) in headers {
                req.headers_mut().insert(name.clone(), HeaderValue::from_static(value));
            }
            files.kept(&req).expect("kept").status()
        };
        const FUTURE: &str = "Fri, 01 Jan 2100 00:00:00 GMT";
        const PAST: &str = "Thu, 01 Jan 1998 00:00:00 GMT";
        assert_eq!(with(&[(header::IF_MODIFIED_SINCE, FUTURE)]), StatusCode::NOT_MODIFIED);
        assert_eq!(with(&[(header::IF_MODIFIED_SINCE, PAST)]), StatusCode::OK);
        assert_eq!(with(&[(header::IF_MODIFIED_SINCE, "not a date")]), StatusCode::OK);
        assert_eq!(with(&[(header::IF_UNMODIFIED_SINCE, PAST)]), StatusCode::PRECONDITION_FAILED);
        assert_eq!(with(&[(header::IF_UNMODIFIED_SINCE, FUTURE)]), StatusCode::OK);
        // A tag that does not match wins over a date that would: the file changed.
        assert_eq!(
            with(&[(header::IF_NONE_MATCH, "\"old\""), (header::IF_MODIFIED_SINCE, FUTURE)]),
            StatusCode::OK
        );
        assert_eq!(
            with(&[(header::IF_MATCH, "*"), (header::IF_UNMODIFIED_SINCE, PAST)]),
            StatusCode::OK,
            "If-Unmodified-Since is not weighed when If-Match is there"
        );
    }

    #[tokio::test]
    async fn the_kept_files_stay_within_their_memory() {
        let tree = Tree::new();
        let size = 10_000;
        let capacity = 3 * (size + "/f0.bin".len() + ENTRY_OVERHEAD);
        let files = files_with(&tree, Duration::from_secs(3600), capacity);
        for i in 0..10 {
            std::fs::write(tree.root().join(format!("f{i}.bin")), vec![i as u8; size]).unwrap();
        }
        for i in 0..10 {
            let (status, _, body) = fetch(&files, get(&format!("/f{i}.bin"))).await;
            assert_eq!((status, body.len()), (StatusCode::OK, size), "f{i}");
            assert!(files.cache.lock().bytes <= capacity);
        }
        let kept = (0..10).filter(|i| files.kept(&get(&format!("/f{i}.bin"))).is_some()).count();
        assert_eq!(kept, 3, "the first three fill it; the rest are served, not kept");
    }
}
