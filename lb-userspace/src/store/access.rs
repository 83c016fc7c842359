//! How lb reaches the servers of its store and discovery registries: over TLS for
//! `etcds://` and `consuls://` (the servers' certificates checked against `--store-ca-file`,
//! or the system's trusted roots without it; a client certificate for servers that ask for
//! one), and as an etcd user. One set serves every etcd and Consul connection lb makes.
//!
//! The files are read once, at start. Those holding a secret (the password, the client's
//! private key) must be readable by their owner alone.
use std::path::{Path, PathBuf};

use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};

use crate::secret_file::SecretFileError;

/// A file named by a flag that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    #[error("{flag} {}: {source}", path.display())]
    Read {
        flag: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    /// A secret that others than its owner can read or change, or none.
    #[error(transparent)]
    Secret(#[from] SecretFileError),
    #[error("{flag} {}: {why}", path.display())]
    Content {
        flag: &'static str,
        path: PathBuf,
        why: String,
    },
    /// Flags that do not fit together, or with the URLs given.
    #[error("{0}")]
    Flags(String),
}

/// A client certificate (PEM, the chain from the client's own) and its private key (PEM).
#[derive(Clone)]
pub struct ClientIdentity {
    pub cert: Vec<u8>,
    pub key: Vec<u8>,
}

impl std::fmt::Debug for ClientIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClientIdentity { .. }")
    }
}

/// An etcd user and its password.
#[derive(Clone)]
pub struct EtcdUser {
    pub name: String,
    pub password: String,
}

impl std::fmt::Debug for EtcdUser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "EtcdUser {{ name: {:?}, .. }}", self.name)
    }
}

/// What every connection to etcd and Consul uses.
#[derive(Clone, Debug, Default)]
pub struct Access {
    /// CA certificates (PEM) the servers' certificates must chain to, in place of the
    /// system's roots.
    pub ca: Option<Vec<u8>>,
    /// Presented to servers that ask for a client certificate.
    pub identity: Option<ClientIdentity>,
    /// etcd's user and password.
    pub etcd_user: Option<EtcdUser>,
}

/// The URL schemes lb speaks TLS on.
pub const TLS_SCHEMES: [&str; 2] = ["etcds://", "consuls://"];

/// Whether `url` is one of a TLS scheme.
pub fn is_tls_url(url: &str) -> bool {
    TLS_SCHEMES.iter().any(|s| url.starts_with(s))
}

fn read(flag: &'static str, path: &Path) -> Result<Vec<u8>, AccessError> {
    std::fs::read(path).map_err(|source| AccessError::Read {
        flag,
        path: path.to_path_buf(),
        source,
    })
}

/// Reads a file holding a secret, refusing one that group or others may read or change.
fn read_secret(flag: &'static str, path: &Path) -> Result<Vec<u8>, AccessError> {
    Ok(crate::secret_file::read(flag, path)?)
}

fn content(flag: &'static str, path: &Path, why: impl Into<String>) -> AccessError {
    AccessError::Content {
        flag,
        path: path.to_path_buf(),
        why: why.into(),
    }
}

/// The certificates of a PEM file: at least one, each well formed.
fn certificates(flag: &'static str, path: &Path, pem: &[u8]) -> Result<usize, AccessError> {
    let mut count = 0;
    for cert in CertificateDer::pem_slice_iter(pem) {
        cert.map_err(|e| content(flag, path, format!("not PEM certificates ({e})")))?;
        count += 1;
    }
    if count == 0 {
        return Err(content(
            flag,
            path,
            "no PEM certificate (BEGIN CERTIFICATE) in it",
        ));
    }
    Ok(count)
}

/// `--store-ca-file`: a PEM bundle of at least one CA certificate.
pub fn read_ca_file(path: &Path) -> Result<Vec<u8>, AccessError> {
    const FLAG: &str = "--store-ca-file";
    let pem = read(FLAG, path)?;
    certificates(FLAG, path, &pem)?;
    Ok(pem)
}

/// `--store-cert-file` and `--store-key-file`: the client's certificate chain and its
/// private key, which must be its owner's alone.
pub fn read_client_identity(cert: &Path, key: &Path) -> Result<ClientIdentity, AccessError> {
    const CERT: &str = "--store-cert-file";
    const KEY: &str = "--store-key-file";
    let cert_pem = read(CERT, cert)?;
    certificates(CERT, cert, &cert_pem)?;
    let key_pem = read_secret(KEY, key)?;
    PrivateKeyDer::from_pem_slice(&key_pem)
        .map_err(|e| content(KEY, key, format!("no PEM private key in it ({e})")))?;
    Ok(ClientIdentity {
        cert: cert_pem,
        key: key_pem,
    })
}

/// `--store-password-file`: the password, without the trailing newline an editor leaves;
/// the file must be its owner's alone.
pub fn read_password_file(path: &Path) -> Result<String, AccessError> {
    const FLAG: &str = "--store-password-file";
    let bytes = read_secret(FLAG, path)?;
    let text = String::from_utf8(bytes).map_err(|_| content(FLAG, path, "not UTF-8 text"))?;
    let password = text
        .strip_suffix('\n')
        .map_or(text.as_str(), |t| t.strip_suffix('\r').unwrap_or(t));
    if password.is_empty() {
        return Err(content(FLAG, path, "the file is empty"));
    }
    Ok(password.to_string())
}

/// Whether the system has trusted roots to check servers against when no CA file is given.
fn system_roots_present() -> bool {
    !rustls_native_certs::load_native_certs().certs.is_empty()
}

/// The flags of `lb run` that say how servers are reached.
#[derive(Debug, Default, Clone, Copy)]
pub struct AccessFlags<'a> {
    pub ca_file: Option<&'a Path>,
    pub cert_file: Option<&'a Path>,
    pub key_file: Option<&'a Path>,
    pub user: Option<&'a str>,
    pub password_file: Option<&'a Path>,
}

/// The access `flags` ask for, with their files read, for lb reaching the servers of
/// `urls` (the store's and the discovery registries'). Flags that no URL would use are
/// refused, so that a typo in a scheme cannot silently drop TLS or the password; a password
/// or token sent in clear text is warned about.
pub fn from_flags(
    flags: &AccessFlags<'_>,
    urls: &[&str],
    consul_token: bool,
) -> Result<Access, AccessError> {
    let flag_error = |m: String| AccessError::Flags(m);
    let tls = urls.iter().any(|u| is_tls_url(u));
    let etcd: Vec<&&str> = urls
        .iter()
        .filter(|u| u.starts_with("etcd://") || u.starts_with("etcds://"))
        .collect();
    if !tls {
        for (set, flag) in [
            (flags.ca_file.is_some(), "--store-ca-file"),
            (flags.cert_file.is_some(), "--store-cert-file"),
            (flags.key_file.is_some(), "--store-key-file"),
        ] {
            if set {
                return Err(flag_error(format!(
                    "{flag} is for TLS (an etcds:// or consuls:// --store, --discovery-etcd or --discovery-consul), and no URL given uses it"
                )));
            }
        }
    }
    let ca = match flags.ca_file {
        Some(path) => Some(read_ca_file(path)?),
        None if tls && !system_roots_present() => {
            return Err(flag_error(
                "no --store-ca-file, and the system has no trusted roots to check the servers' certificates against (install ca-certificates, or give --store-ca-file)".into(),
            ));
        }
        None => None,
    };
    let identity = match (flags.cert_file, flags.key_file) {
        (Some(cert), Some(key)) => Some(read_client_identity(cert, key)?),
        (None, None) => None,
        _ => {
            return Err(flag_error(
                "--store-cert-file and --store-key-file go together".into(),
            ));
        }
    };
    let etcd_user = match (flags.user, flags.password_file) {
        (Some(name), Some(path)) => {
            if etcd.is_empty() {
                return Err(flag_error(format!(
                    "--store-user {name} is for etcd (an etcd:// or etcds:// --store or --discovery-etcd), and no URL given is one"
                )));
            }
            if name.is_empty() {
                return Err(flag_error("--store-user: the name is empty".into()));
            }
            if let Some(plain) = etcd.iter().find(|u| u.starts_with("etcd://")) {
                tracing::warn!(
                    "--store-user: the password goes to {plain} in clear text; etcds:// would encrypt it"
                );
            }
            Some(EtcdUser {
                name: name.to_string(),
                password: read_password_file(path)?,
            })
        }
        (None, None) => None,
        _ => {
            return Err(flag_error(
                "--store-user and --store-password-file go together".into(),
            ));
        }
    };
    if consul_token && let Some(plain) = urls.iter().find(|u| u.starts_with("consul://")) {
        tracing::warn!(
            "--store-token-file: the ACL token goes to {plain} in clear text; consuls:// would encrypt it"
        );
    }
    Ok(Access {
        ca,
        identity,
        etcd_user,
    })
}

impl Access {
    /// TLS settings for etcd: the CA file's certificates or the system's roots, and the
    /// client certificate if any.
    pub fn etcd_tls(&self) -> etcd_client::TlsOptions {
        let tls = etcd_client::TlsOptions::new();
        let tls = match &self.ca {
            Some(ca) => tls.ca_certificate(etcd_client::Certificate::from_pem(ca)),
            None => tls.with_native_roots(),
        };
        match &self.identity {
            Some(id) => tls.identity(etcd_client::Identity::from_pem(&id.cert, &id.key)),
            None => tls,
        }
    }

    /// `builder` set up to check servers against the CA file (only) or the system's roots,
    /// presenting the client certificate if any: for Consul over HTTPS.
    pub fn http_tls(
        &self,
        mut builder: reqwest::ClientBuilder,
    ) -> Result<reqwest::ClientBuilder, reqwest::Error> {
        if let Some(ca) = &self.ca {
            builder = builder.tls_built_in_root_certs(false);
            for cert in reqwest::Certificate::from_pem_bundle(ca)? {
                builder = builder.add_root_certificate(cert);
            }
        }
        if let Some(id) = &self.identity {
            let mut pem = id.cert.clone();
            pem.push(b'\n');
            pem.extend_from_slice(&id.key);
            builder = builder.identity(reqwest::Identity::from_pem(&pem)?);
        }
        Ok(builder)
    }
}

/// The TLS failure somewhere in `error`'s chain of causes, if it is one: a certificate
/// refused on either side, or a server that speaks no TLS. Retrying cannot mend it.
pub fn tls_failure<'a>(error: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    if let Some(tls) = error.downcast_ref::<rustls::Error>() {
        return Some(tls);
    }
    // An io::Error hides the error it wraps from source() (and may wrap another io::Error).
    if let Some(inner) = error
        .downcast_ref::<std::io::Error>()
        .and_then(std::io::Error::get_ref)
        && let Some(tls) = tls_failure(inner)
    {
        return Some(tls);
    }
    error.source().and_then(tls_failure)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str, mode: u32) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(
            &path,
            <std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(mode),
        )
        .unwrap();
        path
    }

    #[test]
    fn password_files_are_the_owners_alone() {
        let dir = std::env::temp_dir().join(format!("lb-access-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let good = write(&dir, "good", "pa ss\n", 0o600);
        assert_eq!(read_password_file(&good).unwrap(), "pa ss");
        let crlf = write(&dir, "crlf", "pw\r\n", 0o400);
        assert_eq!(read_password_file(&crlf).unwrap(), "pw");
        let bare = write(&dir, "bare", "pw", 0o600);
        assert_eq!(read_password_file(&bare).unwrap(), "pw");
        let open = write(&dir, "open", "pw\n", 0o644);
        let e = read_password_file(&open).unwrap_err().to_string();
        assert_eq!(
            e,
            format!(
                "--store-password-file {}: mode 0644 lets others than its owner at the secret in \
                 it; it must be 0600 or 0400: chmod 600 {}",
                open.display(),
                open.display()
            )
        );
        let group = write(&dir, "group", "pw\n", 0o640);
        assert!(matches!(
            read_password_file(&group),
            Err(AccessError::Secret(SecretFileError::Exposed {
                mode: 0o640,
                ..
            }))
        ));
        let empty = write(&dir, "empty", "\n", 0o600);
        assert!(
            read_password_file(&empty)
                .unwrap_err()
                .to_string()
                .ends_with("the file is empty")
        );
        let e = read_password_file(&dir.join("missing")).unwrap_err();
        assert!(e.to_string().contains("No such file"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn pem_files_must_hold_what_their_flag_says() {
        let dir = std::env::temp_dir().join(format!("lb-access-pem-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let junk = write(&dir, "junk.pem", "hello\n", 0o644);
        let e = read_ca_file(&junk).unwrap_err().to_string();
        assert!(e.starts_with("--store-ca-file "), "{e}");
        assert!(
            e.ends_with("no PEM certificate (BEGIN CERTIFICATE) in it"),
            "{e}"
        );
        let bad = write(
            &dir,
            "bad.pem",
            "-----BEGIN CERTIFICATE-----\n!!!\n-----END CERTIFICATE-----\n",
            0o644,
        );
        let e = read_ca_file(&bad).unwrap_err().to_string();
        assert!(e.contains("not PEM certificates"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn tls_failures_are_found_inside_io_errors() {
        let inner = rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer);
        let io = std::io::Error::new(std::io::ErrorKind::InvalidData, inner);
        let wrapped = std::io::Error::other(io);
        assert!(matches!(
            tls_failure(&wrapped),
            Some(rustls::Error::InvalidCertificate(_))
        ));
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        assert!(tls_failure(&refused).is_none());
    }
}
