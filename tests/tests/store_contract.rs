//! One contract, run against every store implementation: put, list, compare-and-set
//! conflicts, delete, a watch that delivers every change in order, and a corrupt entry that
//! spoils nothing else.
use std::time::Duration;

use lb::store::{Event, Expect, Store, StoreError, etcd::EtcdStore, file::FileStore};
use lb_tests::etcd::EtcdCluster;

async fn next(rx: &mut tokio::sync::mpsc::Receiver<Result<Event, StoreError>>) -> Event {
    tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .expect("a watch event within 5 s")
        .expect("watch open")
        .expect("no watch error")
}

/// The contract. `corrupt(name)` must damage the stored entry `name` behind the store's back.
async fn contract(store: &dyn Store, corrupt: impl Fn(&str)) {
    let start = store.list().await.unwrap();
    assert!(start.entries.is_empty(), "a fresh store is empty");
    let mut watch = store.watch(start.revision);

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
    let r3 = a.or(b).unwrap();

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
    // A watch from a revision replays only what came after it.
    let mut late = store.watch(r3);
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
}

#[tokio::test]
async fn file_store_keeps_the_contract() {
    let root = std::env::temp_dir().join(lb_tests::unique("lbt-store"));
    let store = FileStore::open(&root, "lb", Duration::from_millis(20)).unwrap();
    let dir = root.join("lb/services");
    contract(&store, |name| {
        std::fs::write(dir.join(name), b"\x00garbage{").unwrap()
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
    contract(&store, |name| {
        etcdctl(
            &raw,
            &["put", &format!("{key_prefix}{name}"), "\u{1}garbage{"],
        )
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn etcd_store_carries_on_when_a_member_dies() {
    let mut cluster = EtcdCluster::start(3).unwrap();
    let endpoints: Vec<String> = cluster
        .endpoints()
        .iter()
        .map(|e| format!("http://{e}"))
        .collect();
    let store = EtcdStore::connect(&endpoints, &lb_tests::unique("lbt"))
        .await
        .unwrap();
    let start = store.list().await.unwrap().revision;
    let mut watch = store.watch(start);
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
