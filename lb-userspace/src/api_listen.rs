//! Where the API listens: a TCP address (loopback only, unless a token or `--api-insecure`
//! says otherwise) or a Unix socket, created mode 0600 and removed when lb stops.
use std::{
    fmt,
    net::SocketAddr,
    os::unix::fs::{FileTypeExt, PermissionsExt},
    path::{Path, PathBuf},
    str::FromStr,
};

use anyhow::{Context, bail};
use nix::sys::stat::{Mode, umask};
use tokio::net::{TcpListener, UnixListener};

/// Where the API listens: `ADDR:PORT` or `unix:PATH`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiListen {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl FromStr for ApiListen {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(path) = s.strip_prefix("unix:") {
            if !path.starts_with('/') {
                return Err(format!(
                    "{s:?}: the socket path must be absolute (unix:/PATH)"
                ));
            }
            return Ok(Self::Unix(PathBuf::from(path)));
        }
        s.parse()
            .map(Self::Tcp)
            .map_err(|_| format!("{s:?} is not ADDR:PORT or unix:/PATH"))
    }
}

impl fmt::Display for ApiListen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Tcp(addr) => addr.fmt(f),
            Self::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

/// Without a token the API may only be reached from this host: a loopback address or a
/// Unix socket (whose mode, 0600, keeps other users out), unless `insecure` says otherwise.
pub fn check_listen(listen: &ApiListen, has_token: bool, insecure: bool) -> anyhow::Result<()> {
    match listen {
        ApiListen::Tcp(addr)
            if !has_token && !insecure && !addr.ip().to_canonical().is_loopback() =>
        {
            bail!(
                "--api {addr} is not a loopback address, and without --api-token-file anyone who reaches it could repoint every VIP: give --api-token-file, or --api-insecure to serve the API unauthenticated anyway"
            )
        }
        _ => Ok(()),
    }
}

/// A bound API listener.
pub enum ApiListener {
    Tcp(TcpListener),
    /// With the socket's file, removed when this is dropped.
    Unix(UnixListener, SocketFile),
}

/// A Unix socket's file: removed on drop, so that a stopped lb (or one that failed to
/// start after binding) leaves no socket behind.
pub struct SocketFile(PathBuf);

impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Binds the API's listener.
pub async fn bind(listen: &ApiListen) -> anyhow::Result<ApiListener> {
    match listen {
        ApiListen::Tcp(addr) => Ok(ApiListener::Tcp(
            TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding the API to {addr}"))?,
        )),
        ApiListen::Unix(path) => {
            let (listener, file) = bind_unix(path)
                .with_context(|| format!("binding the API to unix:{}", path.display()))?;
            Ok(ApiListener::Unix(listener, file))
        }
    }
}

/// A socket at `path`, mode 0600, replacing a stale socket (one nobody serves on; a crashed
/// lb leaves one) but never another kind of file.
fn bind_unix(path: &Path) -> anyhow::Result<(UnixListener, SocketFile)> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                bail!("another process serves on this socket");
            }
            std::fs::remove_file(path).context("removing the stale socket")?;
        }
        Ok(_) => bail!("the path exists and is not a socket (lb replaces only a stale socket)"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e.into()),
    }
    // Created 0600 from the start, rather than changed after: no moment when others may
    // connect. Nothing else creates files while the listeners are bound.
    let previous = umask(Mode::from_bits_truncate(0o177));
    let bound = UnixListener::bind(path);
    umask(previous);
    let listener = bound?;
    let file = SocketFile(path.to_path_buf());
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok((listener, file))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listening_beyond_loopback_needs_a_token_or_insecure() {
        let tcp = |s: &str| ApiListen::from_str(s).unwrap();
        assert!(check_listen(&tcp("127.0.0.1:9090"), false, false).is_ok());
        assert!(check_listen(&tcp("[::1]:9090"), false, false).is_ok());
        assert!(check_listen(&tcp("[::ffff:127.0.0.1]:9090"), false, false).is_ok());
        assert!(check_listen(&tcp("unix:/run/lb/api.sock"), false, false).is_ok());
        let e = check_listen(&tcp("0.0.0.0:9090"), false, false)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("--api-token-file")
                && e.contains("--api-insecure")
                && e.contains("0.0.0.0:9090"),
            "{e}"
        );
        assert!(check_listen(&tcp("10.0.0.1:9090"), false, false).is_err());
        assert!(check_listen(&tcp("0.0.0.0:9090"), true, false).is_ok());
        assert!(check_listen(&tcp("0.0.0.0:9090"), false, true).is_ok());
        assert_eq!(
            tcp("unix:/run/lb/api.sock"),
            ApiListen::Unix("/run/lb/api.sock".into())
        );
        assert!(ApiListen::from_str("unix:api.sock").is_err());
        assert!(ApiListen::from_str("localhost:9090").is_err());
        assert_eq!(tcp("unix:/a b").to_string(), "unix:/a b");
    }

    #[tokio::test]
    async fn a_unix_socket_is_private_replaces_only_a_stale_socket_and_goes_on_drop() {
        let dir = std::env::temp_dir().join(format!("lb-api-sock-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("api.sock");
        let listen = ApiListen::Unix(path.clone());
        let bound = bind(&listen).await.unwrap();
        let mode = std::fs::symlink_metadata(&path)
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        // Served: a second lb is refused, and the socket stays.
        let e = format!("{:#}", bind(&listen).await.err().unwrap());
        assert!(e.contains("another process serves"), "{e}");
        assert!(path.exists());
        // A stale socket (a crashed lb's) is replaced.
        let ApiListener::Unix(listener, file) = bound else {
            unreachable!()
        };
        drop(listener);
        std::mem::forget(file);
        assert!(path.exists());
        let bound = bind(&listen).await.unwrap();
        drop(bound);
        assert!(!path.exists(), "the socket was left behind");
        // Another kind of file is never removed.
        std::fs::write(&path, "data").unwrap();
        let e = format!("{:#}", bind(&listen).await.err().unwrap());
        assert!(e.contains("not a socket") && e.contains("api.sock"), "{e}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "data");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
