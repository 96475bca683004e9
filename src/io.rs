//! Socket I/O adapters for the gRPC listener: [`ScalarWrites`], which makes h2 batch small
//! responses into one write.

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
