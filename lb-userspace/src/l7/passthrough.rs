//! TLS passed through by SNI (DFP's `reqMode=sni`): a connection to the HTTPS listener
//! whose ClientHello names a `tls_passthrough` route goes whole, handshake included, to
//! one of its backends, which terminates TLS itself; lb sees no plaintext. Anything else
//! is terminated here as usual.
use std::{net::SocketAddr, sync::Arc};

use tokio::net::TcpStream;

use super::{
    Proxy,
    lease::{Lease, pick},
    limits::splice_until_idle,
    sni,
};

/// Passes `stream` through if its SNI names a passthrough route; gives it back otherwise.
pub(crate) async fn serve(
    proxy: &Arc<Proxy>,
    stream: TcpStream,
    peer: SocketAddr,
) -> Option<TcpStream> {
    let limits = &proxy.config.limits;
    let name = sni::peek_server_name(&stream, limits.header_timeout).await?;
    // The routes as they are now, after the wait for the hello.
    let table = proxy.table();
    let Some(t) = table.passthrough(&name) else {
        return Some(stream);
    };
    let target = table.target(t);
    target.requests.add(1);
    let Some(b) = pick(target) else {
        tracing::debug!(client = %peer, service = %target.service, "no healthy backend to pass TLS to");
        return None;
    };
    let mut lease = Lease::new(table.clone(), t, b);
    let mut upstream = None;
    // Whether the last backend tried was at its cap: what the refusal is counted as, as
    // for HTTP requests.
    let mut full = false;
    // A backend that cannot be reached, or is at its connection cap, gets a second, as
    // for HTTP requests.
    for attempt in 0..2 {
        let addr = lease.backend().addr;
        match lease.backend().slot() {
            // The tunnel holds its place under the backend's cap while it lasts.
            Ok(slot) => {
                full = false;
                match tokio::time::timeout(proxy.config.connect_timeout, TcpStream::connect(addr))
                    .await
                {
                    Ok(Ok(s)) => {
                        upstream = Some((s, slot));
                        break;
                    }
                    Ok(Err(e)) => {
                        tracing::debug!(%addr, error = %e, "passing TLS through: connecting");
                    }
                    Err(_) => tracing::debug!(%addr, "passing TLS through: connect timed out"),
                }
            }
            Err(e) => {
                full = true;
                tracing::debug!(%addr, error = %e, "passing TLS through");
            }
        }
        match lease.redispatch() {
            Some(other) if attempt == 0 => lease = other,
            _ => break,
        }
    }
    let Some((mut upstream, _slot)) = upstream else {
        if full {
            proxy
                .refusals
                .count(super::limits::Refusal::BackendConnections);
        }
        return None;
    };
    let _ = upstream.set_nodelay(true);
    let mut stream = stream;
    let idle = target.timeouts.tunnel.unwrap_or(limits.tunnel_timeout);
    splice_until_idle(&mut stream, &mut upstream, idle).await;
    drop(lease);
    None
}
