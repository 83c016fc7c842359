//! One contract, run against every store implementation: put, list, compare-and-set
//! conflicts, delete, a watch that delivers the changes in order, and a corrupt entry that
//! spoils nothing else. Then what only some stores have: etcd's member failover, Consul's
//! address failover, ACL token and blocking queries, and Consul's health API.
use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use lb::{
    consul_http::ConsulClient,
    discovery::consul::{HealthOptions, watch_service},
    model::Protocol,
    store::{
        Entry, Event, Expect, Store, StoreError,
        claims::{Claim, Claims},
        consul::ConsulStore,
        etcd::EtcdStore,
        file::FileStore,
    },
};
use lb_tests::{consul::ConsulServer, etcd::EtcdCluster};

async fn next(rx: &mut tokio::sync::mpsc::Receiver<Result<Event, StoreError>>) -> Event {
    tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .expect("a watch event within 5 s")
        .expect("watch open")
        .expect("no watch error")
}

/// What a store's watch promises about the changes it delivers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum History {
    /// Every change, in order (file, etcd).
    Every,
    /// The latest state of each key, in revision order; changes made between two looks at
    /// the store may arrive as one (Consul, which keeps no history).
    LatestPerKey,
}

/// The contract. `corrupt(name)` must damage the stored entry `name` behind the store's back.
async fn contract(store: &dyn Store, history: History, corrupt: impl Fn(&str)) {
    let start = store.list().await.unwrap();
    assert!(start.entries.is_empty(), "a fresh store is empty");
    let mut watch = store.watch(&start);

    // Create, read back.
    let r1 = store
        .put(
            "web",
            br#"{"schema":1,"vip":"10.0.0.1:80"}"#,
            Expect::Absent,
        )
        .await
        .unwrap();
    assert!(r1 > start.revision);
    let snap = store.list().await.unwrap();
    assert_eq!(snap.entries.len(), 1);
    assert_eq!(snap.entries[0].name, "web");
    assert_eq!(
        snap.entries[0].value,
        br#"{"schema":1,"vip":"10.0.0.1:80"}"#
    );
    assert_eq!(snap.entries[0].revision, r1);
    assert!(snap.revision >= r1);

    // Compare-and-set: creating again, or writing against a stale revision, is refused and
    // changes nothing.
    assert!(matches!(
        store.put("web", b"{}", Expect::Absent).await,
        Err(StoreError::Conflict { .. })
    ));
    let r2 = store
        .put(
            "web",
            br#"{"schema":1,"vip":"10.0.0.2:80"}"#,
            Expect::Revision(r1),
        )
        .await
        .unwrap();
    assert!(r2 > r1);
    assert!(matches!(
        store.put("web", b"{}", Expect::Revision(r1)).await,
        Err(StoreError::Conflict { .. })
    ));
    assert!(matches!(
        store.delete("web", Expect::Revision(r1)).await,
        Err(StoreError::Conflict { .. })
    ));
    assert_eq!(store.list().await.unwrap().entries[0].revision, r2);

    // Two writers racing on one revision: exactly one wins.
    let (a, b) = tokio::join!(
        store.put("web", br#"{"who":"a"}"#, Expect::Revision(r2)),
        store.put("web", br#"{"who":"b"}"#, Expect::Revision(r2)),
    );
    assert_eq!(a.is_ok() as u8 + b.is_ok() as u8, 1, "{a:?} {b:?}");
    let winner: &[u8] = if a.is_ok() {
        br#"{"who":"a"}"#
    } else {
        br#"{"who":"b"}"#
    };
    let r3 = a.or(b).unwrap();
    let after_r3 = store.list().await.unwrap();
    assert_eq!(
        after_r3.entries,
        [Entry {
            name: "web".into(),
            value: winner.to_vec(),
            revision: r3
        }]
    );

    // Another entry, then deletes.
    let r4 = store
        .put("db", br#"{"schema":1}"#, Expect::Any)
        .await
        .unwrap();
    assert!(store.delete("web", Expect::Revision(r3)).await.unwrap());
    assert!(
        !store.delete("web", Expect::Any).await.unwrap(),
        "already gone"
    );
    let names: Vec<String> = store
        .list()
        .await
        .unwrap()
        .entries
        .into_iter()
        .map(|e| e.name)
        .collect();
    assert_eq!(names, ["db"]);

    match history {
        History::Every => {
            // The watch saw every change, in order.
            let mut seen = Vec::new();
            for _ in 0..5 {
                seen.push(next(&mut watch).await);
            }
            let summary: Vec<(String, bool, u64)> = seen
                .iter()
                .map(|e| match e {
                    Event::Put(x) => (x.name.clone(), true, x.revision),
                    Event::Deleted { name, revision } => (name.clone(), false, *revision),
                })
                .collect();
            assert_eq!(
                summary
                    .iter()
                    .map(|s| (s.0.as_str(), s.1))
                    .collect::<Vec<_>>(),
                [
                    ("web", true),
                    ("web", true),
                    ("web", true),
                    ("db", true),
                    ("web", false)
                ]
            );
            assert!(
                summary.windows(2).all(|w| w[0].2 < w[1].2),
                "revisions in order: {summary:?}"
            );
            assert_eq!(summary[0].2, r1);
            assert_eq!(summary[3].2, r4);
        }
        History::LatestPerKey => {
            // Every event is one of the changes made, in strictly increasing revision
            // order, and the last one of each key is its final state.
            let puts: [(&str, u64, &[u8]); 4] = [
                ("web", r1, br#"{"schema":1,"vip":"10.0.0.1:80"}"#),
                ("web", r2, br#"{"schema":1,"vip":"10.0.0.2:80"}"#),
                ("web", r3, winner),
                ("db", r4, br#"{"schema":1}"#),
            ];
            let mut seen: Vec<Event> = Vec::new();
            let mut last: HashMap<String, Event> = HashMap::new();
            let done = |last: &HashMap<String, Event>| {
                matches!(last.get("web"), Some(Event::Deleted { .. }))
                    && matches!(last.get("db"), Some(Event::Put(e)) if e.revision == r4)
            };
            while !done(&last) {
                assert!(seen.len() < 5, "more events than changes: {seen:?}");
                let e = next(&mut watch).await;
                match &e {
                    Event::Put(x) => assert!(
                        puts.iter()
                            .any(|(n, r, v)| x.name == *n && x.revision == *r && x.value == *v),
                        "not a put that was made: {e:?}"
                    ),
                    Event::Deleted { name, revision } => {
                        assert_eq!(name, "web", "only web was deleted");
                        assert!(*revision > r3, "deleted after its last put: {e:?}");
                    }
                }
                let name = match &e {
                    Event::Put(x) => x.name.clone(),
                    Event::Deleted { name, .. } => name.clone(),
                };
                last.insert(name, e.clone());
                seen.push(e);
            }
            assert!(
                seen.windows(2).all(|w| w[0].revision() < w[1].revision()),
                "revisions in order: {seen:?}"
            );
        }
    }
    // A watch from a listing replays only what came after it.
    let mut late = store.watch(&after_r3);
    assert_eq!(next(&mut late).await.revision(), r4);

    // A corrupt entry is listed as what it is; the others are unaffected.
    store
        .put("api", br#"{"schema":1}"#, Expect::Absent)
        .await
        .unwrap();
    corrupt("api");
    let snap = store.list().await.unwrap();
    assert_eq!(snap.entries.len(), 2);
    let db = snap.entries.iter().find(|e| e.name == "db").unwrap();
    assert_eq!(db.value, br#"{"schema":1}"#);
    assert!(
        snap.entries
            .iter()
            .any(|e| e.name == "api"
                && serde_json::from_slice::<serde_json::Value>(&e.value).is_err())
    );

    // Names that could escape the prefix are refused.
    assert!(matches!(
        store.put("../x", b"{}", Expect::Any).await,
        Err(StoreError::Invalid(_))
    ));

    // The group's secret: the first proposal is kept, every later one is told it, also when
    // several nodes propose at once; it is no service.
    let before = store.list().await.unwrap();
    assert_eq!(store.secret(b"first").await.unwrap(), b"first");
    assert_eq!(
        store.secret(b"second").await.unwrap(),
        b"first",
        "a later proposal won"
    );
    let (a, b) = tokio::join!(store.secret(b"third"), store.secret(b"fourth"));
    assert_eq!(
        (a.unwrap(), b.unwrap()),
        (b"first".to_vec(), b"first".to_vec())
    );
    let after = store.list().await.unwrap();
    assert_eq!(
        after.entries, before.entries,
        "the secret shows among the services"
    );
}

fn holding(hold: &[&Claim], previous: &[&Claim]) -> Claims {
    Claims {
        hold: hold.iter().map(|c| (*c).clone()).collect(),
        previous: previous.iter().map(|c| (*c).clone()).collect(),
    }
}

fn names(snapshot: &lb::store::Snapshot) -> Vec<&str> {
    snapshot.entries.iter().map(|e| e.name.as_str()).collect()
}

/// The claims contract: what one service claims (a VIP, an HTTP route), no other can take,
/// also when two writers race; deleting or moving releases it; claims are no services.
async fn claims_contract(store: &dyn Store) {
    let vip = Claim::vip("10.0.0.1:80".parse().unwrap(), Protocol::Tcp);
    let moved = Claim::vip("10.0.0.2:80".parse().unwrap(), Protocol::Tcp);
    let route = Claim::http_path(Some("example.com"), "/a%b/demo");

    // Two writers race to create different services on one VIP: exactly one wins, the
    // other is told which claim and who holds it, and its document is not written.
    let just_vip = holding(&[&vip], &[]);
    let (a, b) = tokio::join!(
        store.put_claiming("a", br#"{"who":"a"}"#, Expect::Absent, &just_vip),
        store.put_claiming("b", br#"{"who":"b"}"#, Expect::Absent, &just_vip),
    );
    assert_eq!(a.is_ok() as u8 + b.is_ok() as u8, 1, "{a:?} {b:?}");
    let (winner, loser, won, lost) = match (a, b) {
        (Ok(won), Err(lost)) => ("a", "b", won, lost),
        (Err(lost), Ok(won)) => ("b", "a", won, lost),
        other => unreachable!("{other:?}"),
    };
    match &lost {
        StoreError::Claimed { claim, holder } => {
            assert_eq!((claim, holder.as_str()), (&vip, winner));
            assert_eq!(claim.field(), "vip");
        }
        other => panic!("not a claim conflict: {other}"),
    }
    assert!(lost.to_string().contains(winner), "{lost}");
    assert_eq!(names(&store.list().await.unwrap()), [winner]);

    // The winner writes again and keeps it; the loser still cannot have it.
    let won = store
        .put_claiming(
            winner,
            br#"{"v":2}"#,
            Expect::Revision(won),
            &holding(&[&vip], &[&vip]),
        )
        .await
        .unwrap();
    assert!(matches!(
        store
            .put_claiming(loser, b"{}", Expect::Absent, &holding(&[&vip], &[]))
            .await,
        Err(StoreError::Claimed { .. })
    ));

    // Deleting the winner frees the VIP.
    assert!(
        store
            .delete_claiming(winner, Expect::Revision(won), std::slice::from_ref(&vip))
            .await
            .unwrap()
    );
    let r = store
        .put_claiming(loser, br#"{"v":1}"#, Expect::Absent, &holding(&[&vip], &[]))
        .await
        .unwrap();

    // Moving the VIP releases the old claim and takes the new one.
    store
        .put_claiming(
            loser,
            br#"{"v":2}"#,
            Expect::Revision(r),
            &holding(&[&moved], &[&vip]),
        )
        .await
        .unwrap();
    store
        .put_claiming("c", b"{}", Expect::Absent, &holding(&[&vip], &[]))
        .await
        .expect("the old VIP is free");
    match store
        .put_claiming("d", b"{}", Expect::Absent, &holding(&[&moved], &[]))
        .await
    {
        Err(StoreError::Claimed { holder, .. }) => assert_eq!(holder, loser),
        other => panic!("{other:?}"),
    }

    // A stale compare-and-set takes nothing: the claim stays free for others.
    assert!(matches!(
        store
            .put_claiming("c", b"{}", Expect::Absent, &holding(&[&route], &[]))
            .await,
        Err(StoreError::Conflict { .. })
    ));
    // An HTTP route: the same, with a path that needs escaping in a key.
    store
        .put_claiming("e", b"{}", Expect::Absent, &holding(&[&route], &[]))
        .await
        .unwrap();
    match store
        .put_claiming("f", b"{}", Expect::Absent, &holding(&[&route], &[]))
        .await
    {
        Err(StoreError::Claimed { claim, holder }) => {
            assert_eq!((claim.field(), holder.as_str()), ("http.paths", "e"));
        }
        other => panic!("{other:?}"),
    }

    // A claim whose service has no document any more (here: deleted without releasing
    // it) is free.
    assert!(store.delete("e", Expect::Any).await.unwrap());
    store
        .put_claiming("f", b"{}", Expect::Absent, &holding(&[&route], &[]))
        .await
        .expect("a claim of a deleted service is free");

    // Claims are not services: listings show only documents.
    let mut services = vec!["c", "f", loser];
    services.sort_unstable();
    assert_eq!(names(&store.list().await.unwrap()), services);
}

/// etcd and Consul take at most 128 operations in one transaction: a service whose claims
/// need more is refused before anything is written, naming the field that makes them; one
/// just under the limit is written whole.
async fn claims_fit_one_transaction(store: &dyn Store) {
    let paths = |n: usize| Claims {
        hold: (0..n)
            .map(|i| Claim::http_path(None, &format!("/p{i}")))
            .collect(),
        previous: Vec::new(),
    };
    match store
        .put_claiming("many", b"{}", Expect::Absent, &paths(128))
        .await
    {
        Err(e @ StoreError::TooManyClaims { field, count, .. }) => {
            assert_eq!((field, count), ("http.paths", 128), "{e}");
            assert!(e.to_string().contains("at most 127"), "{e}");
        }
        other => panic!("128 claims: {other:?}"),
    }
    assert!(store.list().await.unwrap().entries.is_empty());
    store
        .put_claiming("many", b"{}", Expect::Absent, &paths(127))
        .await
        .expect("127 claims and the document fit one transaction");
    // Every one of them held.
    let other = store
        .put_claiming("other", b"{}", Expect::Absent, &paths(127))
        .await;
    assert!(
        matches!(&other, Err(StoreError::Claimed { holder, .. }) if holder == "many"),
        "{other:?}"
    );
}

#[tokio::test]
async fn file_store_keeps_the_claims_contract() {
    let root = std::env::temp_dir().join(lb_tests::unique("lbt-store"));
    let store = FileStore::open(&root, "lb", Duration::from_millis(20)).unwrap();
    claims_contract(&store).await;
    std::fs::remove_dir_all(&root).unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn etcd_store_keeps_the_claims_contract() {
    let cluster = EtcdCluster::start(1).unwrap();
    let endpoints: Vec<String> = cluster
        .endpoints()
        .iter()
        .map(|e| format!("http://{e}"))
        .collect();
    let store = EtcdStore::connect(&endpoints, &lb_tests::unique("lbt"))
        .await
        .unwrap();
    claims_contract(&store).await;
    let store = EtcdStore::connect(&endpoints, &lb_tests::unique("lbt"))
        .await
        .unwrap();
    claims_fit_one_transaction(&store).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn consul_store_keeps_the_claims_contract() {
    let server = ConsulServer::start().unwrap();
    let (store, _) = consul_store(&[server.addr().to_string()], None);
    claims_contract(&store).await;
    let server = ConsulServer::start().unwrap();
    let (store, _) = consul_store(&[server.addr().to_string()], None);
    claims_fit_one_transaction(&store).await;
}

#[tokio::test]
async fn file_store_keeps_the_contract() {
    let root = std::env::temp_dir().join(lb_tests::unique("lbt-store"));
    let store = FileStore::open(&root, "lb", Duration::from_millis(20)).unwrap();
    let dir = root.join("lb/services");
    contract(&store, History::Every, |name| {
        std::fs::write(dir.join(name), b"\x00garbage{").unwrap();
    })
    .await;
    // Another process (here: another handle) on the same directory sees the same state.
    let other = FileStore::open(&root, "lb", Duration::from_millis(20)).unwrap();
    assert_eq!(other.list().await.unwrap(), store.list().await.unwrap());
    std::fs::remove_dir_all(&root).unwrap();
}

#[tokio::test]
async fn file_store_prefixes_do_not_share_entries() {
    let root = std::env::temp_dir().join(lb_tests::unique("lbt-store"));
    let a = FileStore::open(&root, "group-a", Duration::from_millis(20)).unwrap();
    let b = FileStore::open(&root, "group-b", Duration::from_millis(20)).unwrap();
    a.put("web", b"{}", Expect::Absent).await.unwrap();
    assert!(b.list().await.unwrap().entries.is_empty());
    b.put("web", b"{\"b\":1}", Expect::Absent).await.unwrap();
    assert_eq!(a.list().await.unwrap().entries[0].value, b"{}");
    std::fs::remove_dir_all(&root).unwrap();
}

fn etcdctl(endpoints: &[String], args: &[&str]) {
    let out = std::process::Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .args(["--endpoints", &endpoints.join(",")])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn etcd_store_keeps_the_contract() {
    let cluster = EtcdCluster::start(1).unwrap();
    let endpoints: Vec<String> = cluster
        .endpoints()
        .iter()
        .map(|e| format!("http://{e}"))
        .collect();
    let prefix = lb_tests::unique("lbt");
    let store = EtcdStore::connect(&endpoints, &prefix).await.unwrap();
    let raw = cluster.endpoints();
    let key_prefix = format!("{prefix}/services/");
    contract(&store, History::Every, |name| {
        etcdctl(
            &raw,
            &["put", &format!("{key_prefix}{name}"), "\u{1}garbage{"],
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn etcd_store_carries_on_when_a_member_dies() {
    let mut cluster = EtcdCluster::start(3).unwrap();
    // Started means every member is up, each answering on its own (a write alone passes
    // with two of three, and then the kill below would leave no quorum).
    for member in cluster.endpoints() {
        etcdctl(&[member], &["endpoint", "health"]);
    }
    let endpoints: Vec<String> = cluster
        .endpoints()
        .iter()
        .map(|e| format!("http://{e}"))
        .collect();
    let store = EtcdStore::connect(&endpoints, &lb_tests::unique("lbt"))
        .await
        .unwrap();
    let start = store.list().await.unwrap();
    let mut watch = store.watch(&start);
    let r1 = store.put("a", b"1", Expect::Absent).await.unwrap();
    assert_eq!(next(&mut watch).await.revision(), r1);
    // One of three members dies: the other two are a quorum, and every write, read and the
    // open watch carry on (the client balances over all three, so some requests were
    // headed for the dead one).
    cluster.kill(0);
    let mut written = Vec::new();
    for i in 0..20 {
        let name = format!("s{i}");
        let rev = store
            .put(&name, b"x", Expect::Absent)
            .await
            .unwrap_or_else(|e| panic!("write {i} after a member died: {e}"));
        written.push((name, rev));
    }
    assert_eq!(store.list().await.unwrap().entries.len(), 21);
    for (name, rev) in written {
        match next(&mut watch).await {
            Event::Put(e) => assert_eq!((e.name, e.revision), (name, rev)),
            other => panic!("{other:?}"),
        }
    }
}

/// A Consul store on `addrs` for a prefix of its own.
fn consul_store(addrs: &[String], token: Option<&str>) -> (ConsulStore, String) {
    let prefix = lb_tests::unique("lbt");
    let store = ConsulStore::new(addrs.to_vec(), &prefix, token.map(str::to_string)).unwrap();
    (store, format!("{prefix}/services/"))
}

#[tokio::test(flavor = "multi_thread")]
async fn consul_store_keeps_the_contract() {
    let server = ConsulServer::start().unwrap();
    let (store, keys) = consul_store(&[server.addr().to_string()], None);
    contract(&store, History::LatestPerKey, |name| {
        server.kv_put_raw(&format!("{keys}{name}"), b"\x00garbage{");
    })
    .await;
}

/// The same contract against a real Consul agent: `LB_TEST_CONSUL=host:port` names one
/// (and `LB_TEST_CONSUL_TOKEN` its ACL token, if it needs one). Debian has no Consul, so
/// it runs only when asked: `cargo test -p lb-tests --test suites -- --ignored
/// real_agent`.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs a real Consul agent: set LB_TEST_CONSUL=host:port and run with --ignored"]
async fn consul_store_keeps_the_contract_on_a_real_agent() {
    let agent = std::env::var("LB_TEST_CONSUL")
        .expect("LB_TEST_CONSUL=host:port names the Consul agent to test against");
    let token = std::env::var("LB_TEST_CONSUL_TOKEN").ok();
    let (store, keys) = consul_store(std::slice::from_ref(&agent), token.as_deref());
    contract(&store, History::LatestPerKey, |name| {
        let mut req = ureq::put(&format!("http://{agent}/v1/kv/{keys}{name}"));
        if let Some(t) = &token {
            req = req.set("X-Consul-Token", t);
        }
        let answer = req
            .send_bytes(b"\x00garbage{")
            .unwrap()
            .into_string()
            .unwrap();
        assert_eq!(answer.trim(), "true");
    })
    .await;
    // Leave the agent as it was.
    let mut req = ureq::delete(&format!("http://{agent}/v1/kv/{keys}?recurse"));
    if let Some(t) = &token {
        req = req.set("X-Consul-Token", t);
    }
    req.call().unwrap();
}

/// A port on loopback that nothing listens on.
fn closed_port() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn consul_store_falls_over_to_the_next_address() {
    let server = ConsulServer::start().unwrap();
    let (store, keys) = consul_store(&[closed_port(), server.addr().to_string()], None);
    contract(&store, History::LatestPerKey, |name| {
        server.kv_put_raw(&format!("{keys}{name}"), b"\x00garbage{");
    })
    .await;

    // When no address answers, the error names each one and why.
    let dead = closed_port();
    drop(server);
    let (store, _) = consul_store(std::slice::from_ref(&dead), None);
    let err = store.list().await.unwrap_err();
    assert!(matches!(err, StoreError::Unavailable(_)), "{err}");
    let text = err.to_string();
    assert!(
        text.contains(&format!("consul at {dead}: cannot connect")),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn consul_store_sends_its_acl_token() {
    let server = ConsulServer::start().unwrap().with_token("s3cret-token");
    let addrs = [server.addr().to_string()];
    let (store, _) = consul_store(&addrs, Some("s3cret-token"));
    let r = store.put("web", b"{}", Expect::Absent).await.unwrap();
    assert_eq!(store.list().await.unwrap().entries[0].revision, r);
    assert!(store.delete("web", Expect::Revision(r)).await.unwrap());

    for token in [Some("wrong"), None] {
        let (store, _) = consul_store(&addrs, token);
        let err = store.list().await.unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, StoreError::Unavailable(_)), "{text}");
        assert!(
            text.contains("403") && text.contains("ACL") && text.contains(&addrs[0]),
            "{text}"
        );
        // A watch reports the refusal at once rather than retrying.
        let start = lb::store::Snapshot::default();
        let mut watch = store.watch(&start);
        let ended = tokio::time::timeout(Duration::from_secs(5), watch.recv())
            .await
            .expect("the watch reports within 5 s")
            .expect("an error, not a silent end");
        assert!(ended.unwrap_err().to_string().contains("403"));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn consul_watch_blocks_until_a_change() {
    let server = ConsulServer::start().unwrap();
    let (store, _) = consul_store(&[server.addr().to_string()], None);
    let store = store.with_watch_wait(Duration::from_secs(10));
    store.put("web", b"1", Expect::Absent).await.unwrap();
    let start = store.list().await.unwrap();
    let before = server.requests();
    let mut watch = store.watch(&start);
    let t0 = Instant::now();
    let writer = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(1)).await;
        store.put("db", b"2", Expect::Absent).await.unwrap()
    });
    let event = next(&mut watch).await;
    let waited = t0.elapsed();
    let r = writer.await.unwrap();
    assert_eq!(
        event,
        Event::Put(Entry {
            name: "db".into(),
            value: b"2".to_vec(),
            revision: r
        })
    );
    assert!(waited >= Duration::from_millis(900), "{waited:?}");
    assert!(waited < Duration::from_secs(3), "{waited:?}");
    // One blocking query held until the write (and the write's own PUT and GET), not a
    // loop of quick ones.
    let requests = server.requests() - before;
    assert!(requests <= 4, "{requests} requests in {waited:?}");
    // Nothing happens: the watch asks again only when its wait (10 s) runs out.
    let before = server.requests();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(server.requests() - before <= 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn consul_watch_survives_an_index_that_goes_back() {
    // Consul forgets deletions after a while; a listing whose last change was a deletion
    // then answers an older index, and a watch must start its loop over, not stall or spin.
    let server = ConsulServer::start().unwrap();
    let (store, _) = consul_store(&[server.addr().to_string()], None);
    let store = store.with_watch_wait(Duration::from_millis(300));
    store.put("a", b"1", Expect::Absent).await.unwrap();
    store.put("b", b"2", Expect::Absent).await.unwrap();
    assert!(store.delete("b", Expect::Any).await.unwrap());
    let start = store.list().await.unwrap();
    let mut watch = store.watch(&start);
    server.reap_tombstones();
    assert!(store.list().await.unwrap().revision < start.revision);
    let before = server.requests();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let requests = server.requests() - before;
    assert!(requests <= 8, "{requests} requests in 1 s");
    let r = store.put("c", b"3", Expect::Absent).await.unwrap();
    assert_eq!(next(&mut watch).await.revision(), r);
}

#[tokio::test(flavor = "multi_thread")]
async fn consul_store_lists_empty_and_corrupt_values() {
    let server = ConsulServer::start().unwrap();
    let (store, keys) = consul_store(&[server.addr().to_string()], None);
    // An empty value (Consul's null), a nested key and the folder key are not lb's entries
    // or are listed as they are.
    server.kv_put_raw(&format!("{keys}empty"), b"");
    server.kv_put_raw(&format!("{keys}nested/x"), b"{}");
    server.kv_put_raw(&keys, b"");
    let snap = store.list().await.unwrap();
    assert_eq!(snap.entries.len(), 1);
    assert_eq!(snap.entries[0].name, "empty");
    assert!(snap.entries[0].value.is_empty());
    // Compare-and-set against a revision that never exists is a conflict, not a create.
    assert!(matches!(
        store.put("new", b"{}", Expect::Revision(0)).await,
        Err(StoreError::Conflict { found: None, .. })
    ));
    assert!(matches!(
        store.delete("new", Expect::Revision(7)).await,
        Err(StoreError::Conflict { found: None, .. })
    ));
    assert!(matches!(
        store.delete("empty", Expect::Absent).await,
        Err(StoreError::Conflict { found: Some(_), .. })
    ));
    assert!(!store.delete("new", Expect::Absent).await.unwrap());
}

#[test]
fn consul_server_runs_inside_a_namespace() {
    let ns = lb_tests::netns::Netns::new(&lb_tests::unique("lbt-consul")).unwrap();
    let server = ConsulServer::start_in(&ns, "127.0.0.1").unwrap();
    let addr = server.addr().to_string();
    // Nothing answers there from the host's namespace...
    let from_host = ureq::get(&format!("http://{addr}/v1/kv/x"))
        .timeout(Duration::from_secs(2))
        .call();
    assert!(
        matches!(from_host, Err(ureq::Error::Transport(_))),
        "the host reached the namespace's server, or something else there: {from_host:?}"
    );
    // ...but from inside the namespace the store works.
    let listed = ns.run(move || {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        runtime.block_on(async move {
            let (store, _) = consul_store(&[addr], None);
            store.put("web", b"{}", Expect::Absent).await.unwrap();
            store.list().await.unwrap().entries.len()
        })
    });
    assert_eq!(listed, 1);
}

async fn next_list(rx: &mut lb::discovery::Instances) -> Vec<String> {
    tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .expect("an instance list within 5 s")
        .expect("watch open")
        .expect("no error")
        .iter()
        .map(ToString::to_string)
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn consul_health_watch_follows_instances() {
    let server = ConsulServer::start().unwrap().with_token("t");
    server.register("web", "web-1", "10.0.0.1", 80, "passing");
    server.register("web", "web-2", "10.0.0.2", 80, "passing");
    server.register("web", "web-3", "10.0.0.3", 80, "critical");
    server.register("db", "db-1", "10.0.0.9", 5432, "passing");
    let client = std::sync::Arc::new(
        ConsulClient::new(
            vec![closed_port(), server.addr().to_string()],
            Some("t".into()),
        )
        .unwrap(),
    );
    let options = HealthOptions {
        passing_only: true,
        wait: Duration::from_secs(10),
    };
    let mut passing = watch_service(client.clone(), "web", options);
    let mut usable = watch_service(
        client.clone(),
        "web",
        HealthOptions {
            passing_only: false,
            ..options
        },
    );
    assert_eq!(
        next_list(&mut passing).await,
        ["10.0.0.1:80", "10.0.0.2:80"]
    );
    assert_eq!(next_list(&mut usable).await, ["10.0.0.1:80", "10.0.0.2:80"]);

    // A warning counts only for passing-and-warning (whose list does not change, so it
    // sends nothing).
    server.set_status("web-2", "warning");
    assert_eq!(next_list(&mut passing).await, ["10.0.0.1:80"]);
    assert!(
        tokio::time::timeout(Duration::from_millis(500), usable.recv())
            .await
            .is_err(),
        "the warning instance is still usable"
    );
    // Back to passing; and the critical one recovers, with the node's address.
    server.set_status("web-2", "passing");
    assert_eq!(
        next_list(&mut passing).await,
        ["10.0.0.1:80", "10.0.0.2:80"]
    );
    server.register("web", "web-3", "", 8080, "passing");
    let all = ["10.0.0.1:80", "10.0.0.2:80", "127.0.0.1:8080"];
    assert_eq!(next_list(&mut passing).await, all);
    assert_eq!(next_list(&mut usable).await, all);

    // Deregistered: the list shrinks.
    server.deregister("web-1");
    assert_eq!(
        next_list(&mut passing).await,
        ["10.0.0.2:80", "127.0.0.1:8080"]
    );
    assert_eq!(
        next_list(&mut usable).await,
        ["10.0.0.2:80", "127.0.0.1:8080"]
    );

    // A wrong token: errors name the 403 and keep coming while it lasts.
    let refused = std::sync::Arc::new(
        ConsulClient::new(vec![server.addr().to_string()], Some("nope".into())).unwrap(),
    );
    let mut rx = watch_service(refused, "web", options);
    let err = tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .unwrap()
        .unwrap()
        .unwrap_err()
        .to_string();
    assert!(err.contains("403") && err.contains("ACL"), "{err}");
}
