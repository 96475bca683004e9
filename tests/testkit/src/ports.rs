//! Free TCP ports on loopback.
//!
//! A port number is only needed where another process must be told where to listen (Envoy's
//! config). In-process servers should bind `127.0.0.1:0` and keep the listener instead, which is
//! race-free; [`listener`] does that.

use std::net::{SocketAddr, TcpListener};

/// Picks a currently free loopback port by binding port 0 and releasing it.
///
/// The port is free at return time; another process could still take it before the caller binds
/// it. Ports handed out by this process are never handed out twice, which removes collisions
/// between tests in the same binary (the common case with cargo's parallel test threads).
pub fn free_port() -> u16 {
    use std::collections::HashSet;
    use std::sync::Mutex;
    static GIVEN: Mutex<Option<HashSet<u16>>> = Mutex::new(None);
    loop {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let port = l.local_addr().expect("local_addr").port();
        let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
        if given.get_or_insert_with(HashSet::new).insert(port) {
            return port;
        }
    }
}

/// Picks `n` distinct free loopback ports.
pub fn free_ports<const N: usize>() -> [u16; N] {
    std::array::from_fn(|_| free_port())
}

/// Binds a tokio listener on `127.0.0.1:0` (race-free; read the port from `local_addr`).
pub async fn listener() -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0))).await
}
