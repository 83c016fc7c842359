//! HTTPS termination: certificates (checked, stored, chosen by SNI) and the TLS settings
//! of the HTTPS listener.
//!
//! - `cert`: a certificate chain and key, checked; its stored form
//! - `table`: the certificates served, chosen per handshake
//! - `follow`: the store's certificates kept in the table
pub mod cert;
pub mod follow;
pub mod table;

use std::sync::Arc;

pub use cert::{CertError, Certificate};
pub use table::CertTable;

/// The HTTPS listener's TLS: 1.2 and 1.3 (rustls' safe defaults, ring), certificates from
/// `table`, ALPN h2 then http/1.1.
pub fn server_config(table: Arc<CertTable>) -> Arc<rustls::ServerConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("ring supports TLS 1.2 and 1.3")
        .with_no_client_auth()
        .with_cert_resolver(table);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Arc::new(config)
}
