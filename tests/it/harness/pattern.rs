//! Request bodies a test can check byte for byte without keeping a copy: [`Pattern`] is a
//! pure function of its seed and offset, so the sender and the checker agree without sharing
//! state, and [`PatternBody`] streams it in chunks, never holding the whole body.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};

/// A deterministic pseudo-random byte stream: byte `i` depends only on the seed and `i`, so a
/// sender and a checker can each produce it without sharing state.
#[derive(Debug, Clone)]
pub struct Pattern {
    seed: u64,
    offset: u64,
}

impl Pattern {
    pub fn new(seed: u64) -> Pattern {
        Pattern { seed, offset: 0 }
    }

    /// Bytes produced so far.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Fills `buf` with the next bytes.
    pub fn fill(&mut self, buf: &mut [u8]) {
        let mut i = 0;
        while i < buf.len() {
            let word = splitmix64(self.seed ^ (self.offset >> 3)).to_le_bytes();
            let skip = (self.offset & 7) as usize;
            let n = (8 - skip).min(buf.len() - i);
            buf[i..i + n].copy_from_slice(&word[skip..skip + n]);
            i += n;
            self.offset += n as u64;
        }
    }

    /// True when `data` is exactly the next `data.len()` bytes.
    pub fn check(&mut self, data: &[u8]) -> bool {
        let mut expected = vec![0; data.len()];
        self.fill(&mut expected);
        expected == data
    }
}

fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A request body of `len` [`Pattern`] bytes, made chunk by chunk as it is sent.
#[derive(Debug)]
pub struct PatternBody {
    pattern: Pattern,
    remaining: u64,
}

/// Size of each chunk a [`PatternBody`] yields.
const PATTERN_CHUNK: u64 = 256 * 1024;

impl PatternBody {
    pub fn new(seed: u64, len: u64) -> PatternBody {
        PatternBody { pattern: Pattern::new(seed), remaining: len }
    }
}

impl Body for PatternBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        if this.remaining == 0 {
            return Poll::Ready(None);
        }
        let n = this.remaining.min(PATTERN_CHUNK);
        let mut chunk = vec![0; n as usize];
        this.pattern.fill(&mut chunk);
        this.remaining -= n;
        Poll::Ready(Some(Ok(Frame::data(Bytes::from(chunk)))))
    }

    fn is_end_stream(&self) -> bool {
        self.remaining == 0
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.remaining)
    }
}
