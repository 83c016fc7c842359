//! Store traffic encrypted and authenticated: lb reaches etcd over TLS (with a client
//! certificate) as a user with a password, and Consul over HTTPS with its ACL token. A
//! server whose certificate cannot be checked, a missing client certificate or a wrong
//! password stop lb at start with an error naming the store, and a client speaking the
//! other protocol gets nothing through. Certificates are made by the test (`pki.rs`); etcd
//! is the real one, with TLS and auth turned on.
use std::{path::Path, process::Command, time::Duration};

use lb::store::{
    Expect, StoreError,
    access::{Access, EtcdUser, read_ca_file, read_client_identity},
};
use lb_tests::{
    consul::ConsulServer,
    etcd::{EtcdCluster, Secure},
    eventually,
    lbproc::{LbProcess, lb_bin, output_within},
    netns::Netns,
    pki::Pki,
    servers::http_get_once,
    topology::Topology,
    unique,
};
use serde_json::{Value, json};

const ROOT_PASSWORD: &str = "s3cret pass";

/// Access through the test's CA (or `ca`), with its client certificate and, if given, as
/// `root` with `password`.
fn access(pki: &Pki, ca: Option<&Path>, password: Option<&str>) -> Access {
    Access {
        ca: ca.map(|c| read_ca_file(c).unwrap()),
        identity: Some(read_client_identity(&pki.client_cert(), &pki.client_key()).unwrap()),
        etcd_user: password.map(|p| EtcdUser {
            name: "root".into(),
            password: p.into(),
        }),
    }
}

async fn open(url: &str, token: Option<&str>, access: &Access) -> Result<(), StoreError> {
    lb::store::open(url, &unique("lbt"), token.map(str::to_string), access)
        .await
        .map(drop)
}

/// The error of opening `url`, which must be a refusal: retrying would not mend it.
async fn refusal(url: &str, token: Option<&str>, access: &Access) -> String {
    match open(url, token, access).await {
        Err(e @ StoreError::Refused(_)) => e.to_string(),
        Err(e) => panic!("expected a refusal, got {e:?}"),
        Ok(()) => panic!("{url} opened"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn etcd_over_tls_as_a_user_stores_watches_and_deletes() {
    let pki = Pki::new(&[]).unwrap();
    let secure = Secure {
        pki: &pki,
        root_password: ROOT_PASSWORD,
    };
    let etcd = EtcdCluster::start_secure(&secure).unwrap();
    let access = access(&pki, Some(&pki.ca()), Some(ROOT_PASSWORD));
    let store = lb::store::open(&etcd.url(), &unique("lbt"), None, &access)
        .await
        .unwrap();
    let start = store.list().await.unwrap();
    let mut watch = store.watch(&start);
    let r = store.put("web", b"{}", Expect::Absent).await.unwrap();
    let event = tokio::time::timeout(Duration::from_secs(5), watch.recv())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(event.revision(), r);
    assert_eq!(store.list().await.unwrap().entries[0].name, "web");
    assert!(store.delete("web", Expect::Revision(r)).await.unwrap());
}

#[tokio::test(flavor = "multi_thread")]
async fn etcd_over_tls_refuses_what_it_cannot_trust_and_a_wrong_password() {
    let pki = Pki::new(&[]).unwrap();
    let secure = Secure {
        pki: &pki,
        root_password: ROOT_PASSWORD,
    };
    let etcd = EtcdCluster::start_secure(&secure).unwrap();
    let url = etcd.url();
    let named = format!("etcd at https://{}", etcd.endpoints()[0]);

    // A server certificate from a CA lb was not told to trust: the given one, or the
    // system's roots when no CA file is given.
    for ca in [Some(pki.other_ca()), None] {
        let e = refusal(
            &url,
            None,
            &access(&pki, ca.as_deref(), Some(ROOT_PASSWORD)),
        )
        .await;
        assert!(e.contains(&named), "{e}");
        assert!(e.contains("TLS: invalid peer certificate"), "{e}");
    }

    // The right CA, but a wrong password, or none at all.
    let e = refusal(&url, None, &access(&pki, Some(&pki.ca()), Some("wrong"))).await;
    assert!(e.contains(&named), "{e}");
    assert!(e.contains("authentication failed"), "{e}");
    let e = refusal(&url, None, &access(&pki, Some(&pki.ca()), None)).await;
    assert!(e.contains(&named), "{e}");

    // No client certificate, where the server asks for one: the server's alert arrives
    // after the handshake, through HTTP/2, which keeps at most its text (or only "connection
    // closed", or "broken pipe" when the client's first write meets the closed socket); lb
    // cannot tell it from a failing member, so it is no access and a retry,
    // and the message says what a certificate would mend.
    let no_cert = Access {
        identity: None,
        ..access(&pki, Some(&pki.ca()), Some(ROOT_PASSWORD))
    };
    match open(&url, None, &no_cert).await {
        Err(StoreError::Unavailable(e)) => {
            assert!(
                e.contains(&named)
                    && (e.contains("received fatal alert")
                        || e.contains("connection closed")
                        || e.contains("broken pipe"))
                    && e.contains("give one with --store-cert-file and --store-key-file"),
                "{e}"
            );
        }
        other => panic!("opened without a client certificate: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn plaintext_and_tls_etcd_clients_and_servers_do_not_mix() {
    let pki = Pki::new(&[]).unwrap();
    let secure = Secure {
        pki: &pki,
        root_password: ROOT_PASSWORD,
    };
    let tls_etcd = EtcdCluster::start_secure(&secure).unwrap();
    // A clear-text client gets no answer from the TLS server.
    let plain = format!("http://{}", tls_etcd.endpoints()[0]);
    let client = lb::store::etcd::connect_client(&[plain], &Access::default())
        .await
        .unwrap();
    let answer = client.kv_client().get("lbt-probe", None).await;
    assert!(answer.is_err(), "a clear-text client read {answer:?}");

    // A TLS client gets nothing from a server that speaks no TLS either: the server closes
    // the connection mid-handshake, or resets it (when the ClientHello is still unread),
    // either at the first connect or at the first request; lb cannot tell it from a member
    // going away, so it is no access and a retry.
    let plain_etcd = EtcdCluster::start(1).unwrap();
    let url = format!("etcds://{}", plain_etcd.endpoints()[0]);
    let listed =
        match lb::store::open(&url, "lbt", None, &access(&pki, Some(&pki.ca()), None)).await {
            Ok(store) => store.list().await.map(|_| ()),
            Err(e) => Err(e),
        };
    match listed {
        Err(StoreError::Unavailable(e)) => assert!(
            e.contains("tls handshake") || e.contains("reset by peer"),
            "{e}"
        ),
        other => panic!("a TLS client read from a clear-text server: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn consul_over_https_carries_the_token_and_checks_the_agent() {
    let pki = Pki::new(&[]).unwrap();
    let server = ConsulServer::start_tls(pki.server_config().unwrap())
        .unwrap()
        .with_token("t0ken");
    let url = server.url();
    assert!(url.starts_with("consuls://"), "{url}");
    let with_ca = Access {
        ca: Some(read_ca_file(&pki.ca()).unwrap()),
        ..Access::default()
    };
    let prefix = unique("lbt");
    let store = lb::store::open(&url, &prefix, Some("t0ken".into()), &with_ca)
        .await
        .unwrap();
    let r = store
        .put("web", b"{\"x\":1}", Expect::Absent)
        .await
        .unwrap();
    assert_eq!(store.list().await.unwrap().entries[0].revision, r);
    assert_eq!(
        server
            .kv_get_raw(&format!("{prefix}/services/web"))
            .unwrap(),
        b"{\"x\":1}"
    );
    // The token is what let it through: without it the agent refuses.
    let anonymous = lb::store::open(&url, &prefix, None, &with_ca)
        .await
        .unwrap();
    let e = anonymous.list().await.unwrap_err().to_string();
    assert!(e.contains("403"), "{e}");

    // Without the CA (the system's roots), or with another one, lb refuses the agent
    // before sending the token.
    let requests = server.requests();
    for ca in [None, Some(read_ca_file(&pki.other_ca()).unwrap())] {
        let access = Access {
            ca,
            ..Access::default()
        };
        let e = refusal(&url, Some("t0ken"), &access).await;
        assert!(
            e.contains(&format!(
                "consul at {}: TLS: invalid peer certificate",
                server.addr()
            )),
            "{e}"
        );
    }
    assert_eq!(server.requests(), requests, "a request got through");

    // A clear-text client gets nothing from the HTTPS agent.
    let plain = format!("consul://{}", server.addr());
    let store = lb::store::open(&plain, &prefix, Some("t0ken".into()), &Access::default())
        .await
        .unwrap();
    assert!(matches!(
        store.list().await,
        Err(StoreError::Unavailable(_))
    ));
    assert_eq!(
        server.requests(),
        requests,
        "a clear-text request got through"
    );
}

const T: Duration = Duration::from_secs(3);

/// `lb run`'s flags for etcd over TLS with the test's client certificate, as `root` with
/// the password in `password_file`, and `ca` (none: the system's roots).
fn etcd_flags(url: &str, pki: &Pki, ca: Option<&Path>, password_file: &Path) -> Vec<String> {
    let mut flags: Vec<String> = vec!["--store".into(), url.into()];
    if let Some(ca) = ca {
        flags.extend(["--store-ca-file".into(), ca.display().to_string()]);
    }
    for (flag, path) in [
        ("--store-cert-file", pki.client_cert()),
        ("--store-key-file", pki.client_key()),
        ("--store-password-file", password_file.to_path_buf()),
    ] {
        flags.extend([flag.into(), path.display().to_string()]);
    }
    flags.extend(["--store-user".into(), "root".into()]);
    flags
}

fn services(lb: &LbProcess) -> Value {
    lb.request("GET", "/v1/services", None).unwrap().1
}

#[test]
fn lb_keeps_its_services_in_etcd_over_tls_as_a_user_across_a_restart() {
    let topo = Topology::two_armed(1).unwrap();
    let _backends = topo.start_backends(1, 8080, false).unwrap();
    let pki = Pki::new(&[]).unwrap();
    let password = pki
        .write("password", &format!("{ROOT_PASSWORD}\n"))
        .unwrap();
    let secure = Secure {
        pki: &pki,
        root_password: ROOT_PASSWORD,
    };
    // etcd on the balancer's own loopback: only lb talks to it.
    let etcd = EtcdCluster::start_secure_in(&topo.lb, "127.0.0.1", &secure).unwrap();
    let mut flags = etcd_flags(&etcd.url(), &pki, Some(&pki.ca()), &password);
    flags.extend(["--store-prefix".into(), unique("lbt")]);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();

    let first = LbProcess::start(&topo.lb, &topo.lb_ifaces, &flags).unwrap();
    let spec =
        json!({"vip": topo.vip(80).to_string(), "backends": [topo.backend(0, 8080).to_string()]});
    first.put_service("web", &spec).unwrap();
    let before = services(&first);
    assert!(first.stop().unwrap().success());

    // Its only store is that etcd: what the next lb restores came from there.
    let second = LbProcess::start(&topo.lb, &topo.lb_ifaces, &flags).unwrap();
    assert_eq!(services(&second), before);
    assert!(http_get_once(&topo.client, topo.vip(80).into(), T).is_ok());
    drop(second);
}

/// Runs `lb run` in `ns` with `flags`, which must make it refuse to start: its one line
/// on stderr.
fn refused_start(ns: &Netns, flags: &[String]) -> String {
    let bpffs = std::path::PathBuf::from("/sys/fs/bpf").join(unique("lbt"));
    let out = output_within(
        Command::new("nsenter")
            .arg(format!("--net={}", ns.path()))
            .arg(lb_bin())
            .args(["run", "--iface", "lo", "--http", "off", "--bpffs"])
            .arg(&bpffs)
            .args(flags),
        Duration::from_secs(30),
    );
    lb_tests::lbproc::lb_down(&ns.path(), &bpffs);
    let out = out.unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "lb started: {stderr}");
    stderr
        .lines()
        .find(|l| l.starts_with("lb: error: "))
        .unwrap_or_else(|| panic!("no error line: {stderr}"))
        .to_string()
}

#[test]
fn lb_refuses_to_start_on_an_etcd_it_cannot_trust_or_with_a_wrong_password() {
    let ns = Netns::new(&unique("lbt-x")).unwrap();
    let pki = Pki::new(&[]).unwrap();
    let secure = Secure {
        pki: &pki,
        root_password: ROOT_PASSWORD,
    };
    let etcd = EtcdCluster::start_secure_in(&ns, "127.0.0.1", &secure).unwrap();
    let url = etcd.url();
    let named = format!("etcd at https://{}", etcd.endpoints()[0]);
    let password = pki.write("password", ROOT_PASSWORD).unwrap();
    let wrong = pki.write("wrong", "guess\n").unwrap();

    // Without the CA: the system's roots do not vouch for the test's CA.
    let e = refused_start(&ns, &etcd_flags(&url, &pki, None, &password));
    assert!(e.contains(&named), "{e}");
    assert!(e.contains("TLS: invalid peer certificate"), "{e}");

    let e = refused_start(&ns, &etcd_flags(&url, &pki, Some(&pki.ca()), &wrong));
    assert!(e.contains(&named), "{e}");
    assert!(e.contains("authentication failed"), "{e}");

    // A password file others may read is refused before anything is sent.
    let open = pki.write("open", ROOT_PASSWORD).unwrap();
    std::fs::set_permissions(&open, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let e = refused_start(&ns, &etcd_flags(&url, &pki, Some(&pki.ca()), &open));
    assert!(
        e.contains(&format!(
            "--store-password-file {}: mode 0644",
            open.display()
        )),
        "{e}"
    );

    // The same flags but the right password start it.
    let flags = etcd_flags(&url, &pki, Some(&pki.ca()), &password);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let lb = LbProcess::start(&ns, &["lo"], &flags).unwrap();
    drop(lb);
}

#[test]
fn lb_keeps_its_services_in_consul_over_https_with_its_token() {
    let topo = Topology::two_armed(1).unwrap();
    let pki = Pki::new(&[]).unwrap();
    let consul = ConsulServer::start_tls_in(&topo.lb, "127.0.0.1", pki.server_config().unwrap())
        .unwrap()
        .with_token("t0ken");
    let token = pki.write("token", "t0ken\n").unwrap();
    let prefix = unique("lbt");
    let mut flags = vec![
        "--store".to_string(),
        consul.url(),
        "--store-prefix".into(),
        prefix.clone(),
        "--store-token-file".into(),
        token.display().to_string(),
    ];

    // Without the CA lb refuses the agent.
    let e = refused_start(&topo.lb, &flags);
    assert!(e.contains("TLS: invalid peer certificate"), "{e}");
    assert_eq!(consul.requests(), 0, "a request got through");

    flags.extend(["--store-ca-file".into(), pki.ca().display().to_string()]);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let lb = LbProcess::start(&topo.lb, &topo.lb_ifaces, &flags).unwrap();
    let spec =
        json!({"vip": topo.vip(80).to_string(), "backends": [topo.backend(0, 8080).to_string()]});
    lb.put_service("web", &spec).unwrap();
    assert!(eventually(T, || consul
        .kv_get_raw(&format!("{prefix}/services/web"))
        .is_some()));
    drop(lb);
}
