//! The library's error type ([`Error`], what [`crate::serve`] returns) and [`Report`], which
//! prints an error with its whole cause chain, each cause once.

use std::fmt;

use crate::review::SetupError;

/// Why tokengate could not start or stopped serving.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Setting up the Kubernetes client failed.
    #[error("setting up the Kubernetes client")]
    Setup(#[from] SetupError),
    /// The system random number generator failed (cache key).
    #[error("the system random number generator failed")]
    Random,
    /// The gRPC server failed.
    #[error("gRPC server")]
    Transport(#[source] tonic::transport::Error),
    /// The gRPC listener's TLS files could not be used (`listen.tls`).
    #[error("listen.tls")]
    Tls(#[from] crate::tls::TlsError),
    /// `listen.tls` is set but the gRPC listener is a Unix socket.
    #[error("listen.tls: TLS applies to a TCP listener, not a Unix socket")]
    TlsOnUnixSocket,
    /// A listener could not be bound (`what` names its setting).
    #[error("binding {what}")]
    Bind {
        /// The listen setting, e.g. `listen.http`.
        what: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Displays an error and its sources as `outer: cause: root cause`. A cause whose text the
/// line already contains is skipped: many library errors (kube's among them) repeat their
/// source in their own message, and a plain chain walk would print it two or three times.
#[derive(Clone, Copy)]
pub struct Report<'a>(pub &'a (dyn std::error::Error + 'static));

impl fmt::Display for Report<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut line = self.0.to_string();
        let mut source = self.0.source();
        while let Some(cause) = source {
            let text = cause.to_string();
            if !text.is_empty() && !line.contains(&text) {
                line.push_str(": ");
                line.push_str(&text);
            }
            source = cause.source();
        }
        f.write_str(&line)
    }
}

impl fmt::Debug for Report<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer: {0}")]
    struct Repeats(#[source] std::io::Error);

    #[derive(Debug, thiserror::Error)]
    #[error("setting up")]
    struct Top(#[source] Repeats);

    #[test]
    fn each_cause_printed_once() {
        let e = Top(Repeats(std::io::Error::other("certificate unknown")));
        assert_eq!(
            Report(&e).to_string(),
            "setting up: outer: certificate unknown"
        );
    }
}
