//! An RS256 signing key, its JWKS, and a signed JWT for Envoy's `jwt_authn` filter.
//!
//! The `jwt_authn` scenarios verify "the same kind of token" as tokengate sees: RS256 over
//! RSA-2048, like a Kubernetes service-account token, with `iss`, `aud`, `sub`, `iat`, `exp`.

use anyhow::{anyhow, Result};
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::rsa::KeySize;
use aws_lc_rs::signature::{KeyPair, RsaKeyPair, RSA_PKCS1_SHA256};
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use serde_json::json;

/// A fresh RSA-2048 key with key id `kid`.
pub struct Signer {
    key: RsaKeyPair,
    kid: String,
}

impl Signer {
    /// Generates a new RSA-2048 key pair.
    pub fn generate(kid: &str) -> Result<Self> {
        let key = RsaKeyPair::generate(KeySize::Rsa2048).map_err(|_| anyhow!("RSA keygen"))?;
        Ok(Signer {
            key,
            kid: kid.to_string(),
        })
    }

    /// The public key as a JWKS document (`{"keys":[...]}`), one line of JSON.
    pub fn jwks(&self) -> String {
        let public = self.key.public_key();
        let n = public.modulus().big_endian_without_leading_zero().to_vec();
        let e = public.exponent().big_endian_without_leading_zero().to_vec();
        json!({"keys": [{
            "kty": "RSA", "alg": "RS256", "use": "sig", "kid": self.kid,
            "n": B64.encode(n), "e": B64.encode(e),
        }]})
        .to_string()
    }

    /// Signs `claims` as a compact RS256 JWS.
    pub fn sign(&self, claims: &serde_json::Value) -> Result<String> {
        let header = json!({"alg": "RS256", "typ": "JWT", "kid": self.kid});
        let signing_input = format!(
            "{}.{}",
            B64.encode(header.to_string()),
            B64.encode(claims.to_string())
        );
        let mut sig = vec![0u8; self.key.public_modulus_len()];
        self.key
            .sign(
                &RSA_PKCS1_SHA256,
                &SystemRandom::new(),
                signing_input.as_bytes(),
                &mut sig,
            )
            .map_err(|_| anyhow!("RSA sign"))?;
        Ok(format!("{signing_input}.{}", B64.encode(sig)))
    }
}

/// Claims of a token valid for `lifetime_secs` from now, shaped like a service-account token.
pub fn claims(issuer: &str, audience: &str, lifetime_secs: u64) -> serde_json::Value {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    json!({
        "iss": issuer,
        "aud": [audience],
        "sub": "system:serviceaccount:bench:client",
        "iat": now,
        "nbf": now,
        "exp": now + lifetime_secs,
        "kubernetes.io": {
            "namespace": "bench",
            "serviceaccount": {"name": "client", "uid": "0b1f9a34-6f0e-4b43-9a3c-1c2d3e4f5a6b"}
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_lc_rs::signature::{RsaPublicKeyComponents, RSA_PKCS1_2048_8192_SHA256};

    #[test]
    fn token_verifies_with_jwks() {
        let s = Signer::generate("k1").unwrap();
        let token = s.sign(&claims("iss", "aud", 60)).unwrap();
        let jwks: serde_json::Value = serde_json::from_str(&s.jwks()).unwrap();
        let k = &jwks["keys"][0];
        let n = B64.decode(k["n"].as_str().unwrap()).unwrap();
        let e = B64.decode(k["e"].as_str().unwrap()).unwrap();
        let (input, sig) = token.rsplit_once('.').unwrap();
        RsaPublicKeyComponents { n: &n, e: &e }
            .verify(
                &RSA_PKCS1_2048_8192_SHA256,
                input.as_bytes(),
                &B64.decode(sig).unwrap(),
            )
            .unwrap();
    }
}
