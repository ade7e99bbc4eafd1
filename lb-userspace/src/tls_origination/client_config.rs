//! A frontend's rustls client configuration from its DestinationRule's `tls`: the roots
//! endpoint certificates must chain to, how names are checked, the client certificate.

use std::{path::Path, sync::Arc};

use anyhow::{bail, Context as _, Result};
use rustls::{
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    client::WebPkiServerVerifier,
    crypto::CryptoProvider,
    pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer, ServerName, UnixTime},
    ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};

use crate::model::TlsOrigination;

/// The crypto all TLS origination uses: ring, which builds with a C compiler alone
/// (aws-lc-rs, rustls' default, compiles far more C). rustls marks it deprecated because
/// it has no post-quantum key exchange; the classical groups it has are what endpoints
/// that lb originates to commonly accept.
#[expect(
    deprecated,
    reason = "ring's provider has no post-quantum key exchange, see above"
)]
pub fn provider() -> Arc<CryptoProvider> {
    use rustls::crypto::ring::kx_group;
    let mut provider = rustls::crypto::ring::default_provider();
    // X25519 first, as browsers, curl, HAProxy and nginx offer it: the client's key share
    // is for the first group, and a server takes it when it can. ring's provider lists
    // P-384 first, several times the cost of X25519 on both sides of every handshake
    // (resumed ones too: TLS 1.3 resumption still exchanges keys).
    provider.kx_groups = vec![kx_group::X25519, kx_group::SECP256R1, kx_group::SECP384R1];
    Arc::new(provider)
}

/// The certificates of a PEM file, named in errors.
fn certificates(path: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .with_context(|| format!("{what} {}: reading it", path.display()))?
        .collect::<Result<_, _>>()
        .with_context(|| format!("{what} {}: not PEM certificates", path.display()))?;
    if certs.is_empty() {
        bail!("{what} {}: no certificate in it", path.display());
    }
    Ok(certs)
}

/// The roots endpoint certificates must chain to: `caCertificates`, else the system's.
fn roots(tls: &TlsOrigination) -> Result<RootCertStore> {
    let mut roots = RootCertStore::empty();
    match &tls.ca_certificates {
        Some(path) => {
            for cert in certificates(path, "caCertificates")? {
                roots
                    .add(cert)
                    .with_context(|| format!("caCertificates {}: a bad CA", path.display()))?;
            }
        }
        None => {
            // `SSL_CERT_FILE` / `SSL_CERT_DIR` override the system's bundle, as for OpenSSL.
            let found = rustls_native_certs::load_native_certs();
            for cert in found.certs {
                let _ = roots.add(cert);
            }
            if roots.is_empty() {
                bail!(
                    "no CA certificates found on the system ({:?}); give caCertificates",
                    found.errors
                );
            }
        }
    }
    Ok(roots)
}

/// The client configuration for a frontend with `tls`.
pub fn client_config(tls: &TlsOrigination) -> Result<Arc<ClientConfig>> {
    let provider = provider();
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?;
    let verifier: Arc<dyn ServerCertVerifier> = if tls.insecure_skip_verify {
        Arc::new(NoVerification(provider.clone()))
    } else {
        let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots(tls)?), provider)
            .build()
            .context("the certificate verifier")?;
        if tls.subject_alt_names.is_empty() {
            webpki
        } else {
            let names = tls
                .subject_alt_names
                .iter()
                .map(|n| {
                    ServerName::try_from(n.clone())
                        .with_context(|| format!("subjectAltNames: {n:?} is not a DNS name or IP"))
                })
                .collect::<Result<_>>()?;
            Arc::new(AnyOfNames { webpki, names })
        }
    };
    let builder = builder
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let config = match &tls.client_certificate {
        Some((cert, key)) => {
            let chain = certificates(cert, "clientCertificate")?;
            let key = PrivateKeyDer::from_pem_file(key)
                .with_context(|| format!("privateKey {}: not a PEM private key", key.display()))?;
            builder
                .with_client_auth_cert(chain, key)
                .context("clientCertificate and privateKey do not make a client identity")?
        }
        None => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

/// `subjectAltNames`: the chain must verify and one of these names be on the certificate
/// (Istio's check), whatever name was sent as SNI.
#[derive(Debug)]
struct AnyOfNames {
    webpki: Arc<WebPkiServerVerifier>,
    names: Vec<ServerName<'static>>,
}

impl ServerCertVerifier for AnyOfNames {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let mut last = None;
        for name in &self.names {
            match self.webpki.verify_server_cert(
                end_entity,
                intermediates,
                name,
                ocsp_response,
                now,
            ) {
                Ok(ok) => return Ok(ok),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or(rustls::Error::General("no subjectAltNames".into())))
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}

/// `insecureSkipVerify: true`: any certificate is taken (the handshake's signatures are
/// still checked, so the peer holds the certificate's key).
#[derive(Debug)]
struct NoVerification(Arc<CryptoProvider>);

impl ServerCertVerifier for NoVerification {
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
        rustls::crypto::verify_tls12_signature(
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
        rustls::crypto::verify_tls13_signature(
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
