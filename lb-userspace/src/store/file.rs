//! The embedded store: files under a directory, no server.
//!
//! `<dir>/services/<name>` holds one entry (a header line with its revision, then the
//! document); `<dir>/log` lists every change as a JSON line, which is what watches follow;
//! `<dir>/revision` is the last revision given out. Every write goes to a temporary file
//! that is fsynced and renamed over the old one (and the directory fsynced), so after a
//! crash an entry is either wholly there or not at all. Writers serialise on an flock of
//! `<dir>/lock`, so several processes may share one directory.
use std::{
    collections::HashMap,
    fs::{self, File, OpenOptions},
    io::{Read, Seek, SeekFrom, Write},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    time::Duration,
};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use super::{
    Entry, Event, Expect, Snapshot, Store, StoreError, check_name,
    claims::{self, Claim, Claims, Held},
};

const HEADER: &str = "lb-store-entry 1 revision ";

pub struct FileStore {
    dir: PathBuf,
    poll: Duration,
}

/// One line of `<dir>/log`.
#[derive(Serialize, Deserialize)]
struct LogLine {
    revision: u64,
    name: String,
    /// The document, or none for a deletion.
    value: Option<String>,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Writes `bytes` to `path` so that a crash leaves either the old file or the new one.
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    let tmp = path.with_extension("tmp");
    let mut f = File::create(&tmp).map_err(io(&tmp))?;
    f.write_all(bytes).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    fs::rename(&tmp, path).map_err(io(path))?;
    let parent = path.parent().unwrap_or(Path::new("."));
    File::open(parent)
        .and_then(|d| d.sync_all())
        .map_err(io(parent))
}

/// The content of `path`, created with `bytes` (mode 0600, written whole before it appears)
/// if it does not exist.
fn create_once(path: &Path, bytes: &[u8]) -> Result<Vec<u8>, StoreError> {
    use std::os::unix::fs::OpenOptionsExt;
    match fs::read(path) {
        Ok(found) => return Ok(found),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(path)(e)),
    }
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io(&tmp))?;
    f.write_all(bytes).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    // A hard link appears whole, and fails if another process linked its own first.
    let linked = fs::hard_link(&tmp, path);
    let _ = fs::remove_file(&tmp);
    match linked {
        Ok(()) => Ok(bytes.to_vec()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => fs::read(path).map_err(io(path)),
        Err(e) => Err(io(path)(e)),
    }
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

impl FileStore {
    /// A store in `root/prefix` (created if needed); watches look for changes every `poll`.
    pub fn open(root: &Path, prefix: &str, poll: Duration) -> Result<Self, StoreError> {
        check_name(prefix)?;
        let dir = root.join(prefix);
        let services = dir.join("services");
        fs::create_dir_all(&services).map_err(io(&services))?;
        Ok(Self { dir, poll })
    }

    fn entry_path(&self, name: &str) -> PathBuf {
        self.dir.join("services").join(name)
    }

    fn revision(&self) -> Result<u64, StoreError> {
        let path = self.dir.join("revision");
        match fs::read_to_string(&path) {
            Ok(s) => s
                .trim()
                .parse()
                .map_err(|_| StoreError::Invalid(format!("{}: not a revision", path.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
            Err(e) => Err(io(&path)(e)),
        }
    }

    /// Reads one entry; a file whose header does not parse comes back whole, at revision
    /// 0, for the caller to report.
    fn read_entry(path: &Path, name: &str) -> Result<Option<Entry>, StoreError> {
        let bytes = match fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io(path)(e)),
        };
        let parsed = bytes.iter().position(|&b| b == b'\n').and_then(|nl| {
            let head = std::str::from_utf8(&bytes[..nl]).ok()?;
            let revision = head.strip_prefix(HEADER)?.parse().ok()?;
            Some((revision, bytes[nl + 1..].to_vec()))
        });
        let (revision, value) = parsed.unwrap_or((0, bytes));
        Ok(Some(Entry {
            name: name.to_string(),
            value,
            revision,
        }))
    }

    fn list_sync(&self) -> Result<Snapshot, StoreError> {
        let _lock = Lock::take(&self.dir.join("lock"), false)?;
        let services = self.dir.join("services");
        let mut entries = Vec::new();
        for dirent in fs::read_dir(&services).map_err(io(&services))? {
            let dirent = dirent.map_err(io(&services))?;
            let name = dirent.file_name().to_string_lossy().into_owned();
            if check_name(&name).is_err() {
                continue; // a temporary file, or something that is not ours
            }
            if let Some(e) = Self::read_entry(&dirent.path(), &name)? {
                entries.push(e);
            }
        }
        entries.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(Snapshot {
            entries,
            revision: self.revision()?,
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

    /// `write_sync` for a caller that holds the lock.
    fn write_locked(
        &self,
        name: &str,
        value: Option<&[u8]>,
        expect: Expect,
    ) -> Result<(u64, bool), StoreError> {
        let path = self.entry_path(name);
        let current = Self::read_entry(&path, name)?.map(|e| e.revision);
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
            return Ok((self.revision()?, false));
        }
        let revision = self.revision()? + 1;
        match value {
            Some(v) => {
                let mut bytes = format!("{HEADER}{revision}\n").into_bytes();
                bytes.extend_from_slice(v);
                write_atomically(&path, &bytes)?;
            }
            None => {
                fs::remove_file(&path).map_err(io(&path))?;
                let dir = self.dir.join("services");
                File::open(&dir)
                    .and_then(|d| d.sync_all())
                    .map_err(io(&dir))?;
            }
        }
        let line = LogLine {
            revision,
            name: name.to_string(),
            value: value.map(|v| String::from_utf8_lossy(v).into_owned()),
        };
        let log = self.dir.join("log");
        let mut f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .map_err(io(&log))?;
        let mut text =
            serde_json::to_string(&line).map_err(|e| StoreError::Invalid(e.to_string()))?;
        text.push('\n');
        f.write_all(text.as_bytes())
            .and_then(|()| f.sync_all())
            .map_err(io(&log))?;
        write_atomically(&self.dir.join("revision"), revision.to_string().as_bytes())?;
        Ok((revision, current.is_some()))
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
        fs::create_dir_all(&dir).map_err(io(&dir))?;
        // One temporary file for every claim: writers hold the lock, and no claim kind
        // starts with a dot.
        let tmp = self.dir.join("claims").join(".tmp");
        let mut f = File::create(&tmp).map_err(io(&tmp))?;
        f.write_all(name.as_bytes())
            .and_then(|()| f.sync_all())
            .map_err(io(&tmp))?;
        fs::rename(&tmp, &path).map_err(io(&path))?;
        File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(io(&dir))
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
        let current = Self::read_entry(&self.entry_path(name), name)?.map(|e| e.revision);
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
    let mut offset = 0u64;
    let mut pending = String::new();
    loop {
        let read = {
            let log = log.clone();
            tokio::task::spawn_blocking(move || -> Result<String, StoreError> {
                let mut f = match File::open(&log) {
                    Ok(f) => f,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(String::new()),
                    Err(e) => return Err(io(&log)(e)),
                };
                f.seek(SeekFrom::Start(offset)).map_err(io(&log))?;
                let mut s = String::new();
                f.read_to_string(&mut s).map_err(io(&log))?;
                Ok(s)
            })
            .await
        };
        let chunk = match read {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                let _ = tx.send(Err(e)).await;
                return;
            }
            Err(_) => return,
        };
        offset += chunk.len() as u64;
        pending.push_str(&chunk);
        // Only whole lines: a writer may be half-way through one.
        while let Some(nl) = pending.find('\n') {
            let line: String = pending.drain(..=nl).collect();
            let event = match serde_json::from_str::<LogLine>(&line) {
                Ok(l) if l.revision <= after => continue,
                Ok(l) => match l.value {
                    Some(v) => Event::Put(Entry {
                        name: l.name,
                        value: v.into_bytes(),
                        revision: l.revision,
                    }),
                    None => Event::Deleted {
                        name: l.name,
                        revision: l.revision,
                    },
                },
                Err(e) => {
                    let _ = tx
                        .send(Err(StoreError::Invalid(format!("{}: {e}", log.display()))))
                        .await;
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

#[async_trait]
impl Store for FileStore {
    async fn list(&self) -> Result<Snapshot, StoreError> {
        let me = Self {
            dir: self.dir.clone(),
            poll: self.poll,
        };
        tokio::task::spawn_blocking(move || me.list_sync())
            .await
            .map_err(|e| StoreError::Invalid(e.to_string()))?
    }

    async fn put(&self, name: &str, value: &[u8], expect: Expect) -> Result<u64, StoreError> {
        let (me, name, value) = (
            Self {
                dir: self.dir.clone(),
                poll: self.poll,
            },
            name.to_string(),
            value.to_vec(),
        );
        tokio::task::spawn_blocking(move || {
            me.write_sync(&name, Some(&value), expect).map(|(r, _)| r)
        })
        .await
        .map_err(|e| StoreError::Invalid(e.to_string()))?
    }

    async fn secret(&self, proposal: &[u8]) -> Result<Vec<u8>, StoreError> {
        let path = self.dir.join("secret");
        let proposal = proposal.to_vec();
        tokio::task::spawn_blocking(move || create_once(&path, &proposal))
            .await
            .map_err(|e| StoreError::Unavailable(e.to_string()))?
    }

    async fn delete(&self, name: &str, expect: Expect) -> Result<bool, StoreError> {
        let (me, name) = (
            Self {
                dir: self.dir.clone(),
                poll: self.poll,
            },
            name.to_string(),
        );
        tokio::task::spawn_blocking(move || {
            me.write_sync(&name, None, expect)
                .map(|(_, existed)| existed)
        })
        .await
        .map_err(|e| StoreError::Invalid(e.to_string()))?
    }

    async fn put_claiming(
        &self,
        name: &str,
        value: &[u8],
        expect: Expect,
        claims: &Claims,
    ) -> Result<u64, StoreError> {
        let (me, name, value, claims) = (
            Self {
                dir: self.dir.clone(),
                poll: self.poll,
            },
            name.to_string(),
            value.to_vec(),
            claims.clone(),
        );
        tokio::task::spawn_blocking(move || {
            me.write_claiming_sync(&name, Some(&value), expect, &claims)
                .map(|(r, _)| r)
        })
        .await
        .map_err(|e| StoreError::Invalid(e.to_string()))?
    }

    async fn delete_claiming(
        &self,
        name: &str,
        expect: Expect,
        claims: &[Claim],
    ) -> Result<bool, StoreError> {
        let (me, name) = (
            Self {
                dir: self.dir.clone(),
                poll: self.poll,
            },
            name.to_string(),
        );
        let claims = Claims {
            hold: Vec::new(),
            previous: claims.to_vec(),
        };
        tokio::task::spawn_blocking(move || {
            me.write_claiming_sync(&name, None, expect, &claims)
                .map(|(_, existed)| existed)
        })
        .await
        .map_err(|e| StoreError::Invalid(e.to_string()))?
    }

    fn watch(&self, from: &Snapshot) -> mpsc::Receiver<Result<Event, StoreError>> {
        let (tx, rx) = mpsc::channel(256);
        tokio::spawn(follow(self.dir.join("log"), from.revision, self.poll, tx));
        rx
    }
}
