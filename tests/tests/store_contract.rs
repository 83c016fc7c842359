//! One contract, run against every store implementation: put, list, compare-and-set
//! conflicts, delete, a watch that delivers every change in order, and a corrupt entry that
//! spoils nothing else.
use std::time::Duration;

use lb::store::{Event, Expect, Store, StoreError, file::FileStore};

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
