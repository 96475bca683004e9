//! Socket I/O adapters for the listeners: [`ScalarWrites`], which makes h2 batch small
//! responses into one write, and [`Guarded`], the handshake and idle deadlines and the
//! connection cap's permit of an accepted connection.

use std::future::Future as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;

use tonic::transport::server::Connected;

/// An accepted connection that tells h2 it has no vectored writes (also used by the bench's
/// null server, `null-authz --no-vectored`, to measure the same effect).
///
/// h2 copies a DATA frame's payload into its write buffer only below a "chain threshold":
/// 256 bytes when the socket supports vectored writes, 1 KiB when it does not. A larger
/// payload is chained instead, and while a chained frame is pending h2 accepts no other frame
/// until it has written to the socket. An allow answer with the identity headers is ~400
/// bytes, so with vectored writes every Check cost its own `writev` (about a third of
/// tokengate's CPU on a cache hit, ~6 µs per Check on loopback); without them the answers of
/// concurrent Checks leave in one write. Frames over 1 KiB (rare here) are written in two
/// plain writes instead of one vectored write. Measured in BENCHMARKS.md. Wraps TCP and Unix
/// streams alike (tokio's `UnixStream` writes vectored too).
pub struct ScalarWrites<S = tokio::net::TcpStream>(pub S);

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for ScalarWrites<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for ScalarWrites<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_shutdown(cx)
    }

    // `is_write_vectored` keeps its default, `false`: that is the point of this type.
}

impl<S: Connected> Connected for ScalarWrites<S> {
    type ConnectInfo = S::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.0.connect_info()
    }
}

/// An accepted connection with deadlines and a place in the connection cap: reads fail with
/// `TimedOut` (and the server closes the connection) if the first `handshake_bytes` bytes
/// (the 24-byte HTTP/2 preface; a request head on the admin port) have not all arrived
/// `handshake` after accept, or if nothing arrives for `idle` afterwards. Neither hyper nor
/// h2 has a deadline before the HTTP/2 handshake completes, so without this a client that
/// connects and sends nothing, or half a preface, holds its socket (and a connection slot)
/// forever. After the handshake, HTTP/2 keepalive PINGs make a healthy idle peer send
/// something (the PING ack) well within `idle`.
///
/// The permit of the connection cap is released when the connection is dropped.
pub struct Guarded<S> {
    inner: S,
    deadline: std::pin::Pin<Box<tokio::time::Sleep>>,
    handshake_left: usize,
    idle: std::time::Duration,
    _permit: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl<S> Guarded<S> {
    /// Wraps a just-accepted `inner`.
    pub fn new(
        inner: S,
        handshake: std::time::Duration,
        handshake_bytes: usize,
        idle: std::time::Duration,
        permit: Option<tokio::sync::OwnedSemaphorePermit>,
    ) -> Guarded<S> {
        Guarded {
            inner,
            deadline: Box::pin(tokio::time::sleep(handshake)),
            handshake_left: handshake_bytes,
            idle,
            _permit: permit,
        }
    }
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Guarded<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        use std::task::Poll;
        let before = buf.filled().len();
        match std::pin::Pin::new(&mut self.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let n = buf.filled().len() - before;
                if n > 0 {
                    let this = &mut *self;
                    this.handshake_left = this.handshake_left.saturating_sub(n);
                    // The handshake deadline is absolute (trickling bytes does not extend
                    // it); after it, each read restarts the idle clock.
                    if this.handshake_left == 0 {
                        let next = tokio::time::Instant::now() + this.idle;
                        this.deadline.as_mut().reset(next);
                    }
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => match self.deadline.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    if self.handshake_left > 0 {
                        "connection did not complete its handshake in time"
                    } else {
                        "connection idle for too long"
                    },
                ))),
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Guarded<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    // Not vectored, like `ScalarWrites` (which wraps this on the gRPC port).
}

impl<S: Connected> Connected for Guarded<S> {
    type ConnectInfo = S::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

/// The connection cap and deadlines, applied to each accepted connection.
#[derive(Clone)]
pub struct Admission {
    slots: Arc<Semaphore>,
    handshake: Duration,
    handshake_bytes: usize,
    idle: Duration,
    refused: Arc<AtomicU64>,
    what: &'static str,
}

impl Admission {
    /// At most `max_connections` open at once; each must send `handshake_bytes` within
    /// `handshake` of accept, then something at least every `idle`. `what` names the port in
    /// logs.
    pub fn new(
        max_connections: usize,
        handshake: Duration,
        handshake_bytes: usize,
        idle: Duration,
        what: &'static str,
    ) -> Admission {
        Admission {
            slots: Arc::new(Semaphore::new(max_connections.min(Semaphore::MAX_PERMITS))),
            handshake,
            handshake_bytes,
            idle,
            refused: Arc::new(AtomicU64::new(0)),
            what,
        }
    }

    /// The connection, guarded; `None` (and the connection closed, by dropping it) when the
    /// cap is reached.
    pub fn admit<S>(&self, stream: S) -> Option<Guarded<S>> {
        match Arc::clone(&self.slots).try_acquire_owned() {
            Ok(permit) => Some(Guarded::new(
                stream,
                self.handshake,
                self.handshake_bytes,
                self.idle,
                Some(permit),
            )),
            Err(_) => {
                // One line per 1000 refusals, not one per connection.
                let n = self.refused.fetch_add(1, Ordering::Relaxed);
                if n % 1000 == 0 {
                    tracing::warn!(
                        port = self.what,
                        refused_so_far = n + 1,
                        "connection cap reached; closing new connections"
                    );
                }
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn admission_caps_connections_and_frees_slots_on_drop() {
        let a = Admission::new(
            2,
            Duration::from_secs(1),
            24,
            Duration::from_secs(1),
            "test",
        );
        let one = a.admit(());
        let two = a.admit(());
        assert!(one.is_some() && two.is_some());
        assert!(a.admit(()).is_none());
        drop(one);
        assert!(a.admit(()).is_some());
    }
}
