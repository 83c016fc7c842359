//! lb's listening sockets for client traffic (HTTP, HTTPS, and routes' own ports): bound
//! with the address reusable, and listening with the whole accept queue the host allows.
use std::net::SocketAddr;

/// The accept queue asked of the kernel, which caps it at `net.core.somaxconn` (4096 by
/// default): a burst of connections larger than a small queue (tokio's 1024) would lose
/// SYNs, and each client would wait a second for its retransmit.
pub const LISTEN_BACKLOG: u32 = 65535;

/// A listening socket at `addr`, with the full accept queue the host allows. Needs a tokio
/// runtime (the socket is registered with it).
pub fn listen(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    reserve(addr)?.listen(LISTEN_BACKLOG)
}

/// A socket bound to `addr`, not yet listening: connections to it are refused. Also what
/// tells whether lb could listen there (dropped at once).
pub fn reserve(addr: SocketAddr) -> std::io::Result<tokio::net::TcpSocket> {
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    Ok(socket)
}
