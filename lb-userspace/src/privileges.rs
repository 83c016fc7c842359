//! Least privilege: once the data plane is loaded and attached, lb keeps only the
//! capabilities its running parts use, and the threads that parse client HTTP keep none.
//!
//! Linux keeps capabilities per thread, and a new thread starts with its creator's. So
//! each of lb's threads drops its own: `lb run` turns the policy on ([`enable`]) before it
//! starts anything, the tokio runtime's threads drop to [`RUNNING`] as they start, so do
//! the threads lb spawns itself (the controller's, the next hops'), the HTTP workers drop
//! everything, and the main thread drops to [`RUNNING`] once the daemon has started.
//! Without [`enable`] (lb used as a library, as the tests do) nothing is dropped.
//!
//! The bounding set is narrowed too where the thread still may (the first drop), and
//! every thread is set no_new_privs: no program lb might execute gets back what its thread
//! dropped, even as root.
use std::sync::atomic::{AtomicBool, Ordering};

use caps::{CapSet, Capability, CapsHashSet};

/// What lb's running parts use: map reads and writes (`CAP_BPF`), neighbour entries and
/// interface settings (`CAP_NET_ADMIN`), and the HTTP listeners routes open on ports of
/// their own while lb runs (`http.port`, DFP's `srcPort`), which may be below 1024
/// (`CAP_NET_BIND_SERVICE`). The maps and links are pinned and bpffs mounted before the
/// daemon has started, so nothing else is needed after.
pub const RUNNING: &[Capability] = &[
    Capability::CAP_BPF,
    Capability::CAP_NET_ADMIN,
    Capability::CAP_NET_BIND_SERVICE,
];

/// What a thread that parses client HTTP keeps: nothing. Its listening socket is bound
/// before it starts, and it only reads and writes sockets.
pub const HTTP_WORKER: &[Capability] = &[];

static ENABLED: AtomicBool = AtomicBool::new(false);

/// Turns dropping on for this process (`lb run` does, before starting anything).
pub fn enable() {
    ENABLED.store(true, Ordering::Release);
}

/// Why capabilities could not be dropped.
#[derive(Debug, thiserror::Error)]
pub enum DropError {
    #[error("dropping capabilities: {0}")]
    Caps(#[from] caps::errors::CapsError),
    #[error("setting no_new_privs: {0}")]
    NoNewPrivs(#[source] std::io::Error),
}

/// [`restrict`] the calling thread to `keep`, if [`enable`] was called.
pub fn keep_only(keep: &[Capability]) -> Result<(), DropError> {
    if ENABLED.load(Ordering::Acquire) {
        restrict(keep)?;
    }
    Ok(())
}

/// Keeps only `keep` (of what the calling thread has) in its effective and permitted
/// sets, none inheritable or ambient, (when it may change it) only `keep` in its bounding
/// set, and sets the thread no_new_privs.
fn restrict(keep: &[Capability]) -> Result<(), DropError> {
    let keep: CapsHashSet = keep.iter().copied().collect();
    // The bounding set first: changing it needs CAP_SETPCAP, which is about to go.
    if caps::has_cap(None, CapSet::Effective, Capability::CAP_SETPCAP)? {
        for cap in caps::read(None, CapSet::Bounding)? {
            if !keep.contains(&cap) {
                caps::drop(None, CapSet::Bounding, cap)?;
            }
        }
    }
    caps::clear(None, CapSet::Ambient)?;
    let permitted: CapsHashSet = caps::read(None, CapSet::Permitted)?
        .intersection(&keep)
        .copied()
        .collect();
    // Effective must stay within permitted at every step: narrow it first.
    caps::set(None, CapSet::Effective, &permitted)?;
    caps::set(None, CapSet::Inheritable, &CapsHashSet::new())?;
    caps::set(None, CapSet::Permitted, &permitted)?;
    // An exec then gets no more than `permitted`, whatever the bounding set still holds.
    // SAFETY: PR_SET_NO_NEW_PRIVS takes plain integers and touches no memory.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(DropError::NoNewPrivs(std::io::Error::last_os_error()));
    }
    Ok(())
}

/// [`keep_only`] at the start of a thread, where an error can only be logged: the thread
/// then runs with more than it needs, which the log says.
pub fn keep_only_in_thread(keep: &[Capability]) {
    if let Err(e) = keep_only(keep) {
        let thread = std::thread::current();
        tracing::warn!(
            thread = thread.name().unwrap_or("unnamed"),
            "{e}: this thread keeps its capabilities"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs in a thread of its own, since dropping is per thread and for good.
    #[test]
    fn a_thread_keeps_only_what_it_is_given() {
        if !caps::has_cap(None, CapSet::Effective, Capability::CAP_SYS_ADMIN).unwrap() {
            eprintln!("skipped: needs CAP_SYS_ADMIN (root) to have something to drop");
            return;
        }
        std::thread::spawn(|| {
            restrict(&[Capability::CAP_BPF]).unwrap();
            let only_bpf: CapsHashSet = [Capability::CAP_BPF].into_iter().collect();
            for set in [CapSet::Effective, CapSet::Permitted, CapSet::Bounding] {
                assert_eq!(caps::read(None, set).unwrap(), only_bpf, "{set:?}");
            }
            assert!(caps::read(None, CapSet::Inheritable).unwrap().is_empty());
            let status = std::fs::read_to_string("/proc/thread-self/status").unwrap();
            assert!(status.contains("NoNewPrivs:\t1"), "{status}");
            // And they do not come back.
            assert!(caps::raise(None, CapSet::Effective, Capability::CAP_SYS_ADMIN).is_err());
        })
        .join()
        .unwrap();
        // The test's own thread is untouched.
        assert!(caps::has_cap(None, CapSet::Effective, Capability::CAP_SYS_ADMIN).unwrap());
    }
}
