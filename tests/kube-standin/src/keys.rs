//! Service-account signing keys: RSA-2048 (`RS256`) and ECDSA P-256 (`ES256`), their `kid`
//! (base64url of SHA-256 over the SPKI DER, as kube-apiserver derives it), JWS signing and
//! verification, and the JWK form published at `/openid/v1/jwks`.

use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::rsa::{KeyPair as RsaKeyPair, KeySize};
use aws_lc_rs::signature::{self, EcdsaKeyPair, KeyPair as _, UnparsedPublicKey};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use serde::Serialize;

use crate::KeyAlg;

/// Error returned when a key cannot be generated or used.
#[derive(Debug, thiserror::Error)]
#[error("signing key error: {0}")]
pub struct KeyError(&'static str);

enum Material {
    Rsa(RsaKeyPair),
    Ec(EcdsaKeyPair),
}

/// One signing key with its derived `kid`.
pub struct SigningKey {
    material: Material,
    kid: String,
    /// Public key in the form `UnparsedPublicKey` verifies: PKCS#1 for RSA, the
    /// uncompressed point for EC.
    public: Vec<u8>,
}

/// A JSON Web Key as kube-apiserver publishes it; field order `use, kty, kid, crv, alg, x, y, n, e`.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Jwk {
    #[serde(rename = "use")]
    use_: &'static str,
    kty: &'static str,
    kid: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    crv: Option<&'static str>,
    alg: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    x: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    y: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    n: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    e: Option<String>,
}

fn kid_of(spki_der: &[u8]) -> String {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, spki_der);
    URL_SAFE_NO_PAD.encode(digest.as_ref())
}

impl SigningKey {
    /// Generates a fresh key of the given algorithm.
    pub fn generate(alg: KeyAlg) -> Result<SigningKey, KeyError> {
        match alg {
            KeyAlg::Rs256 => Self::from_material(Material::Rsa(
                RsaKeyPair::generate(KeySize::Rsa2048)
                    .map_err(|_| KeyError("RSA key generation failed"))?,
            )),
            KeyAlg::Es256 => Self::from_material(Material::Ec(
                EcdsaKeyPair::generate(&signature::ECDSA_P256_SHA256_FIXED_SIGNING)
                    .map_err(|_| KeyError("EC key generation failed"))?,
            )),
        }
    }

    /// Loads a key saved with [`SigningKey::to_pkcs8`].
    pub fn from_pkcs8(alg: KeyAlg, der: &[u8]) -> Result<SigningKey, KeyError> {
        match alg {
            KeyAlg::Rs256 => Self::from_material(Material::Rsa(
                RsaKeyPair::from_pkcs8(der).map_err(|_| KeyError("invalid RSA PKCS#8 key"))?,
            )),
            KeyAlg::Es256 => Self::from_material(Material::Ec(
                EcdsaKeyPair::from_pkcs8(&signature::ECDSA_P256_SHA256_FIXED_SIGNING, der)
                    .map_err(|_| KeyError("invalid EC PKCS#8 key"))?,
            )),
        }
    }

    /// The private key as PKCS#8 DER (for the process mode's saved state).
    pub fn to_pkcs8(&self) -> Result<Vec<u8>, KeyError> {
        match &self.material {
            Material::Rsa(kp) => kp
                .as_der()
                .map(|d| d.as_ref().to_vec())
                .map_err(|_| KeyError("RSA key export failed")),
            Material::Ec(kp) => kp
                .to_pkcs8v1()
                .map(|d| d.as_ref().to_vec())
                .map_err(|_| KeyError("EC key export failed")),
        }
    }

    fn from_material(material: Material) -> Result<SigningKey, KeyError> {
        let (spki, public) = match &material {
            Material::Rsa(kp) => (
                kp.public_key()
                    .as_der()
                    .map_err(|_| KeyError("RSA public key encoding failed"))?
                    .as_ref()
                    .to_vec(),
                kp.public_key().as_ref().to_vec(),
            ),
            Material::Ec(kp) => (
                kp.public_key()
                    .as_der()
                    .map_err(|_| KeyError("EC public key encoding failed"))?
                    .as_ref()
                    .to_vec(),
                kp.public_key().as_ref().to_vec(),
            ),
        };
        Ok(SigningKey {
            kid: kid_of(&spki),
            material,
            public,
        })
    }

    /// The key id: base64url(SHA-256(SPKI DER)), 43 characters.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The key's algorithm.
    pub fn alg(&self) -> KeyAlg {
        match self.material {
            Material::Rsa(_) => KeyAlg::Rs256,
            Material::Ec(_) => KeyAlg::Es256,
        }
    }

    /// The JWS `alg` name.
    pub fn alg_name(&self) -> &'static str {
        alg_name(self.alg())
    }

    /// Signs `msg` (the JWS signing input) and returns the raw JWS signature.
    pub fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, KeyError> {
        let rng = SystemRandom::new();
        match &self.material {
            Material::Rsa(kp) => {
                let mut sig = vec![0u8; kp.public_modulus_len()];
                kp.sign(&signature::RSA_PKCS1_SHA256, &rng, msg, &mut sig)
                    .map_err(|_| KeyError("RSA signing failed"))?;
                Ok(sig)
            }
            Material::Ec(kp) => kp
                .sign(&rng, msg)
                .map(|s| s.as_ref().to_vec())
                .map_err(|_| KeyError("EC signing failed")),
        }
    }

    /// Verifies a JWS signature made with `alg` over `msg`. A mismatched algorithm fails.
    pub fn verify(&self, alg: &str, msg: &[u8], sig: &[u8]) -> bool {
        match (&self.material, alg) {
            (Material::Rsa(_), "RS256") => {
                UnparsedPublicKey::new(&signature::RSA_PKCS1_2048_8192_SHA256, &self.public)
                    .verify(msg, sig)
                    .is_ok()
            }
            (Material::Ec(_), "ES256") => {
                UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, &self.public)
                    .verify(msg, sig)
                    .is_ok()
            }
            _ => false,
        }
    }

    /// The public key as a JWK.
    pub fn jwk(&self) -> Jwk {
        match &self.material {
            Material::Rsa(kp) => {
                let pk = kp.public_key();
                Jwk {
                    use_: "sig",
                    kty: "RSA",
                    kid: self.kid.clone(),
                    crv: None,
                    alg: "RS256",
                    x: None,
                    y: None,
                    n: Some(URL_SAFE_NO_PAD.encode(pk.modulus().big_endian_without_leading_zero())),
                    e: Some(
                        URL_SAFE_NO_PAD.encode(pk.exponent().big_endian_without_leading_zero()),
                    ),
                }
            }
            Material::Ec(_) => {
                // Uncompressed point: 0x04 || X (32 bytes) || Y (32 bytes).
                let (x, y) = if self.public.len() == 65 {
                    (&self.public[1..33], &self.public[33..65])
                } else {
                    (&self.public[..0], &self.public[..0])
                };
                Jwk {
                    use_: "sig",
                    kty: "EC",
                    kid: self.kid.clone(),
                    crv: Some("P-256"),
                    alg: "ES256",
                    x: Some(URL_SAFE_NO_PAD.encode(x)),
                    y: Some(URL_SAFE_NO_PAD.encode(y)),
                    n: None,
                    e: None,
                }
            }
        }
    }
}

/// The JWS `alg` name of a key algorithm.
pub fn alg_name(alg: KeyAlg) -> &'static str {
    match alg {
        KeyAlg::Rs256 => "RS256",
        KeyAlg::Es256 => "ES256",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_verify_roundtrip_and_kid_shape() {
        for alg in [KeyAlg::Rs256, KeyAlg::Es256] {
            let k = SigningKey::generate(alg).unwrap();
            assert_eq!(k.kid().len(), 43);
            let sig = k.sign(b"hello").unwrap();
            assert!(k.verify(k.alg_name(), b"hello", &sig));
            assert!(!k.verify(k.alg_name(), b"hellO", &sig));
            assert!(!k.verify("HS256", b"hello", &sig));
            let again = SigningKey::from_pkcs8(alg, &k.to_pkcs8().unwrap()).unwrap();
            assert_eq!(again.kid(), k.kid());
            assert!(again.verify(k.alg_name(), b"hello", &sig));
        }
    }
}
