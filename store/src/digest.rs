//! BLAKE3-256 digests, printed as 64 lowercase hex characters.

use std::fmt;
use std::str::FromStr;

use crate::Error;

/// Length of a digest in bytes.
pub const DIGEST_LEN: usize = 32;

/// Shortest hex prefix accepted where a digest is expected (like git).
pub const MIN_PREFIX_LEN: usize = 8;

/// A BLAKE3-256 digest of canonical bytes: a blob's contents or a tree's encoding.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Digest([u8; DIGEST_LEN]);

impl Digest {
    /// The digest of `bytes`.
    pub fn of(bytes: &[u8]) -> Digest {
        Digest(*blake3::hash(bytes).as_bytes())
    }

    pub const fn from_bytes(bytes: [u8; DIGEST_LEN]) -> Digest {
        Digest(bytes)
    }

    /// Reads a digest from exactly 32 bytes; `None` for any other length.
    pub fn from_slice(bytes: &[u8]) -> Option<Digest> {
        let arr: [u8; DIGEST_LEN] = bytes.try_into().ok()?;
        Some(Digest(arr))
    }

    pub fn as_bytes(&self) -> &[u8; DIGEST_LEN] {
        &self.0
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// The first 12 hex characters, for human output.
    pub fn short(&self) -> String {
        let mut s = self.to_hex();
        s.truncate(12);
        s
    }
}

impl From<blake3::Hash> for Digest {
    fn from(h: blake3::Hash) -> Digest {
        Digest(*h.as_bytes())
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({})", self.short())
    }
}

impl FromStr for Digest {
    type Err = Error;

    /// Parses exactly 64 hex characters (either case).
    fn from_str(s: &str) -> Result<Digest, Error> {
        let bad = || Error::BadDigest {
            input: s.to_owned(),
            reason: "expected 64 hexadecimal characters",
        };
        if s.len() != DIGEST_LEN * 2 {
            return Err(bad());
        }
        let mut out = [0u8; DIGEST_LEN];
        hex::decode_to_slice(s, &mut out).map_err(|_| bad())?;
        Ok(Digest(out))
    }
}

impl serde::Serialize for Digest {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_hex())
    }
}

impl<'de> serde::Deserialize<'de> for Digest {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Digest, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A validated hex prefix of a digest (8 to 64 hex characters, lowercased).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DigestPrefix {
    hex: String,
}

impl DigestPrefix {
    pub fn parse(s: &str) -> Result<DigestPrefix, Error> {
        let lower = s.to_ascii_lowercase();
        if lower.len() < MIN_PREFIX_LEN || lower.len() > DIGEST_LEN * 2 {
            return Err(Error::BadDigest {
                input: s.to_owned(),
                reason: "a digest prefix needs 8 to 64 hexadecimal characters",
            });
        }
        if !lower.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(Error::BadDigest {
                input: s.to_owned(),
                reason: "expected only hexadecimal characters",
            });
        }
        Ok(DigestPrefix { hex: lower })
    }

    pub fn as_str(&self) -> &str {
        &self.hex
    }

    /// The whole bytes covered by the prefix, usable as a key-range prefix.
    pub fn byte_prefix(&self) -> Vec<u8> {
        let even = self.hex.len() & !1;
        hex::decode(&self.hex[..even]).unwrap_or_default()
    }

    pub fn matches(&self, d: &Digest) -> bool {
        d.to_hex().starts_with(&self.hex)
    }

    /// The full digest when the prefix has all 64 characters.
    pub fn as_full(&self) -> Option<Digest> {
        self.hex.parse().ok()
    }
}

/// In an OpenAPI document a digest is its 64 hex characters.
#[cfg(feature = "openapi")]
impl utoipa::PartialSchema for Digest {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        utoipa::openapi::ObjectBuilder::new()
            .schema_type(utoipa::openapi::schema::Type::String)
            .pattern(Some("^[0-9a-f]{64}$"))
            .description(Some("A BLAKE3-256 digest, 64 lowercase hex characters"))
            .into()
    }
}

#[cfg(feature = "openapi")]
impl utoipa::ToSchema for Digest {}
