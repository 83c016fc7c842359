//! Backends reached over TLS (HAProxy's `ssl` on a server line, DFP's `sslVerifyNone`):
//! the certificate checked against the system's roots or a route's own CA, or not at all
//! when the route says so. HTTP/1.1 inside, or HTTP/2 for routes whose backends speak it
//! (ALPN says which).
use std::{
    net::SocketAddr,
    sync::{Arc, LazyLock},
};

use rustls::{
    DigitallySignedStruct, SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature},
    pki_types::{CertificateDer, ServerName, UnixTime, pem::PemObject},
};

/// The system's roots, read once (the first route that checks against them): reading
/// them takes milliseconds, and every write of a service and every rebuild of the routes
/// would pay it again. A change of the host's roots is seen at lb's next start.
static SYSTEM_ROOTS: LazyLock<rustls::RootCertStore> = LazyLock::new(|| {
    let mut roots = rustls::RootCertStore::empty();
    roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
    roots
});

/// How a route's backends are reached over TLS.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct BackendTls {
    /// Check the backend's certificate (chain and name); false: take any (DFP's
    /// `sslVerifyNone`).
    pub verify: bool,
    /// The roots to check against, as PEM; none: the system's.
    pub ca_pem: Option<String>,
    /// The name sent as SNI and checked in the certificate; none: the backend's address.
    pub server_name: Option<String>,
}

/// A route's backend TLS, ready to connect with.
pub(crate) struct TlsConnector {
    connector: tokio_rustls::TlsConnector,
    server_name: Option<ServerName<'static>>,
}

impl BackendTls {
    /// Checks it as a service is validated: the CA parses, the name is a name.
    pub fn check(&self) -> Result<(), String> {
        self.connector(false).map(|_| ())
    }

    /// A connector offering `h2` (HTTP/2 backends) or http/1.1 by ALPN.
    pub(crate) fn connector(&self, h2: bool) -> Result<TlsConnector, String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?;
        let mut config = if self.verify {
            let mut roots = rustls::RootCertStore::empty();
            match &self.ca_pem {
                Some(pem) => {
                    for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
                        let cert = cert.map_err(|e| format!("ca: not PEM certificates: {e}"))?;
                        roots
                            .add(cert)
                            .map_err(|e| format!("ca: not a CA certificate: {e}"))?;
                    }
                    if roots.is_empty() {
                        return Err("ca: no certificate in it".into());
                    }
                }
                None => roots = SYSTEM_ROOTS.clone(),
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        } else {
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
                .with_no_client_auth()
        };
        config.alpn_protocols = vec![if h2 {
            b"h2".to_vec()
        } else {
            b"http/1.1".to_vec()
        }];
        let server_name = match &self.server_name {
            Some(name) => Some(
                ServerName::try_from(name.clone())
                    .map_err(|_| format!("server_name: {name:?} is not a host name"))?,
            ),
            None => None,
        };
        Ok(TlsConnector {
            connector: tokio_rustls::TlsConnector::from(Arc::new(config)),
            server_name,
        })
    }
}

impl TlsConnector {
    /// TLS over `tcp` to the backend at `addr`.
    pub async fn connect(
        &self,
        addr: SocketAddr,
        tcp: tokio::net::TcpStream,
    ) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
        let name = self
            .server_name
            .clone()
            .unwrap_or_else(|| ServerName::IpAddress(addr.ip().into()));
        self.connector.connect(name, tcp).await
    }
}

/// Takes any certificate (the route asked for no check), still checking that the server
/// holds the key of the one it sent.
#[derive(Debug)]
struct AnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ca_that_is_no_certificate_or_a_bad_name_is_refused() {
        let junk = BackendTls {
            verify: true,
            ca_pem: Some("not pem".into()),
            server_name: None,
        };
        assert!(junk.check().unwrap_err().starts_with("ca:"));
        let name = BackendTls {
            verify: true,
            ca_pem: None,
            server_name: Some("bad name!".into()),
        };
        assert!(name.check().unwrap_err().starts_with("server_name:"));
        let none = BackendTls {
            verify: false,
            ..BackendTls::default()
        };
        assert!(none.check().is_ok());
    }
}
