//! Store faults, injected: Consul agents that answer 5xx, stall past the client's timeout or
//! drop the connection, with the request taking effect or not. A write that took effect is
//! reported as done (never as a conflict), one that did not is sent to the next agent, and
//! a real conflict stays one.
use std::time::Duration;

use lb::store::{Expect, Store, StoreError, consul::ConsulStore};
use lb_tests::consul::{Applied, ConsulServer, Fault};

/// The client's timeout for an ordinary request, and how long a stalled one is held.
const TIMEOUT: Duration = Duration::from_millis(300);
const HOLD: Duration = Duration::from_millis(1200);

/// Two agents of one datacenter, and a store on both (the first listed first).
fn two_agents() -> (ConsulServer, ConsulStore, String) {
    let server = ConsulServer::start_agents(2).unwrap();
    let prefix = lb_tests::unique("faults");
    let store = ConsulStore::new(server.addrs(), &prefix, None)
        .unwrap()
        .with_request_timeout(TIMEOUT);
    (server, store, format!("{prefix}/services/"))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_compare_and_set_that_took_effect_but_timed_out_is_a_success() {
    let (server, store, keys) = two_agents();
    let r1 = store.put("web", b"one", Expect::Absent).await.unwrap();
    // Agent 0 applies the write, then holds the answer past the client's timeout.
    server.inject(
        0,
        "PUT",
        Fault::Stall {
            hold: HOLD,
            applied: Applied::Before,
        },
    );
    let r2 = store
        .put("web", b"two", Expect::Revision(r1))
        .await
        .expect("the write took effect: a success, not a conflict");
    assert_eq!(server.faults_pending(), 0, "the fault was met");
    assert_eq!(server.kv_get_raw(&format!("{keys}web")).unwrap(), b"two");
    assert_eq!(server.kv_index(&format!("{keys}web")), Some(r2));
    assert!(r2 > r1);

    // The same for a create (cas=0), and with agent 1 stalling now that it is current.
    server.inject(
        1,
        "PUT",
        Fault::Stall {
            hold: HOLD,
            applied: Applied::Before,
        },
    );
    let r3 = store.put("api", b"new", Expect::Absent).await.unwrap();
    assert_eq!(server.faults_pending(), 0);
    assert_eq!(server.kv_index(&format!("{keys}api")), Some(r3));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_write_the_stalled_agent_never_applied_goes_to_the_next_agent() {
    let (server, store, keys) = two_agents();
    let r1 = store.put("web", b"one", Expect::Absent).await.unwrap();
    let before = server.requests_at(1);
    server.inject(
        0,
        "PUT",
        Fault::Stall {
            hold: HOLD,
            applied: Applied::Never,
        },
    );
    let r2 = store
        .put("web", b"two", Expect::Revision(r1))
        .await
        .unwrap();
    assert_eq!(server.kv_get_raw(&format!("{keys}web")).unwrap(), b"two");
    assert_eq!(server.kv_index(&format!("{keys}web")), Some(r2));
    assert!(
        server.requests_at(1) > before,
        "agent 1 took over from the stalled agent 0"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_write_applied_after_the_client_gave_up_changes_nothing_twice() {
    let (server, store, keys) = two_agents();
    let r1 = store.put("web", b"one", Expect::Absent).await.unwrap();
    server.inject(
        0,
        "PUT",
        Fault::Stall {
            hold: HOLD,
            applied: Applied::After,
        },
    );
    // Read back before the stalled write lands: not applied, so sent to agent 1.
    let r2 = store
        .put("web", b"two", Expect::Revision(r1))
        .await
        .unwrap();
    // The stalled copy lands later; its compare-and-set against r1 fails as it must.
    tokio::time::sleep(HOLD + Duration::from_millis(300)).await;
    assert_eq!(server.kv_get_raw(&format!("{keys}web")).unwrap(), b"two");
    assert_eq!(server.kv_index(&format!("{keys}web")), Some(r2));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_connection_dropped_without_an_answer_is_settled_by_reading() {
    let (server, store, keys) = two_agents();
    let r1 = store.put("web", b"one", Expect::Absent).await.unwrap();
    server.inject(
        0,
        "PUT",
        Fault::Drop {
            applied: Applied::Before,
        },
    );
    let r2 = store
        .put("web", b"two", Expect::Revision(r1))
        .await
        .unwrap();
    assert_eq!(server.kv_index(&format!("{keys}web")), Some(r2));

    server.inject(
        1,
        "PUT",
        Fault::Drop {
            applied: Applied::Never,
        },
    );
    let r3 = store
        .put("web", b"three", Expect::Revision(r2))
        .await
        .unwrap();
    assert_eq!(server.kv_get_raw(&format!("{keys}web")).unwrap(), b"three");
    assert_eq!(server.kv_index(&format!("{keys}web")), Some(r3));
    assert_eq!(server.faults_pending(), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_5xx_moves_reads_and_writes_to_the_next_agent() {
    let (server, store, keys) = two_agents();
    server.inject(0, "PUT", Fault::ServerError);
    let r1 = store.put("web", b"one", Expect::Absent).await.unwrap();
    assert_eq!(server.kv_index(&format!("{keys}web")), Some(r1));
    // Reads: a 5xx, a stall past the timeout and a dropped connection each move on.
    for fault in [
        Fault::ServerError,
        Fault::Stall {
            hold: HOLD,
            applied: Applied::Never,
        },
        Fault::Drop {
            applied: Applied::Never,
        },
    ] {
        // The agent reads go to now: the one that answered the last.
        let before = server.requests_at(1);
        store.list().await.unwrap();
        let current = usize::from(server.requests_at(1) > before);
        server.inject(current, "GET", fault);
        let snap = store.list().await.unwrap();
        assert_eq!(snap.entries.len(), 1, "{fault:?}");
        assert_eq!(server.faults_pending(), 0, "{fault:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_delete_that_took_effect_without_an_answer_reports_the_entry_was_there() {
    let (server, store, keys) = two_agents();
    let r1 = store.put("web", b"one", Expect::Absent).await.unwrap();
    store.put("db", b"two", Expect::Absent).await.unwrap();
    // The delete is the current agent's next DELETE, wherever the puts left it.
    let current = usize::from(server.requests_at(1) > 0);
    server.inject(
        current,
        "DELETE",
        Fault::Stall {
            hold: HOLD,
            applied: Applied::Before,
        },
    );
    assert!(store.delete("web", Expect::Revision(r1)).await.unwrap());
    assert_eq!(server.kv_get_raw(&format!("{keys}web")), None);
    assert_eq!(server.faults_pending(), 0);
    for agent in 0..2 {
        server.inject(
            agent,
            "DELETE",
            Fault::Drop {
                applied: Applied::Never,
            },
        );
    }
    assert!(store.delete("db", Expect::Any).await.unwrap());
    assert_eq!(server.kv_get_raw(&format!("{keys}db")), None);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_real_conflict_behind_a_fault_is_still_a_conflict() {
    let (server, store, keys) = two_agents();
    let r1 = store.put("web", b"one", Expect::Absent).await.unwrap();
    server.kv_put_raw(&format!("{keys}web"), b"theirs");
    let theirs = server.kv_index(&format!("{keys}web")).unwrap();
    server.inject(
        0,
        "PUT",
        Fault::Stall {
            hold: HOLD,
            applied: Applied::Never,
        },
    );
    let err = store
        .put("web", b"mine", Expect::Revision(r1))
        .await
        .unwrap_err();
    assert!(
        matches!(err, StoreError::Conflict { found: Some(f), .. } if f == theirs),
        "{err}"
    );
    assert_eq!(server.kv_get_raw(&format!("{keys}web")).unwrap(), b"theirs");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_write_no_agent_answers_is_reported_unavailable_and_changes_nothing() {
    let (server, store, keys) = two_agents();
    let r1 = store.put("web", b"one", Expect::Absent).await.unwrap();
    for _ in 0..3 {
        for agent in 0..2 {
            server.inject(agent, "PUT", Fault::ServerError);
        }
    }
    let err = store
        .put("web", b"two", Expect::Revision(r1))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Unavailable(_)), "{err}");
    assert!(err.to_string().contains("none took effect"), "{err}");
    assert!(err.to_string().contains("No cluster leader"), "{err}");
    assert_eq!(server.kv_get_raw(&format!("{keys}web")).unwrap(), b"one");
}

/// A store whose watch fails at once, every time: lb lists again after a growing wait,
/// rather than spinning.
#[test]
fn a_watch_that_keeps_failing_is_retried_with_a_growing_wait() {
    let root = lb_tests::lbproc::temp_store();
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let s = lb::store::file::FileStore::open(&root, "lb", Duration::from_millis(50)).unwrap();
        s.put("first", b"{ not json", Expect::Absent).await.unwrap();
    });
    // A record no watch can read, followed by a good one: listings work, watches fail.
    let log = root.join("lb/log");
    let mut text = std::fs::read_to_string(&log).unwrap();
    text.push_str("not a record\n");
    text.push_str(r#"{"revision":2,"name":"second","value":"{}"}"#);
    text.push('\n');
    std::fs::write(&log, text).unwrap();
    let ns = lb_tests::netns::Netns::new(&lb_tests::unique("lbt-wf")).unwrap();
    let lb = lb_tests::lbproc::LbProcess::start(&ns, &["lo"], &["--store", &root.url()]).unwrap();
    std::thread::sleep(Duration::from_secs(4));
    let ended = lb.log_text().matches("the store's watch ended").count();
    assert!(
        (2..=12).contains(&ended),
        "{ended} watch restarts in 4 s: {}",
        lb.log_text()
    );
    assert_eq!(lb.request("GET", "/ready", None).unwrap().0, 200);
}
