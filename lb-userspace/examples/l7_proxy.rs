//! The L7 engine alone, for benchmarks: `l7_proxy LISTEN BACKEND...` proxies every request
//! to the backends (round robin) until Ctrl-C. LB_L7_WORKERS sets the worker threads.
use std::net::SocketAddr;

use lb::l7::{Proxy, ProxyConfig, Route};

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let listen: SocketAddr = args.next().unwrap_or("127.0.0.1:8080".into()).parse()?;
    let backends = args
        .map(|a| a.parse())
        .collect::<Result<Vec<SocketAddr>, _>>()?;
    let workers = std::env::var("LB_L7_WORKERS").map_or(Ok(0), |w| w.parse())?;
    let proxy = Proxy::new(ProxyConfig {
        workers,
        ..ProxyConfig::default()
    });
    proxy.set_routes(vec![Route {
        service: "bench".into(),
        backends,
        ..Route::default()
    }]);
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    proxy
        .clone()
        .serve(
            lb::l7::Frontends::http(listener),
            ctrl_c,
            lb::supervise::Supervisor::default(),
        )
        .await?;
    println!("{}", serde_json::to_string(&proxy.stats())?);
    Ok(())
}
