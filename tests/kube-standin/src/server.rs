//! The HTTPS accept loop: TLS via tokio-rustls, HTTP/1.1 and HTTP/2 via hyper-util's
//! auto builder, one task per connection. `Fault::Down` closes the listening socket and
//! aborts every open connection (so pooled client connections see the outage too); when
//! the fault is cleared the loop binds the same address again. `Fault::Reset` resets each new
//! connection (TCP RST) as soon as it is accepted.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;

use crate::api::{self, Shared};

/// Runs until `shutdown` becomes true.
pub async fn run(
    shared: Arc<Shared>,
    listener: TcpListener,
    addr: SocketAddr,
    acceptor: TlsAcceptor,
    mut down: watch::Receiver<bool>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut listener = Some(listener);
    let mut conns: JoinSet<()> = JoinSet::new();
    loop {
        if *shutdown.borrow() {
            break;
        }
        let want_down = *down.borrow();
        match (&listener, want_down) {
            (Some(_), true) => {
                listener = None;
                conns.abort_all();
                continue;
            }
            (None, false) => {
                match TcpListener::bind(addr).await {
                    Ok(l) => listener = Some(l),
                    Err(e) => {
                        tracing::warn!(%addr, error = %e, "rebinding failed; retrying");
                        tokio::select! {
                            _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                            _ = shutdown.changed() => {}
                        }
                    }
                }
                continue;
            }
            _ => {}
        }
        match &listener {
            Some(l) => {
                tokio::select! {
                    r = shutdown.changed() => { if r.is_err() { break; } }
                    r = down.changed() => { if r.is_err() { break; } }
                    Some(_) = conns.join_next(), if !conns.is_empty() => {}
                    accepted = l.accept() => {
                        match accepted {
                            Ok((tcp, _peer)) => {
                                let shared = shared.clone();
                                let acceptor = acceptor.clone();
                                conns.spawn(serve_connection(shared, tcp, acceptor));
                            }
                            Err(e) => {
                                tracing::warn!(error = %e, "accept failed");
                                tokio::time::sleep(Duration::from_millis(10)).await;
                            }
                        }
                    }
                }
            }
            None => {
                tokio::select! {
                    r = shutdown.changed() => { if r.is_err() { break; } }
                    r = down.changed() => { if r.is_err() { break; } }
                    Some(_) = conns.join_next(), if !conns.is_empty() => {}
                }
            }
        }
    }
    conns.abort_all();
}

async fn serve_connection(shared: Arc<Shared>, tcp: tokio::net::TcpStream, acceptor: TlsAcceptor) {
    if shared.fault() == crate::Fault::Reset {
        // Zero linger: closing sends RST instead of FIN.
        let _ = tcp.set_zero_linger();
        return;
    }
    let _ = tcp.set_nodelay(true);
    let tls = match acceptor.accept(tcp).await {
        Ok(t) => t,
        Err(e) => {
            tracing::debug!(error = %e, "TLS handshake failed");
            return;
        }
    };
    let svc = service_fn(move |req| api::handle(shared.clone(), req));
    if let Err(e) = Builder::new(TokioExecutor::new())
        .serve_connection(TokioIo::new(tls), svc)
        .await
    {
        tracing::debug!(error = %e, "connection ended with error");
    }
}
