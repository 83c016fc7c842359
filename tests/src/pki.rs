//! Certificates made at run time for the TLS tests: a CA, a server certificate for the
//! given addresses, a client certificate, and a second CA that signed none of them. Written
//! as PEM files (mode 0600) into a temporary directory, removed on drop.
use std::{
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

pub struct Pki {
    dir: PathBuf,
    ca: CertifiedIssuer<'static, KeyPair>,
    /// PEM of the server certificate and key, for servers in this process.
    pub server_cert_pem: String,
    pub server_key_pem: String,
}

/// A CA's parameters, named `name`.
fn ca_params(name: &str) -> anyhow::Result<CertificateParams> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    Ok(params)
}

/// A leaf's parameters: subject alternative names `names` (IP addresses or DNS names),
/// for `usage`.
fn leaf_params(
    name: &str,
    names: &[&str],
    usage: ExtendedKeyUsagePurpose,
) -> anyhow::Result<CertificateParams> {
    let sans: Vec<String> = names.iter().map(ToString::to_string).collect();
    let mut params = CertificateParams::new(sans)?;
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![usage];
    Ok(params)
}

impl Pki {
    /// A CA, a server certificate for `server_names` (and 127.0.0.1) signed by it, a client
    /// certificate signed by it, and an unrelated CA.
    pub fn new(server_names: &[&str]) -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(crate::unique("lbt-pki"));
        std::fs::create_dir_all(&dir)?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
        let ca = CertifiedIssuer::self_signed(ca_params("lb test CA")?, KeyPair::generate()?)?;
        let other = CertifiedIssuer::self_signed(ca_params("another CA")?, KeyPair::generate()?)?;

        let mut names = vec!["127.0.0.1"];
        names.extend_from_slice(server_names);
        let server_key = KeyPair::generate()?;
        let server = leaf_params(
            "lb test server",
            &names,
            ExtendedKeyUsagePurpose::ServerAuth,
        )?
        .signed_by(&server_key, &ca)?;
        let client_key = KeyPair::generate()?;
        let client = leaf_params("lb-client", &[], ExtendedKeyUsagePurpose::ClientAuth)?
            .signed_by(&client_key, &ca)?;

        let pki = Self {
            dir,
            ca,
            server_cert_pem: server.pem(),
            server_key_pem: server_key.serialize_pem(),
        };
        pki.write("ca.pem", &pki.ca.pem())?;
        pki.write("other-ca.pem", &other.pem())?;
        pki.write("server.pem", &pki.server_cert_pem)?;
        pki.write("server-key.pem", &pki.server_key_pem)?;
        pki.write("client.pem", &client.pem())?;
        pki.write("client-key.pem", &client_key.serialize_pem())?;
        Ok(pki)
    }

    /// Writes `text` to `name` in the directory, mode 0600.
    pub fn write(&self, name: &str, text: &str) -> anyhow::Result<PathBuf> {
        let path = self.dir.join(name);
        std::fs::write(&path, text)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
        Ok(path)
    }

    /// A server certificate for the DNS names `names` signed by the CA, valid from `from`
    /// to `until` seconds from now (a fresh ECDSA P-256 key each time): PEM chain and key.
    pub fn leaf(&self, names: &[&str], from: i64, until: i64) -> anyhow::Result<(String, String)> {
        let key = KeyPair::generate()?;
        let mut params = leaf_params(names[0], names, ExtendedKeyUsagePurpose::ServerAuth)?;
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now + time::Duration::seconds(from);
        params.not_after = now + time::Duration::seconds(until);
        let cert = params.signed_by(&key, &self.ca)?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }
    /// A CA that signed nothing here.
    pub fn other_ca(&self) -> PathBuf {
        self.dir.join("other-ca.pem")
    }
    pub fn server_cert(&self) -> PathBuf {
        self.dir.join("server.pem")
    }
    pub fn server_key(&self) -> PathBuf {
        self.dir.join("server-key.pem")
    }
    pub fn client_cert(&self) -> PathBuf {
        self.dir.join("client.pem")
    }
    pub fn client_key(&self) -> PathBuf {
        self.dir.join("client-key.pem")
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Pki {
    /// A TLS server setting with the server certificate, asking no client certificate.
    pub fn server_config(&self) -> anyhow::Result<std::sync::Arc<rustls::ServerConfig>> {
        use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
        let certs = CertificateDer::pem_slice_iter(self.server_cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()?;
        let key = PrivateKeyDer::from_pem_slice(self.server_key_pem.as_bytes())?;
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(certs, key)?;
        Ok(std::sync::Arc::new(config))
    }
}

/// A TCP listener whose connections are served over TLS, for axum::serve. Handshakes run
/// one at a time, each for at most 5 s: a test server's clients are few.
pub struct TlsListener {
    tcp: tokio::net::TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
}

impl TlsListener {
    pub fn new(tcp: tokio::net::TcpListener, config: std::sync::Arc<rustls::ServerConfig>) -> Self {
        Self {
            tcp,
            acceptor: tokio_rustls::TlsAcceptor::from(config),
        }
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let Ok((tcp, addr)) = self.tcp.accept().await else {
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            };
            let handshake = self.acceptor.accept(tcp);
            // A client that refuses the certificate, or speaks no TLS, is dropped.
            if let Ok(Ok(tls)) =
                tokio::time::timeout(std::time::Duration::from_secs(5), handshake).await
            {
                return (tls, addr);
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.tcp.local_addr()
    }
}
