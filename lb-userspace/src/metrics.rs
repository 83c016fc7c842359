//! `GET /metrics`: what `GET /v1/stats` shows, for Prometheus (OpenMetrics text), as DFP
//! serves its own `/metrics`. Built anew from the counters at each scrape.
use std::sync::Arc;

use axum::{
    extract::State,
    http::{StatusCode, header::CONTENT_TYPE},
    response::{IntoResponse, Response},
};
use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

use crate::{l7::Proxy, web::Shared};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Reason {
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServiceLabel {
    service: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Status {
    status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Kind {
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BackendLabel {
    backend: String,
}

/// A counter family filled with `values`.
fn counters<L, I>(registry: &mut Registry, name: &str, help: &str, values: I)
where
    L: EncodeLabelSet + Clone + std::hash::Hash + Eq + std::fmt::Debug + Send + Sync + 'static,
    I: IntoIterator<Item = (L, u64)>,
{
    let family = Family::<L, Counter>::default();
    for (labels, n) in values {
        family.get_or_create(&labels).inc_by(n);
    }
    registry.register(name, help, family);
}

pub async fn metrics(State(s): State<Shared>, proxy: Option<Arc<Proxy>>) -> Response {
    let read = s
        .controller()
        .call(|c| (c.drops(), c.flood(), c.list().len()))
        .await;
    let Ok((drops, flood, services)) = read else {
        return (StatusCode::SERVICE_UNAVAILABLE, "the controller stopped\n").into_response();
    };
    let mut registry = Registry::default();
    counters(
        &mut registry,
        "lb_xdp_drops",
        "Packets XDP dropped, by reason",
        drops.into_iter().map(|(r, n)| {
            let reason = r.name().to_string();
            (Reason { reason }, n)
        }),
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
            stats
                .requests
                .into_iter()
                .map(|(service, n)| (ServiceLabel { service }, n)),
        );
        counters(
            &mut registry,
            "lb_http_answers",
            "Answers lb gave itself (not the backends'), by status",
            stats.answers.into_iter().map(|(status, n)| {
                let status = status.to_string();
                (Status { status }, n)
            }),
        );
        counters(
            &mut registry,
            "lb_http_refused",
            "Clients refused or cut by a limit, by kind",
            stats
                .refused
                .into_iter()
                .map(|(kind, n)| (Kind { kind }, n)),
        );
        let redispatched = Counter::<u64>::default();
        redispatched.inc_by(stats.redispatched);
        registry.register(
            "lb_http_redispatched",
            "Requests sent to a second backend after the first did not take them",
            redispatched,
        );
        let open = Family::<BackendLabel, Gauge>::default();
        for (backend, n) in stats.backend_connections {
            open.get_or_create(&BackendLabel { backend })
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
