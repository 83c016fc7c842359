//! lb's test kit: network namespaces and veth links that remove themselves, servers and
//! clients that live inside a namespace, an `lb` process under test, and packet builders
//! for BPF_PROG_TEST_RUN. Used by the suites in `tests/`, by the demo and the benchmark.
pub mod lbproc;
pub mod netns;
pub mod packet;
pub mod servers;
pub mod topology;

/// A name unique to this process and call, short enough for an interface name.
pub fn unique(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}{}x{}",
        std::process::id() % 100_000,
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}
