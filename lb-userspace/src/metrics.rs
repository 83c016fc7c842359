//! `GET /metrics`: what `GET /v1/stats` shows, for Prometheus (OpenMetrics text), as DFP
//! serves its own `/metrics`. Built anew from the counters at each scrape.
use std::sync::Arc;

use axum::{
    extract::State,
    http::{StatusCode, header::CONTENT_TYPE},
    response::{IntoResponse, Response},
};
use prometheus_client::{
    encoding::text::encode,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

use crate::{l7::Proxy, web::Shared};

/// One label: its name and value.
type Label = [(&'static str, String); 1];

/// A counter family, one series per `(value, count)` of `values`, labelled `label`.
fn counters<I>(registry: &mut Registry, name: &str, help: &str, label: &'static str, values: I)
where
    I: IntoIterator<Item = (String, u64)>,
{
    let family = Family::<Label, Counter>::default();
    for (value, n) in values {
        family.get_or_create(&[(label, value)]).inc_by(n);
    }
    registry.register(name, help, family);
}

pub async fn metrics(State(s): State<Shared>, proxy: Option<Arc<Proxy>>) -> Response {
    let read = s
        .controller()
        .call(|c| (c.drops(), c.flood(), c.service_count()))
        .await;
    let Ok((drops, flood, services)) = read else {
        return (StatusCode::SERVICE_UNAVAILABLE, "the controller stopped\n").into_response();
    };
    let mut registry = Registry::default();
    counters(
        &mut registry,
        "lb_xdp_drops",
        "Packets XDP dropped, by reason",
        "reason",
        drops.into_iter().map(|(r, n)| (r.name().to_string(), n)),
    );
    let cookies = Gauge::<i64>::default();
    cookies.set(i64::from(flood.cookies));
    registry.register(
        "lb_syn_cookie_mode",
        "1 while new connections are answered with SYN cookies",
        cookies,
    );
    let syn_rate = Gauge::<i64>::default();
    syn_rate.set(i64::try_from(flood.syn_rate).unwrap_or(i64::MAX));
    registry.register(
        "lb_syn_rate",
        "New SYNs a second, as last measured",
        syn_rate,
    );
    let count = Gauge::<i64>::default();
    count.set(i64::try_from(services).unwrap_or(i64::MAX));
    registry.register("lb_services", "Services configured", count);
    if let Some(proxy) = proxy {
        let stats = proxy.stats();
        counters(
            &mut registry,
            "lb_http_requests",
            "HTTP requests routed to each service",
            "service",
            stats.requests,
        );
        counters(
            &mut registry,
            "lb_http_answers",
            "Answers lb gave itself (not the backends'), by status",
            "status",
            stats
                .answers
                .into_iter()
                .map(|(status, n)| (status.to_string(), n)),
        );
        counters(
            &mut registry,
            "lb_http_refused",
            "Clients refused or cut by a limit, by kind",
            "kind",
            stats.refused,
        );
        let redispatched = Counter::<u64>::default();
        redispatched.inc_by(stats.redispatched);
        registry.register(
            "lb_http_redispatched",
            "Requests sent to a second backend after the first did not take them",
            redispatched,
        );
        let open = Family::<Label, Gauge>::default();
        for (backend, n) in stats.backend_connections {
            open.get_or_create(&[("backend", backend)])
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
        registry.register(
            "lb_http_backend_connections",
            "Connections open to each HTTP backend: pooled, in use and upgraded",
            open,
        );
    }
    let mut text = String::new();
    if encode(&mut text, &registry).is_err() {
        return (StatusCode::INTERNAL_SERVER_ERROR, "encoding the metrics\n").into_response();
    }
    (
        [(
            CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response()
}
