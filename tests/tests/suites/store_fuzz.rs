//! Store fuzzing: random bytes and mutated valid documents as stored services, in the file
//! store and in Consul (the test server). Every store lists each one under its key, the
//! document decoder refuses the bad ones without panicking, and lb started on such a store
//! restores the good ones and names the key of every one it skips.
use std::time::Duration;

use lb::store::{Expect, Store, document::StoredService, file::FileStore};
use lb_tests::{
    consul::ConsulServer,
    fuzz_rng::Rng,
    lbproc::{LbProcess, temp_store},
    netns::Netns,
    unique,
};
use serde_json::{Value, json};

/// A generator from the run's seed, printed so that the run can be repeated.
fn seeded() -> Rng {
    let seed = lb_tests::fuzz_rng::seed();
    eprintln!("store fuzz seed: LB_FUZZ_SEED={seed}");
    Rng::new(seed)
}

/// Valid documents to mutate: each kind of service lb stores.
fn valid_documents() -> Vec<Vec<u8>> {
    [
        json!({"schema": 1, "vip": "10.9.9.1:80", "protocol": "tcp", "backends": ["10.9.8.1:80", "10.9.8.2:80"], "table_size": 251}),
        json!({"schema": 1, "vip": "10.9.9.2:53", "protocol": "udp", "backends": ["10.9.8.3:53"], "table_size": 251, "check": {"kind": "none"}}),
        json!({"schema": 1, "protocol": "http", "backends": ["10.9.8.4:8080"], "http": {"host": "a.example", "path": "/api"}}),
    ]
    .iter()
    .map(|d| d.to_string().into_bytes())
    .collect()
}

/// Random bytes, or a valid document with a few random edits.
fn fuzzed(rng: &mut Rng, valid: &[Vec<u8>]) -> Vec<u8> {
    if rng.below(3) == 0 {
        let len = rng.below(200);
        return (0..len).map(|_| rng.next_u64() as u8).collect();
    }
    let mut doc = valid[rng.below(valid.len())].clone();
    for _ in 0..=rng.below(4) {
        let at = rng.below(doc.len().max(1));
        match rng.below(5) {
            0 if !doc.is_empty() => doc[at] = rng.next_u64() as u8,
            1 if !doc.is_empty() => {
                let end = (at + rng.below(8) + 1).min(doc.len());
                doc.drain(at..end);
            }
            2 => {
                let tokens: [&[u8]; 8] = [
                    b"\"",
                    b"{",
                    b"}",
                    b"[",
                    b",",
                    b"null",
                    b"-1",
                    b"99999999999999999999",
                ];
                let t = tokens[rng.below(tokens.len())];
                doc.splice(at.min(doc.len())..at.min(doc.len()), t.iter().copied());
            }
            3 if !doc.is_empty() => {
                let d = doc[at];
                doc.insert(at, d);
            }
            _ => doc.truncate(at),
        }
    }
    doc
}

/// `count` fuzzed documents under names of one width (so no name is a prefix of another).
fn corpus(rng: &mut Rng, count: usize) -> Vec<(String, Vec<u8>)> {
    let valid = valid_documents();
    (0..count)
        .map(|i| (format!("fz{i:04}"), fuzzed(rng, &valid)))
        .collect()
}

/// Decodes a stored entry as a restore does: never a panic.
fn decode(name: &str, value: &[u8]) -> Result<(), String> {
    let doc = StoredService::parse(value).map_err(|e| e.to_string())?;
    doc.into_service(name, None)
        .map(|_| ())
        .map_err(|e| e.to_string())
}

#[test]
fn the_document_decoder_refuses_garbage_without_panicking() {
    let mut rng = seeded();
    let mut refused = 0;
    for (name, doc) in corpus(&mut rng, 20_000) {
        let outcome = std::panic::catch_unwind(|| decode(&name, &doc));
        let Ok(result) = outcome else {
            panic!("decoding {:?} panicked", String::from_utf8_lossy(&doc));
        };
        refused += usize::from(result.is_err());
    }
    assert!(refused > 10_000, "only {refused} of 20000 refused");
}

/// Each store lists every fuzzed document under its key, as written.
async fn stores_keep_garbage_as_written(store: &dyn Store, docs: &[(String, Vec<u8>)]) {
    for (name, doc) in docs {
        store.put(name, doc, Expect::Absent).await.unwrap();
    }
    let snap = store.list().await.unwrap();
    for (name, doc) in docs {
        let e = snap.entries.iter().find(|e| &e.name == name);
        // Consul stores an empty value as null: it lists as empty.
        assert_eq!(e.map(|e| &e.value), Some(doc), "{name}");
        let _ = decode(name, doc);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_file_and_consul_stores_list_garbage_under_its_key() {
    let mut rng = seeded();
    let docs = corpus(&mut rng, 300);
    let root = temp_store();
    let file = FileStore::open(&root, "lb", Duration::from_millis(20)).unwrap();
    stores_keep_garbage_as_written(&file, &docs).await;
    // A watch from the start delivers each one too.
    let mut watch = file.watch(&lb::store::Snapshot::default());
    for (name, doc) in &docs {
        let event = watch.recv().await.unwrap().unwrap();
        assert!(
            matches!(&event, lb::store::Event::Put(e) if &e.name == name && &e.value == doc),
            "{name}: {event:?}"
        );
    }
    let server = ConsulServer::start().unwrap();
    let consul =
        lb::store::consul::ConsulStore::new(server.addrs(), &unique("fuzz"), None).unwrap();
    stores_keep_garbage_as_written(&consul, &docs).await;
}

/// lb on a store holding the corpus and two good services: the good ones restored, every
/// key not restored named in an error, lb alive and ready.
fn lb_restores_around_garbage(ns: &Netns, store_url: &str, docs: &[(String, Vec<u8>)]) {
    let lb = LbProcess::start(ns, &["lo"], &["--store", store_url]).unwrap();
    let (status, services) = lb.request("GET", "/v1/services", None).unwrap();
    assert_eq!(status, 200);
    let restored: Vec<String> = services
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap().to_string())
        .collect();
    for good in ["good-a", "good-b"] {
        assert!(
            restored.iter().any(|n| n == good),
            "{good} not restored: {restored:?}"
        );
    }
    let log = lb.log_text();
    for (name, _) in docs {
        assert!(
            restored.contains(name) || log.contains(&format!("key={name}")),
            "{name} neither restored nor named in an error"
        );
    }
    assert!(!log.contains("panicked"), "{log}");
    assert_eq!(lb.request("GET", "/ready", None).unwrap().0, 200);
    drop(lb);
}

fn good_documents() -> [(&'static str, Value); 2] {
    [
        (
            "good-a",
            json!({"schema": 1, "vip": "10.9.7.1:80", "protocol": "tcp", "backends": ["10.9.6.1:80"], "table_size": 251}),
        ),
        (
            "good-b",
            json!({"schema": 1, "vip": "10.9.7.2:80", "protocol": "tcp", "backends": ["10.9.6.2:80"], "table_size": 251}),
        ),
    ]
}

#[test]
fn lb_on_a_file_store_full_of_garbage_restores_the_rest() {
    let mut rng = seeded();
    let docs = corpus(&mut rng, 150);
    let root = temp_store();
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let s = FileStore::open(&root, "lb", Duration::from_millis(50)).unwrap();
        for (name, doc) in &docs {
            s.put(name, doc, Expect::Absent).await.unwrap();
        }
        for (name, doc) in good_documents() {
            s.put(name, doc.to_string().as_bytes(), Expect::Absent)
                .await
                .unwrap();
        }
    });
    // And files that are not entries at all, written behind the store's back.
    let services = root.join("lb/services");
    std::fs::write(services.join("fzraw1"), b"\xff\x00no header").unwrap();
    std::fs::write(services.join("fzraw2"), b"").unwrap();
    let mut all = docs.clone();
    all.push(("fzraw1".into(), Vec::new()));
    all.push(("fzraw2".into(), Vec::new()));
    let ns = Netns::new(&unique("lbt-fz")).unwrap();
    lb_restores_around_garbage(&ns, &root.url(), &all);
}

#[test]
fn lb_on_a_consul_store_full_of_garbage_restores_the_rest() {
    let mut rng = seeded();
    let docs = corpus(&mut rng, 150);
    let ns = Netns::new(&unique("lbt-fz")).unwrap();
    let server = ConsulServer::start_in(&ns, "127.0.0.1").unwrap();
    for (name, doc) in &docs {
        server.kv_put_raw(&format!("lb/services/{name}"), doc);
    }
    for (name, doc) in good_documents() {
        server.kv_put_raw(&format!("lb/services/{name}"), doc.to_string().as_bytes());
    }
    lb_restores_around_garbage(&ns, &server.url(), &docs);
}
