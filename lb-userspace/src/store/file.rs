//! The embedded store: files under a directory, no server.
//!
//! `<dir>/log` lists every change as a JSON line, and is the commit point: a write appends
//! its line and fsyncs it, then applies it to `<dir>/services/<name>` (one entry: a header
//! line with its revision, then the document), written to a temporary file in `<dir>/tmp/`
//! that is fsynced and renamed over the old one. Watches follow the log. The last revision
//! given out is the last line's, so a revision is never handed out twice.
//!
//! Writers serialise on an flock of `<dir>/lock` (so several processes may share one
//! directory), and each first repairs what a crash of the one before may have left: a torn
//! last line is cut off (nobody was told of it), and a last line not yet applied is applied.
//! Only the last line can be either, since every writer repairs before it appends.
//! Temporary files live in `<dir>/tmp/`, where no service name can be, and are removed on
//! open. Every file is created 0600 and every directory 0700.
use std::{
    collections::HashMap,
    fs::{self, DirBuilder, File, OpenOptions},
    io::{Read, Seek, SeekFrom, Write},
    os::{
        fd::AsRawFd,
        unix::fs::{DirBuilderExt, OpenOptionsExt},
    },
    path::{Path, PathBuf},
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use async_trait::async_trait;
use base64::Engine;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use super::{
    Entry, Event, Expect, Snapshot, Store, StoreError, check_name,
    claims::{self, Claim, Claims, Held},
};

const HEADER: &str = "lb-store-entry 1 revision ";
/// How much of the log's end is read at a time when looking for its last line.
const TAIL_CHUNK: u64 = 64 * 1024;

#[derive(Clone)]
pub struct FileStore {
    dir: PathBuf,
    poll: Duration,
}

/// One line of `<dir>/log`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct LogLine {
    revision: u64,
    name: String,
    /// The document when it is UTF-8 (stored documents are JSON); none for a deletion.
    value: Option<String>,
    /// The document in base64 when it is not UTF-8.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    value_base64: Option<String>,
}

impl LogLine {
    fn new(revision: u64, name: &str, value: Option<&[u8]>) -> Self {
        let (value, value_base64) = match value.map(std::str::from_utf8) {
            None => (None, None),
            Some(Ok(text)) => (Some(text.to_string()), None),
            Some(Err(_)) => (
                None,
                value.map(|v| base64::engine::general_purpose::STANDARD.encode(v)),
            ),
        };
        Self {
            revision,
            name: name.to_string(),
            value,
            value_base64,
        }
    }

    /// The document this line writes, or none for a deletion.
    fn document(&self) -> Result<Option<Vec<u8>>, String> {
        match (&self.value, &self.value_base64) {
            (Some(v), _) => Ok(Some(v.clone().into_bytes())),
            (None, Some(b)) => base64::engine::general_purpose::STANDARD
                .decode(b)
                .map(Some)
                .map_err(|e| format!("revision {}: value_base64: {e}", self.revision)),
            (None, None) => Ok(None),
        }
    }

    fn parse(line: &[u8]) -> Result<Self, String> {
        let l: Self = serde_json::from_slice(line).map_err(|e| e.to_string())?;
        l.document()?;
        Ok(l)
    }

    fn into_event(self) -> Result<Event, String> {
        Ok(match self.document()? {
            Some(value) => Event::Put(Entry {
                name: self.name,
                value,
                revision: self.revision,
            }),
            None => Event::Deleted {
                name: self.name,
                revision: self.revision,
            },
        })
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.display().to_string(),
        source,
    }
}

fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))
}

/// A new file in `tmp` (0600, a name no other file there has) holding `bytes`, fsynced.
fn temporary(tmp: &Path, bytes: &[u8]) -> Result<PathBuf, StoreError> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let path = tmp.join(format!(
        "{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let written = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .and_then(|mut f| {
            f.write_all(bytes)?;
            f.sync_all()
        });
    if let Err(e) = written {
        let _ = fs::remove_file(&path);
        return Err(io(&path)(e));
    }
    Ok(path)
}

/// Writes `bytes` to `path` so that a crash leaves either the old file or the new one; the
/// temporary file is made in `tmp` (on the same filesystem).
fn write_atomically(tmp: &Path, path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    let t = temporary(tmp, bytes)?;
    if let Err(e) = fs::rename(&t, path) {
        let _ = fs::remove_file(&t);
        return Err(io(path)(e));
    }
    sync_dir(path.parent().unwrap_or(Path::new(".")))
}

/// An flock held until dropped.
struct Lock {
    _file: File,
}

impl Lock {
    fn take(path: &Path, exclusive: bool) -> Result<Self, StoreError> {
        let f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(path)
            .map_err(io(path))?;
        let op = if exclusive {
            libc::LOCK_EX
        } else {
            libc::LOCK_SH
        };
        // SAFETY: flock on a descriptor this function holds open; no memory is passed.
        if unsafe { libc::flock(f.as_raw_fd(), op) } != 0 {
            return Err(io(path)(std::io::Error::last_os_error()));
        }
        Ok(Self { _file: f })
    }
}

/// Where the last whole line of a log of `len` bytes starts and ends (after its newline),
/// reading back from the end in chunks; `end` is 0 when there is no whole line, and below
/// `len` when the file ends in a partial line.
fn last_line_bounds(f: &mut File, len: u64) -> std::io::Result<(u64, u64)> {
    let mut newlines = Vec::new(); // positions after each newline found, from the end
    let mut pos = len;
    while pos > 0 && newlines.len() < 2 {
        let start = pos.saturating_sub(TAIL_CHUNK);
        let mut buf = vec![0; (pos - start) as usize];
        f.seek(SeekFrom::Start(start))?;
        f.read_exact(&mut buf)?;
        for (i, &b) in buf.iter().enumerate().rev() {
            if b == b'\n' {
                newlines.push(start + i as u64 + 1);
                if newlines.len() == 2 {
                    break;
                }
            }
        }
        pos = start;
    }
    Ok(match newlines.as_slice() {
        [] => (0, 0),
        [end] => (0, *end),
        [end, start, ..] => (*start, *end),
    })
}

/// What `services/<name>` holds: nothing, a file whose header does not parse, or an entry
/// at a revision.
enum OnDisk {
    Absent,
    Unreadable(Vec<u8>),
    At(u64, Vec<u8>),
}

impl FileStore {
    /// A store in `root/prefix` (created if needed); watches look for changes every `poll`.
    /// Repairs what a crash left: temporaries, a torn or unapplied last log line.
    pub fn open(root: &Path, prefix: &str, poll: Duration) -> Result<Self, StoreError> {
        check_name(prefix)?;
        let dir = root.join(prefix);
        for sub in ["services", "tmp"] {
            let path = dir.join(sub);
            DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&path)
                .map_err(io(&path))?;
        }
        let store = Self { dir, poll };
        let _lock = Lock::take(&store.dir.join("lock"), true)?;
        store.remove_temporaries()?;
        let last = store.repair()?;
        store.log_unlogged_entries(last)?;
        // Revisions once lived in a file of their own; the log's last line has them now.
        let old = store.dir.join("revision");
        if let Err(e) = fs::remove_file(&old)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            return Err(io(&old)(e));
        }
        Ok(store)
    }

    fn entry_path(&self, name: &str) -> PathBuf {
        self.dir.join("services").join(name)
    }

    fn tmp(&self) -> PathBuf {
        self.dir.join("tmp")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join("log")
    }

    /// Removes what writers that crashed left in `tmp/` (callers hold the lock, so no
    /// writer is at work).
    fn remove_temporaries(&self) -> Result<(), StoreError> {
        let tmp = self.tmp();
        for dirent in fs::read_dir(&tmp).map_err(io(&tmp))? {
            let path = dirent.map_err(io(&tmp))?.path();
            fs::remove_file(&path).map_err(io(&path))?;
        }
        Ok(())
    }

    fn read_entry(path: &Path) -> Result<OnDisk, StoreError> {
        let bytes = match fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(OnDisk::Absent),
            Err(e) => return Err(io(path)(e)),
        };
        let parsed = bytes.iter().position(|&b| b == b'\n').and_then(|nl| {
            let head = std::str::from_utf8(&bytes[..nl]).ok()?;
            let revision = head.strip_prefix(HEADER)?.parse().ok()?;
            Some((revision, bytes[nl + 1..].to_vec()))
        });
        Ok(match parsed {
            Some((revision, value)) => OnDisk::At(revision, value),
            None => OnDisk::Unreadable(bytes),
        })
    }

    /// Cuts a torn last line off the log and applies the last line if a crash came between
    /// its append and its application. The last revision given out (0: none yet).
    fn repair(&self) -> Result<u64, StoreError> {
        let path = self.log_path();
        let mut f = match OpenOptions::new().read(true).write(true).open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(io(&path)(e)),
        };
        let mut cut_unparsable = false;
        loop {
            let len = f.metadata().map_err(io(&path))?.len();
            let (start, end) = last_line_bounds(&mut f, len).map_err(io(&path))?;
            if end < len {
                // A record a crash cut short: its writer never returned, so nobody was
                // told of its revision.
                f.set_len(end)
                    .and_then(|()| f.sync_all())
                    .map_err(io(&path))?;
                tracing::warn!(log = %path.display(), bytes = len - end, "cut off a torn last record");
            }
            if end == 0 {
                return Ok(0);
            }
            let mut line = vec![0; (end - 1 - start) as usize];
            f.seek(SeekFrom::Start(start))
                .and_then(|_| f.read_exact(&mut line))
                .map_err(io(&path))?;
            match LogLine::parse(&line) {
                Ok(last) => {
                    self.apply(&last)?;
                    return Ok(last.revision);
                }
                // A whole line that does not parse can only be the end of a torn append
                // (blocks that never reached the disk); once.
                Err(e) if !cut_unparsable => {
                    cut_unparsable = true;
                    f.set_len(start)
                        .and_then(|()| f.sync_all())
                        .map_err(io(&path))?;
                    tracing::warn!(log = %path.display(), "cut off a last record that does not parse: {e}");
                }
                Err(e) => {
                    return Err(StoreError::Invalid(format!(
                        "{}: the record at byte {start}: {e}",
                        path.display()
                    )));
                }
            }
        }
    }

    /// Makes `services/` hold what `line` wrote, unless it holds that or something newer
    /// already (or a file that is not an entry at all, which is left for listings to
    /// report).
    fn apply(&self, line: &LogLine) -> Result<(), StoreError> {
        let path = self.entry_path(&line.name);
        let older = match Self::read_entry(&path)? {
            OnDisk::At(r, _) => r < line.revision,
            OnDisk::Absent => true,
            OnDisk::Unreadable(_) => false,
        };
        if !older {
            return Ok(());
        }
        match line.document().map_err(StoreError::Invalid)? {
            Some(v) => {
                let mut bytes = format!("{HEADER}{}\n", line.revision).into_bytes();
                bytes.extend_from_slice(&v);
                write_atomically(&self.tmp(), &path, &bytes)
            }
            None => match fs::remove_file(&path) {
                Ok(()) => sync_dir(&self.dir.join("services")),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(io(&path)(e)),
            },
        }
    }

    /// Appends `line` to the log and fsyncs it: the commit point. A failed append is cut
    /// off again, so no partial line stays.
    fn append(&self, line: &LogLine) -> Result<(), StoreError> {
        let path = self.log_path();
        let mut text = serde_json::to_vec(line).map_err(|e| StoreError::Invalid(e.to_string()))?;
        text.push(b'\n');
        let mut f = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&path)
            .map_err(io(&path))?;
        let before = f.metadata().map_err(io(&path))?.len();
        if let Err(e) = f.write_all(&text).and_then(|()| f.sync_all()) {
            let _ = f.set_len(before).and_then(|()| f.sync_all());
            return Err(io(&path)(e));
        }
        Ok(())
    }

    /// Logs entries newer than the log's last revision, oldest first: what a crash of an
    /// older lb left, which wrote the entry before its log line.
    fn log_unlogged_entries(&self, last: u64) -> Result<(), StoreError> {
        let mut unlogged = Vec::new();
        for e in self.entries()? {
            if e.revision > last {
                unlogged.push(e);
            }
        }
        unlogged.sort_by_key(|e| e.revision);
        for e in unlogged {
            tracing::warn!(key = %e.name, revision = e.revision, "logging an entry a crash left out of the log");
            self.append(&LogLine::new(e.revision, &e.name, Some(&e.value)))?;
        }
        Ok(())
    }

    /// Every entry in `services/`; a file whose header does not parse comes back whole, at
    /// revision 0, for the caller to report.
    fn entries(&self) -> Result<Vec<Entry>, StoreError> {
        let services = self.dir.join("services");
        let mut entries = Vec::new();
        for dirent in fs::read_dir(&services).map_err(io(&services))? {
            let dirent = dirent.map_err(io(&services))?;
            let name = dirent.file_name().to_string_lossy().into_owned();
            if check_name(&name).is_err() {
                continue; // not something lb wrote
            }
            let (revision, value) = match Self::read_entry(&dirent.path())? {
                OnDisk::Absent => continue,
                OnDisk::Unreadable(bytes) => (0, bytes),
                OnDisk::At(r, v) => (r, v),
            };
            entries.push(Entry {
                name,
                value,
                revision,
            });
        }
        entries.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(entries)
    }

    fn list_sync(&self) -> Result<Snapshot, StoreError> {
        // Exclusive: a listing repairs first, so that it is as of the log's last line.
        let _lock = Lock::take(&self.dir.join("lock"), true)?;
        let revision = self.repair()?;
        Ok(Snapshot {
            entries: self.entries()?,
            revision,
        })
    }

    fn write_sync(
        &self,
        name: &str,
        value: Option<&[u8]>,
        expect: Expect,
    ) -> Result<(u64, bool), StoreError> {
        check_name(name)?;
        let _lock = Lock::take(&self.dir.join("lock"), true)?;
        self.write_locked(name, value, expect)
    }

    /// The revision `name` is at (0: there but unreadable), for a caller that holds the
    /// lock and has repaired.
    fn current_revision(&self, name: &str) -> Result<Option<u64>, StoreError> {
        Ok(match Self::read_entry(&self.entry_path(name))? {
            OnDisk::Absent => None,
            OnDisk::Unreadable(_) => Some(0),
            OnDisk::At(r, _) => Some(r),
        })
    }

    /// `write_sync` for a caller that holds the lock.
    fn write_locked(
        &self,
        name: &str,
        value: Option<&[u8]>,
        expect: Expect,
    ) -> Result<(u64, bool), StoreError> {
        let last = self.repair()?;
        let current = self.current_revision(name)?;
        let holds = match expect {
            Expect::Any => true,
            Expect::Absent => current.is_none(),
            Expect::Revision(r) => current == Some(r),
        };
        if !holds {
            return Err(StoreError::Conflict {
                name: name.to_string(),
                expected: expect,
                found: current,
            });
        }
        if value.is_none() && current.is_none() {
            return Ok((last, false));
        }
        let line = LogLine::new(last + 1, name, value);
        self.append(&line)?;
        self.apply(&line)?;
        Ok((line.revision, current.is_some()))
    }

    /// The content of `secret`, created with `bytes` if there is none (whole: a hard link
    /// to a finished temporary file).
    fn secret_sync(&self, bytes: &[u8]) -> Result<Vec<u8>, StoreError> {
        let path = self.dir.join("secret");
        let _lock = Lock::take(&self.dir.join("lock"), true)?;
        match fs::read(&path) {
            Ok(found) => return Ok(found),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(&path)(e)),
        }
        let t = temporary(&self.tmp(), bytes)?;
        let linked = fs::hard_link(&t, &path);
        let _ = fs::remove_file(&t);
        linked.map_err(io(&path))?;
        sync_dir(&self.dir)?;
        Ok(bytes.to_vec())
    }
}

/// Claims (see [`claims`]): `<dir>/claims/<kind>/<id>` holds the name of the service that
/// has the claim. They are written under the store's lock, before the document that makes
/// them, and removed after the one that drops them: a crash in between leaves at worst a
/// claim whose service has no document, which counts as free.
impl FileStore {
    fn claim_path(&self, claim: &Claim) -> PathBuf {
        self.dir.join("claims").join(claim.key())
    }

    /// Who holds each of `claims` now (absent ones left out).
    fn read_claims(&self, claims: &Claims) -> Result<HashMap<String, Held>, StoreError> {
        let mut found = HashMap::new();
        for claim in claims.all() {
            let path = self.claim_path(claim);
            let holder = match fs::read_to_string(&path) {
                Ok(h) => h,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io(&path)(e)),
            };
            // A holder that is no service name (a damaged file) holds nothing.
            let holder_exists = check_name(&holder).is_ok() && self.entry_path(&holder).exists();
            found.insert(
                claim.key().to_string(),
                Held {
                    holder,
                    revision: 1,
                    holder_exists,
                },
            );
        }
        Ok(found)
    }

    fn set_claim(&self, claim: &Claim, name: &str) -> Result<(), StoreError> {
        let path = self.claim_path(claim);
        let dir = path.parent().unwrap_or(&self.dir).to_path_buf();
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(io(&dir))?;
        write_atomically(&self.tmp(), &path, name.as_bytes())
    }

    fn remove_claim(&self, claim: &Claim) -> Result<(), StoreError> {
        let path = self.claim_path(claim);
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io(&path)(e)),
        }
    }

    /// `write_sync` that also moves `name`'s claims, all under the lock.
    fn write_claiming_sync(
        &self,
        name: &str,
        value: Option<&[u8]>,
        expect: Expect,
        claims: &Claims,
    ) -> Result<(u64, bool), StoreError> {
        check_name(name)?;
        let _lock = Lock::take(&self.dir.join("lock"), true)?;
        self.repair()?;
        let current = self.current_revision(name)?;
        if !expect.holds(current) {
            return Err(StoreError::Conflict {
                name: name.to_string(),
                expected: expect,
                found: current,
            });
        }
        let found = self.read_claims(claims)?;
        let plan = claims::plan(name, claims, &found)?;
        for claim in &plan.take {
            self.set_claim(claim, name)?;
        }
        let written = match self.write_locked(name, value, expect) {
            Ok(w) => w,
            Err(e) => {
                // Not taken after all (best effort: left behind, a claim of a service
                // without a document is free anyway).
                for claim in &plan.take {
                    let _ = self.remove_claim(claim);
                }
                return Err(e);
            }
        };
        for (claim, _) in &plan.release {
            self.remove_claim(claim)?;
        }
        Ok(written)
    }
}

/// Follows `log` from its start, sending events after revision `after`.
async fn follow(
    log: PathBuf,
    after: u64,
    poll: Duration,
    tx: mpsc::Sender<Result<Event, StoreError>>,
) {
    // Where the next whole line starts: a partial line is read again next time, since a
    // writer may be half-way through it, or a repair may cut it off.
    let mut offset = 0u64;
    loop {
        let read = {
            let log = log.clone();
            tokio::task::spawn_blocking(move || -> Result<Vec<u8>, StoreError> {
                let mut f = match File::open(&log) {
                    Ok(f) => f,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
                    Err(e) => return Err(io(&log)(e)),
                };
                let len = f.metadata().map_err(io(&log))?.len();
                if len < offset {
                    return Err(StoreError::Invalid(format!(
                        "{}: shrank below what was read ({len} < {offset} bytes)",
                        log.display()
                    )));
                }
                f.seek(SeekFrom::Start(offset)).map_err(io(&log))?;
                let mut bytes = Vec::new();
                f.read_to_end(&mut bytes).map_err(io(&log))?;
                Ok(bytes)
            })
            .await
        };
        let chunk = match read {
            Ok(Ok(bytes)) => bytes,
            Ok(Err(e)) => {
                let _ = tx.send(Err(e)).await;
                return;
            }
            Err(_) => return,
        };
        let mut rest = chunk.as_slice();
        while let Some(nl) = rest.iter().position(|&b| b == b'\n') {
            let line = &rest[..nl];
            rest = &rest[nl + 1..];
            let at = offset;
            offset += nl as u64 + 1;
            let event = match LogLine::parse(line) {
                Ok(l) if l.revision <= after => continue,
                Ok(l) => l.into_event(),
                Err(e) => Err(e),
            };
            let event = match event {
                Ok(event) => event,
                Err(e) => {
                    let why = format!("{}: the record at byte {at}: {e}", log.display());
                    let _ = tx.send(Err(StoreError::Invalid(why))).await;
                    return;
                }
            };
            if tx.send(Ok(event)).await.is_err() {
                return;
            }
        }
        tokio::select! {
            () = tokio::time::sleep(poll) => {}
            () = tx.closed() => return,
        }
    }
}

/// Runs `f` on the blocking pool.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| StoreError::Unavailable(e.to_string()))?
}

#[async_trait]
impl Store for FileStore {
    async fn list(&self) -> Result<Snapshot, StoreError> {
        let me = self.clone();
        blocking(move || me.list_sync()).await
    }

    async fn put(&self, name: &str, value: &[u8], expect: Expect) -> Result<u64, StoreError> {
        let (me, name, value) = (self.clone(), name.to_string(), value.to_vec());
        blocking(move || me.write_sync(&name, Some(&value), expect).map(|(r, _)| r)).await
    }

    async fn secret(&self, proposal: &[u8]) -> Result<Vec<u8>, StoreError> {
        let (me, proposal) = (self.clone(), proposal.to_vec());
        blocking(move || me.secret_sync(&proposal)).await
    }

    async fn delete(&self, name: &str, expect: Expect) -> Result<bool, StoreError> {
        let (me, name) = (self.clone(), name.to_string());
        blocking(move || {
            me.write_sync(&name, None, expect)
                .map(|(_, existed)| existed)
        })
        .await
    }

    async fn put_claiming(
        &self,
        name: &str,
        value: &[u8],
        expect: Expect,
        claims: &Claims,
    ) -> Result<u64, StoreError> {
        let (me, name, value, claims) = (
            self.clone(),
            name.to_string(),
            value.to_vec(),
            claims.clone(),
        );
        blocking(move || {
            me.write_claiming_sync(&name, Some(&value), expect, &claims)
                .map(|(r, _)| r)
        })
        .await
    }

    async fn delete_claiming(
        &self,
        name: &str,
        expect: Expect,
        claims: &[Claim],
    ) -> Result<bool, StoreError> {
        let (me, name) = (self.clone(), name.to_string());
        let claims = Claims::released(claims);
        blocking(move || {
            me.write_claiming_sync(&name, None, expect, &claims)
                .map(|(_, existed)| existed)
        })
        .await
    }

    fn watch(&self, from: &Snapshot) -> mpsc::Receiver<Result<Event, StoreError>> {
        let (tx, rx) = mpsc::channel(256);
        tokio::spawn(follow(self.log_path(), from.revision, self.poll, tx));
        rx
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    /// A fresh directory under the system's temporary one, removed when dropped.
    struct Root(PathBuf);

    impl Root {
        fn new(what: &str) -> Self {
            static N: AtomicU64 = AtomicU64::new(0);
            let path = std::env::temp_dir().join(format!(
                "lb-file-store-{what}-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            Self(path)
        }

        fn dir(&self) -> PathBuf {
            self.0.join("lb")
        }

        fn open(&self) -> FileStore {
            FileStore::open(&self.0, "lb", Duration::from_millis(10)).unwrap()
        }

        fn log(&self) -> Vec<LogLine> {
            fs::read_to_string(self.dir().join("log"))
                .unwrap()
                .lines()
                .map(|l| LogLine::parse(l.as_bytes()).unwrap())
                .collect()
        }

        fn append_raw(&self, bytes: &[u8]) {
            let mut f = OpenOptions::new()
                .append(true)
                .open(self.dir().join("log"))
                .unwrap();
            f.write_all(bytes).unwrap();
        }
    }

    impl Drop for Root {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn names(s: &Snapshot) -> Vec<(&str, &[u8], u64)> {
        s.entries
            .iter()
            .map(|e| (e.name.as_str(), e.value.as_slice(), e.revision))
            .collect()
    }

    async fn events(store: &FileStore, after: u64, n: usize) -> Vec<Event> {
        let mut rx = store.watch(&Snapshot {
            entries: Vec::new(),
            revision: after,
        });
        let mut out = Vec::new();
        for _ in 0..n {
            let e = tokio::time::timeout(Duration::from_secs(5), rx.recv())
                .await
                .expect("an event within 5 s")
                .expect("watch open")
                .expect("no watch error");
            out.push(e);
        }
        out
    }

    #[tokio::test]
    async fn a_put_never_touches_a_service_named_like_its_temporary_file() {
        let root = Root::new("tmpname");
        let store = root.open();
        store.put("a.tmp", b"mine", Expect::Absent).await.unwrap();
        store.put("a.b", b"other", Expect::Absent).await.unwrap();
        store.put("a", b"third", Expect::Absent).await.unwrap();
        let snap = store.list().await.unwrap();
        assert_eq!(
            names(&snap),
            [
                ("a", &b"third"[..], 3),
                ("a.b", &b"other"[..], 2),
                ("a.tmp", &b"mine"[..], 1)
            ]
        );
    }

    #[tokio::test]
    async fn leftover_temporaries_are_never_listed_and_removed_on_open() {
        let root = Root::new("leftover");
        let store = root.open();
        store.put("web", b"1", Expect::Absent).await.unwrap();
        // What a writer killed between writing its temporary file and renaming it leaves.
        let tmp = root.dir().join("tmp");
        fs::write(tmp.join("4242-0"), b"lb-store-entry 1 revision 2\nhalf").unwrap();
        fs::write(tmp.join("web"), b"lb-store-entry 1 revision 2\nhalf").unwrap();
        assert_eq!(names(&store.list().await.unwrap()), [("web", &b"1"[..], 1)]);
        let _reopened = root.open();
        assert_eq!(fs::read_dir(&tmp).unwrap().count(), 0, "leftovers removed");
    }

    #[tokio::test]
    async fn files_are_private_to_the_owner() {
        let root = Root::new("modes");
        let store = root.open();
        store.put("web", b"1", Expect::Absent).await.unwrap();
        store.secret(b"s3cret").await.unwrap();
        let mode = |p: PathBuf| fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        for dir in [
            root.0.clone(),
            root.dir(),
            root.dir().join("services"),
            root.dir().join("tmp"),
        ] {
            assert_eq!(mode(dir.clone()), 0o700, "{}", dir.display());
        }
        for file in ["services/web", "log", "secret", "lock"] {
            assert_eq!(mode(root.dir().join(file)), 0o600, "{file}");
        }
    }

    #[tokio::test]
    async fn a_torn_last_record_is_cut_off_on_open_and_its_revision_given_again() {
        let root = Root::new("torn");
        let store = root.open();
        store.put("web", b"1", Expect::Absent).await.unwrap();
        store.put("db", b"2", Expect::Absent).await.unwrap();
        // A crash half-way through the append of revision 3 (no caller was told of it).
        root.append_raw(br#"{"revision":3,"name":"web","val"#);
        let store = root.open();
        assert_eq!(root.log().len(), 2, "the torn record is gone");
        let snap = store.list().await.unwrap();
        assert_eq!(snap.revision, 2);
        assert_eq!(store.put("api", b"3", Expect::Absent).await.unwrap(), 3);
        let got = events(&store, 0, 3).await;
        assert_eq!(
            got.iter().map(Event::revision).collect::<Vec<_>>(),
            [1, 2, 3]
        );

        // Zeros where the blocks of an append never reached the disk, newline included.
        root.append_raw(&[0; 40]);
        root.append_raw(b"\n");
        let store = root.open();
        assert_eq!(store.list().await.unwrap().revision, 3);
        assert_eq!(root.log().len(), 3);
    }

    #[tokio::test]
    async fn a_logged_write_a_crash_kept_from_its_file_is_applied_on_open() {
        let root = Root::new("unapplied");
        let store = root.open();
        store.put("web", b"1", Expect::Absent).await.unwrap();
        store.put("db", b"2", Expect::Absent).await.unwrap();
        // Logged (the commit point), then a crash before services/web was rewritten.
        let line = LogLine::new(3, "web", Some(b"new"));
        root.append_raw(&[serde_json::to_vec(&line).unwrap(), b"\n".to_vec()].concat());
        let store = root.open();
        let snap = store.list().await.unwrap();
        assert_eq!(snap.revision, 3);
        assert_eq!(
            names(&snap),
            [("db", &b"2"[..], 2), ("web", &b"new"[..], 3)]
        );

        // The same for a deletion, found by another handle's next write rather than an open.
        let line = LogLine::new(4, "db", None);
        root.append_raw(&[serde_json::to_vec(&line).unwrap(), b"\n".to_vec()].concat());
        assert_eq!(store.put("api", b"x", Expect::Absent).await.unwrap(), 5);
        let snap = store.list().await.unwrap();
        assert_eq!(
            names(&snap),
            [("api", &b"x"[..], 5), ("web", &b"new"[..], 3)]
        );
    }

    #[tokio::test]
    async fn an_entry_written_before_its_log_line_gets_one_and_its_revision_is_not_reused() {
        // What an older lb, which wrote the entry first, left when it crashed before its
        // log line and revision file: the entry at revision 3, the log and file at 2.
        let root = Root::new("legacy");
        let store = root.open();
        store.put("web", b"1", Expect::Absent).await.unwrap();
        store.put("db", b"2", Expect::Absent).await.unwrap();
        fs::write(root.dir().join("services/api"), format!("{HEADER}3\nthree")).unwrap();
        fs::write(root.dir().join("revision"), "2").unwrap();
        let store = root.open();
        assert!(!root.dir().join("revision").exists());
        assert_eq!(store.list().await.unwrap().revision, 3);
        assert_eq!(
            store.put("web", b"4", Expect::Revision(1)).await.unwrap(),
            4
        );
        let got = events(&store, 2, 2).await;
        assert_eq!(
            got,
            [
                Event::Put(Entry {
                    name: "api".into(),
                    value: b"three".to_vec(),
                    revision: 3
                }),
                Event::Put(Entry {
                    name: "web".into(),
                    value: b"4".to_vec(),
                    revision: 4
                }),
            ]
        );
    }

    #[tokio::test]
    async fn documents_that_are_not_utf8_survive_the_log() {
        let root = Root::new("bytes");
        let store = root.open();
        let value = [0xff, 0xfe, b'{', 0x00, 0x80];
        store.put("odd", &value, Expect::Absent).await.unwrap();
        let got = events(&store, 0, 1).await;
        assert_eq!(
            got,
            [Event::Put(Entry {
                name: "odd".into(),
                value: value.to_vec(),
                revision: 1
            })]
        );
        assert_eq!(store.list().await.unwrap().entries[0].value, value);
    }

    #[tokio::test]
    async fn a_watch_reads_a_line_a_writer_is_half_way_through_once_it_is_whole() {
        let root = Root::new("half");
        let store = root.open();
        store.put("web", b"1", Expect::Absent).await.unwrap();
        let mut rx = store.watch(&Snapshot::default());
        let line = serde_json::to_vec(&LogLine::new(2, "db", Some(b"2"))).unwrap();
        root.append_raw(&line[..10]);
        tokio::time::sleep(Duration::from_millis(50)).await;
        root.append_raw(&line[10..]);
        root.append_raw(b"\n");
        let mut got = Vec::new();
        for _ in 0..2 {
            got.push(rx.recv().await.unwrap().unwrap().revision());
        }
        assert_eq!(got, [1, 2]);
    }

    #[test]
    fn the_last_line_is_found_across_chunks() {
        let root = Root::new("chunks");
        fs::create_dir_all(&root.0).unwrap();
        let path = root.0.join("log");
        let long = "x".repeat(TAIL_CHUNK as usize * 2 + 7);
        fs::write(&path, format!("a\n{long}\nb")).unwrap();
        let mut f = File::open(&path).unwrap();
        let len = f.metadata().unwrap().len();
        let (start, end) = last_line_bounds(&mut f, len).unwrap();
        assert_eq!((start, end), (2, 2 + long.len() as u64 + 1));
        fs::write(&path, "only").unwrap();
        assert_eq!(
            last_line_bounds(&mut File::open(&path).unwrap(), 4).unwrap(),
            (0, 0)
        );
        fs::write(&path, "one\n").unwrap();
        assert_eq!(
            last_line_bounds(&mut File::open(&path).unwrap(), 4).unwrap(),
            (0, 4)
        );
    }
}
