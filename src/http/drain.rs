//! HTTP/2 request bodies are drained, not dropped, when a route answers without reading them.
//!
//! Many answers are decided before the body is read: 401, 403, 404, 405, 413 from a declared
//! `Content-Length`, 429. warp then drops the request body unread. Under HTTP/2, when the last
//! handle on a stream goes away while the client is still sending, h2 ends the stream: after
//! the complete response (HEADERS, DATA with END_STREAM) it sends `RST_STREAM(NO_ERROR)`, as
//! RFC 9113 §8.1 allows. That is correct, and nghttp copes, but curl 7.88 (Debian bookworm's,
//! the one the README's walkthrough runs) does not when its body had not left yet: it reads
//! the whole answer, then, going on to send the body, finds the stream closed and fails the
//! transfer (error 92, "Stream error in the HTTP/2 framing layer", or 52, "Empty reply from
//! server"), dropping the answer. The integrator sees a network error instead of the error
//! code.
//!
//! So the listener hands each request body to warp inside a [`RequestBody`]. If an HTTP/2
//! body is dropped before its end, a task keeps reading and discarding it, up to the largest
//! body the gateway accepts on any route and for at most [`DRAIN_TIME`]. While the drain holds
//! the stream's receive side, h2 sends no reset: the answer goes out as soon as it is ready
//! (the drain runs beside it and does not delay it), and the stream ends when the client ends
//! its upload. curl, seeing the answer complete, ends its upload at once with an empty DATA
//! frame; when the request declared a `Content-Length`, h2 then resets the stream with
//! `PROTOCOL_ERROR` (RFC 9113 §8.1.1), which curl ignores, having its answer and having closed
//! its side. A body beyond the drain's bounds is reset as before, long after its answer. This
//! is done once, in the listener, so it holds for every route, warp's own rejections included.
//!
//! HTTP/1.1 needs none of this: there an unread body makes hyper close the connection after
//! the response, and the listener says so with `Connection: close` (see `listener.rs`).

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};

/// Longest time a drain waits for the rest of a body. A client still uploading after this
/// gets its stream reset; the answer it was given has long been sent.
const DRAIN_TIME: Duration = Duration::from_secs(30);

/// A request body that, dropped before its end, is read to its end (within bounds) by a
/// background task instead of being reset. HTTP/1.1 bodies are never drained.
pub struct RequestBody {
    /// `None` once the body has ended or failed: nothing is left to drain.
    inner: Option<Incoming>,
    /// Most bytes a drain reads before it gives up; `None`: no drain.
    drain_up_to: Option<u64>,
}

impl RequestBody {
    /// An HTTP/2 body, drained up to `max_bytes` if it is dropped before its end.
    pub fn h2(body: Incoming, max_bytes: u64) -> RequestBody {
        RequestBody {
            inner: Some(body),
            drain_up_to: Some(max_bytes),
        }
    }

    /// An HTTP/1.1 body: dropped unread, it makes hyper close the connection. Draining it
    /// instead would make hyper send `100 Continue` to a client that asked for it and has
    /// already been refused.
    pub fn h1(body: Incoming) -> RequestBody {
        RequestBody {
            inner: Some(body),
            drain_up_to: None,
        }
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let Some(body) = self.inner.as_mut() else {
            return Poll::Ready(None);
        };
        let polled = Pin::new(body).poll_frame(cx);
        if matches!(polled, Poll::Ready(None | Some(Err(_)))) {
            self.inner = None;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(Incoming::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), Incoming::size_hint)
    }
}

impl Drop for RequestBody {
    fn drop(&mut self) {
        let (Some(body), Some(max_bytes)) = (self.inner.take(), self.drain_up_to) else {
            return;
        };
        if body.is_end_stream() {
            return;
        }
        // Dropped outside a runtime (cannot happen in the listener): the body is reset.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(drain(body, max_bytes));
        }
    }
}

/// Reads and discards `body` until it ends, fails, passes `max_bytes` or [`DRAIN_TIME`]
/// passes; then drops it (which resets the stream if the client is still sending).
async fn drain(mut body: Incoming, max_bytes: u64) {
    let mut read = 0u64;
    let to_end = async {
        loop {
            match std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await {
                Some(Ok(frame)) => {
                    read += frame.data_ref().map_or(0, |d| d.len() as u64);
                    if read > max_bytes {
                        return;
                    }
                }
                Some(Err(_)) | None => return,
            }
        }
    };
    let _ = tokio::time::timeout(DRAIN_TIME, to_end).await;
}
