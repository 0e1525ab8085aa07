//! TLS 1.3 inside QUIC with the peers' own Ed25519 keys as RFC 7250 raw
//! public keys (rustls 0.23): no certificates, no authority. The key a
//! peer proves it holds *is* its peer ID.
//!
//! - The connecting side expects one peer ID; anything else aborts the
//!   handshake, and [`Mismatch`] records what was seen so the error can name
//!   both IDs.
//! - The accepting side requires a client key (mutual authentication) and
//!   reads the peer ID from it after the handshake; policy (`--allow`) is
//!   applied there, so the refusal can carry a reason to the peer.
//!
//! An Ed25519 SubjectPublicKeyInfo and PKCS#8 key have fixed DER prefixes
//! (RFC 8410 §4 and §7), so they are assembled here rather than pulling in
//! a certificate generator.

use std::sync::{Arc, Mutex};

use natpunch_proto::identity::{Identity, PeerId};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{
    verify_tls13_signature_with_raw_key, CryptoProvider, WebPkiSupportedAlgorithms,
};
use rustls::pki_types::{
    CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, SubjectPublicKeyInfoDer,
    UnixTime,
};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::sign::CertifiedKey;
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};
use zeroize::Zeroizing;

/// The ALPN token of natpunch sessions, version 1.
pub const ALPN: &[u8] = b"natpunch/1";

/// RFC 8410 §4: SEQUENCE { SEQUENCE { OID 1.3.101.112 } BIT STRING (32 bytes) }.
const SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];
/// RFC 8410 §7: PKCS#8 v1 with the 32-byte seed as an OCTET STRING.
const PKCS8_PREFIX: [u8; 16] = [
    0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
];

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    #[error("the TLS library refused our key or settings: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("QUIC refused the TLS settings: {0}")]
    Quic(#[from] quinn::crypto::rustls::NoInitialCipherSuite),
}

/// The DER SubjectPublicKeyInfo of a peer ID's key.
pub fn spki_of(peer: &PeerId) -> Vec<u8> {
    let mut v = SPKI_PREFIX.to_vec();
    v.extend_from_slice(peer.as_bytes());
    v
}

/// The peer ID in a raw public key, if it is an Ed25519 key.
pub fn peer_id_from_spki(der: &[u8]) -> Option<PeerId> {
    let key = der.strip_prefix(&SPKI_PREFIX[..])?;
    PeerId::from_bytes(key.try_into().ok()?).ok()
}

/// The peer ID a finished handshake authenticated.
pub fn peer_id_of(conn: &quinn::Connection) -> Option<PeerId> {
    let any = conn.peer_identity()?;
    let certs = any.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    peer_id_from_spki(certs.first()?.as_ref())
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certified_key(
    identity: &Identity,
    provider: &CryptoProvider,
) -> Result<Arc<CertifiedKey>, TlsError> {
    let mut pkcs8 = Zeroizing::new(PKCS8_PREFIX.to_vec());
    pkcs8.extend_from_slice(&identity.seed());
    let key = provider
        .key_provider
        .load_private_key(PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
            pkcs8.to_vec(),
        )))?;
    let spki = CertificateDer::from(spki_of(&identity.peer_id()));
    Ok(Arc::new(CertifiedKey::new(vec![spki], key)))
}

/// What the connecting side saw, for the error message.
#[derive(Debug, Default, Clone)]
pub struct Mismatch(Arc<Mutex<Option<PeerId>>>);

impl Mismatch {
    /// The peer ID the other side presented, if it was not the expected one.
    pub fn seen(&self) -> Option<PeerId> {
        *self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[derive(Debug)]
struct ExpectPeer {
    expected: PeerId,
    algs: WebPkiSupportedAlgorithms,
    mismatch: Mismatch,
}

fn check_signature(
    message: &[u8],
    key: &CertificateDer<'_>,
    dss: &DigitallySignedStruct,
    algs: &WebPkiSupportedAlgorithms,
) -> Result<HandshakeSignatureValid, rustls::Error> {
    verify_tls13_signature_with_raw_key(
        message,
        &SubjectPublicKeyInfoDer::from(key.as_ref()),
        dss,
        algs,
    )
}

fn no_tls12() -> rustls::Error {
    rustls::Error::General("natpunch speaks TLS 1.3 only".into())
}

impl ServerCertVerifier for ExpectPeer {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let got = peer_id_from_spki(end_entity.as_ref()).ok_or(
            rustls::Error::InvalidCertificate(CertificateError::BadEncoding),
        )?;
        if got != self.expected {
            *self.mismatch.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(got);
            return Err(rustls::Error::InvalidCertificate(
                CertificateError::ApplicationVerificationFailure,
            ));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(no_tls12())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        check_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }

    fn requires_raw_public_keys(&self) -> bool {
        true
    }
}

#[derive(Debug)]
struct AnyPeerKey {
    algs: WebPkiSupportedAlgorithms,
}

impl ClientCertVerifier for AnyPeerKey {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        // Possession of the key is proven by the handshake signature; which
        // peer IDs are welcome is decided after the handshake.
        peer_id_from_spki(end_entity.as_ref())
            .map(|_| ClientCertVerified::assertion())
            .ok_or(rustls::Error::InvalidCertificate(
                CertificateError::BadEncoding,
            ))
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(no_tls12())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        check_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }

    fn requires_raw_public_keys(&self) -> bool {
        true
    }
}

/// Client side: we are `identity` and accept only `expected`.
pub fn client_crypto(
    identity: &Identity,
    expected: PeerId,
) -> Result<(Arc<quinn::crypto::rustls::QuicClientConfig>, Mismatch), TlsError> {
    let provider = provider();
    let key = certified_key(identity, &provider)?;
    let mismatch = Mismatch::default();
    let verifier = ExpectPeer {
        expected,
        algs: provider.signature_verification_algorithms,
        mismatch: mismatch.clone(),
    };
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_cert_resolver(Arc::new(
            rustls::client::AlwaysResolvesClientRawPublicKeys::new(key),
        ));
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(cfg)?;
    Ok((Arc::new(quic), mismatch))
}

/// Server side: we are `identity`; any peer that proves its key may finish
/// the handshake.
pub fn server_crypto(
    identity: &Identity,
) -> Result<Arc<quinn::crypto::rustls::QuicServerConfig>, TlsError> {
    let provider = provider();
    let key = certified_key(identity, &provider)?;
    let verifier = AnyPeerKey {
        algs: provider.signature_verification_algorithms,
    };
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(Arc::new(verifier))
        .with_cert_resolver(Arc::new(
            rustls::server::AlwaysResolvesServerRawPublicKeys::new(key),
        ));
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    let quic = quinn::crypto::rustls::QuicServerConfig::try_from(cfg)?;
    Ok(Arc::new(quic))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spki_round_trips_the_peer_id() {
        let id = Identity::from_seed([7; 32]).peer_id();
        assert_eq!(peer_id_from_spki(&spki_of(&id)), Some(id));
        assert_eq!(peer_id_from_spki(&spki_of(&id)[1..]), None);
        let mut rsa_like = spki_of(&id);
        rsa_like[8] = 0x71; // another algorithm OID
        assert_eq!(peer_id_from_spki(&rsa_like), None);
    }

    #[test]
    fn our_key_loads_and_matches_our_id() {
        let identity = Identity::from_seed([9; 32]);
        let p = provider();
        let ck = certified_key(&identity, &p).expect("key loads");
        assert_eq!(
            peer_id_from_spki(ck.cert[0].as_ref()),
            Some(identity.peer_id())
        );
        assert!(client_crypto(&identity, identity.peer_id()).is_ok());
        assert!(server_crypto(&identity).is_ok());
    }
}
