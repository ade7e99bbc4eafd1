//! HTTPS backends for the TLS-origination tests: a CA of the test's own (rcgen), leaf
//! certificates for the names a backend stands for, and a server (rustls) that answers
//! every request with its name and a status the test sets.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::Duration,
};

use anyhow::{Context as _, Result};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::netns::Netns;

/// A certificate authority made by the test; its certificate is written to a PEM file
/// (for `caCertificates`, or `SSL_CERT_FILE`).
pub struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    certificate: CertificateDer<'static>,
    pub pem_path: PathBuf,
}

/// A leaf certificate and its key.
pub struct Identity {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

impl Identity {
    /// Writes the certificate chain and the key as PEM files `dir/STEM.pem` and
    /// `dir/STEM.key` (for a server's or a client's configuration); returns their paths.
    pub fn write_pem(&self, dir: &Path, stem: &str) -> Result<(PathBuf, PathBuf)> {
        let cert_path = dir.join(format!("{stem}.pem"));
        let key_path = dir.join(format!("{stem}.key"));
        let chain: String = self
            .chain
            .iter()
            .map(|c| pem_block("CERTIFICATE", c.as_ref()))
            .collect();
        std::fs::write(&cert_path, chain)?;
        std::fs::write(&key_path, pem_block("PRIVATE KEY", self.key.secret_der()))?;
        Ok((cert_path, key_path))
    }

    /// A copy (the key is not `Clone`).
    pub fn clone_key(&self) -> Self {
        Self {
            chain: self.chain.clone(),
            key: self.key.clone_key(),
        }
    }
}

fn pem_block(label: &str, der: &[u8]) -> String {
    pem::encode(&pem::Pem::new(label, der.to_vec()))
}

impl TestCa {
    /// A new CA, its certificate written to `dir/ca.pem`.
    pub fn new(dir: &Path) -> Result<Self> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "lb tests CA");
        let cert = params.self_signed(&key)?;
        let pem_path = dir.join("ca.pem");
        std::fs::write(&pem_path, cert.pem())?;
        Ok(Self {
            certificate: cert.der().clone(),
            issuer: Issuer::new(params, key),
            pem_path,
        })
    }

    /// The CA's own certificate.
    pub fn certificate(&self) -> CertificateDer<'static> {
        self.certificate.clone()
    }

    /// A certificate for `names` (DNS names or addresses), signed by this CA.
    pub fn issue(&self, names: &[&str]) -> Result<Identity> {
        self.issue_with(names, |_| {})
    }

    /// Like `issue`, for a certificate that expired in 2021.
    pub fn issue_expired(&self, names: &[&str]) -> Result<Identity> {
        self.issue_with(names, |params| {
            params.not_before = rcgen::date_time_ymd(2020, 1, 1);
            params.not_after = rcgen::date_time_ymd(2021, 1, 1);
        })
    }

    fn issue_with(
        &self,
        names: &[&str],
        adjust: impl FnOnce(&mut CertificateParams),
    ) -> Result<Identity> {
        let key = KeyPair::generate()?;
        let mut params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())?;
        adjust(&mut params);
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Identity {
            chain: vec![cert.der().clone()],
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        })
    }
}

struct Shared {
    status: AtomicU16,
    stop: AtomicBool,
    /// TLS handshakes completed.
    handshakes: AtomicU64,
}

/// An HTTPS server answering every request with its name and the status set (200 at
/// first); stops when dropped.
pub struct HttpsNameServer {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl HttpsNameServer {
    /// Binds `addr` in `ns` and serves `identity`'s certificate.
    pub fn start(ns: &Netns, addr: SocketAddr, name: &str, identity: Identity) -> Result<Self> {
        Self::start_with_clients(ns, addr, name, identity, None)
    }

    /// Like `start`; with `client_ca`, a client must present a certificate it signed
    /// (mutual TLS), else the handshake fails.
    pub fn start_with_clients(
        ns: &Netns,
        addr: SocketAddr,
        name: &str,
        identity: Identity,
        client_ca: Option<&TestCa>,
    ) -> Result<Self> {
        let listener = ns
            .run(|| std::net::TcpListener::bind(addr))
            .with_context(|| format!("HTTPS server: binding {addr} in {}", ns.name()))?;
        listener.set_nonblocking(true)?;
        #[expect(
            deprecated,
            reason = "ring, as lb's forwarder uses; no post-quantum groups"
        )]
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()?;
        let builder = match client_ca {
            None => builder.with_no_client_auth(),
            Some(ca) => {
                let mut roots = rustls::RootCertStore::empty();
                roots.add(ca.certificate())?;
                builder.with_client_cert_verifier(
                    rustls::server::WebPkiClientVerifier::builder_with_provider(
                        Arc::new(roots),
                        provider,
                    )
                    .build()?,
                )
            }
        };
        let config = builder.with_single_cert(identity.chain, identity.key)?;
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let shared = Arc::new(Shared {
            status: AtomicU16::new(200),
            stop: AtomicBool::new(false),
            handshakes: AtomicU64::new(0),
        });
        let serving = shared.clone();
        let name = name.to_string();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let thread = std::thread::spawn(move || {
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).expect("a listener");
                while !serving.stop.load(Ordering::Relaxed) {
                    let accepted =
                        tokio::time::timeout(Duration::from_millis(100), listener.accept()).await;
                    let Ok(Ok((stream, _))) = accepted else {
                        continue;
                    };
                    let (acceptor, shared, name) =
                        (acceptor.clone(), serving.clone(), name.clone());
                    tokio::spawn(async move {
                        let Ok(mut tls) = acceptor.accept(stream).await else {
                            return;
                        };
                        shared.handshakes.fetch_add(1, Ordering::Relaxed);
                        let _ = answer(&mut tls, &shared, &name).await;
                    });
                }
            })
        });
        Ok(Self {
            shared,
            thread: Some(thread),
        })
    }

    /// The status of the answers from now on.
    pub fn set_status(&self, status: u16) {
        self.shared.status.store(status, Ordering::Relaxed);
    }

    /// TLS handshakes completed so far.
    pub fn handshakes(&self) -> u64 {
        self.shared.handshakes.load(Ordering::Relaxed)
    }
}

/// Answers each request on the connection (keep-alive) until the client closes it.
async fn answer(
    tls: &mut tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
    shared: &Shared,
    name: &str,
) -> std::io::Result<()> {
    let mut pending = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        while let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
            pending.drain(..end + 4);
            let status = shared.status.load(Ordering::Relaxed);
            let response = format!(
                "HTTP/1.1 {status} {}\r\nContent-Length: {}\r\n\r\n{name}",
                if status < 400 { "OK" } else { "Error" },
                name.len()
            );
            tls.write_all(response.as_bytes()).await?;
        }
        let n = tls.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        pending.extend_from_slice(&buf[..n]);
    }
}

impl Drop for HttpsNameServer {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
