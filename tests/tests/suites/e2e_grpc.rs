//! gRPC through lb, with a real gRPC server and client (Python's grpcio): the backends
//! speak HTTP/2 in the clear (h2c, `"backend_protocol": "h2"`); the client reaches lb over
//! h2c on the HTTP listener and over TLS (h2 by ALPN) on the HTTPS one. A unary call, its
//! trailing metadata, an error status (carried in trailers) and a server stream all arrive.
use lb_tests::{grpc, lbproc::LbProcess, pki::Pki, topology::Topology};
use serde_json::json;

const LB: &str = "10.202.1.1";

#[test]
fn grpc_calls_reach_http2_backends_over_h2c_and_tls_with_their_trailers() {
    let topo = Topology::two_armed(1).unwrap();
    let backend = topo.backend(0, 50051);
    let _server = grpc::GrpcServer::start(&topo.backends[0], backend.into(), "b0").unwrap();
    let lb = LbProcess::start(&topo.lb, &topo.lb_ifaces, &["--http", &format!("{LB}:80")]).unwrap();
    lb.put_service(
        "echo",
        &json!({
            "http": {"paths": ["/lb.Echo/"], "backend_protocol": "h2"},
            "backends": [backend.to_string()],
        }),
    )
    .unwrap();
    let expected = json!({
        "say": "b0:hello",
        "trailer": "b0",
        "fail": ["NOT_FOUND", "no such thing: x"],
        "count": ["0", "1", "2"],
    });
    let got = grpc::call(&topo.client, &format!("{LB}:80"), None).unwrap();
    assert_eq!(got, expected, "h2c; lb: {}", lb.log_text());

    // Over TLS from the client (ALPN h2), the backend still in h2c.
    let pki = Pki::new(&[]).unwrap();
    let (cert, key) = pki.leaf(&["grpc.example.test"], -60, 86_400).unwrap();
    let body = json!({"cert": cert, "key": key}).to_string();
    let (status, answer) = lb.request("PUT", "/v1/certs/grpc", Some(&body)).unwrap();
    assert_eq!(status, 200, "{answer}");
    let got = lb_tests::eventually(std::time::Duration::from_secs(5), || {
        grpc::call(
            &topo.client,
            &format!("{LB}:443"),
            Some((&pki.ca(), "grpc.example.test")),
        )
        .is_ok_and(|got| got == expected)
    });
    assert!(
        got,
        "over TLS: {:?}",
        grpc::call(
            &topo.client,
            &format!("{LB}:443"),
            Some((&pki.ca(), "grpc.example.test"))
        )
    );

    // A protocol lb does not speak to backends: refused, naming the field.
    let (status, answer) = lb
        .request(
            "PUT",
            "/v1/services/bad",
            Some(&json!({"http": {"paths": ["/x"], "backend_protocol": "h3"}, "backends": [backend.to_string()]}).to_string()),
        )
        .unwrap();
    assert_eq!(status, 400, "{answer}");
    assert_eq!(answer["field"], "http.backend_protocol", "{answer}");
    lb.stop().unwrap();
}
