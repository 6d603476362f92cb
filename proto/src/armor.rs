//! Text armor for binary mesh objects, PEM style, so certificates and keys survive copy and paste:
//! `-----BEGIN MESH CERTIFICATE-----`, base64 in 64-column lines, `-----END MESH CERTIFICATE-----`.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;

pub const CERTIFICATE: &str = "MESH CERTIFICATE";
pub const REVOCATION_LIST: &str = "MESH REVOCATION LIST";
pub const CA_PRIVATE_KEY: &str = "MESH CA PRIVATE KEY";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ArmorError {
    #[error("no `-----BEGIN {0}-----` line")]
    NoBegin(&'static str),
    #[error("no `-----END {0}-----` line")]
    NoEnd(&'static str),
    #[error("the base64 between the armor lines is invalid: {0}")]
    Base64(String),
}

pub fn encode(label: &str, bytes: &[u8]) -> String {
    let b64 = STANDARD.encode(bytes);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(chunk).expect("base64 is ASCII"));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// The bytes of the first `label` block in `text`.
pub fn decode(label: &'static str, text: &str) -> Result<Vec<u8>, ArmorError> {
    let begin = format!("-----BEGIN {label}-----");
    let end = format!("-----END {label}-----");
    let start = text.find(&begin).ok_or(ArmorError::NoBegin(label))? + begin.len();
    let stop = text[start..].find(&end).ok_or(ArmorError::NoEnd(label))? + start;
    let body: String = text[start..stop]
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect();
    STANDARD
        .decode(body)
        .map_err(|e| ArmorError::Base64(e.to_string()))
}

/// The bytes of every `label` block in `text`, in order (none: an empty list).
pub fn decode_all(label: &'static str, text: &str) -> Result<Vec<Vec<u8>>, ArmorError> {
    let begin = format!("-----BEGIN {label}-----");
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(at) = rest.find(&begin) {
        let block = &rest[at..];
        out.push(decode(label, block)?);
        let end = format!("-----END {label}-----");
        rest = &block[block.find(&end).ok_or(ArmorError::NoEnd(label))? + end.len()..];
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_names_what_is_missing() {
        let data: Vec<u8> = (0..=255).collect();
        let text = encode(CERTIFICATE, &data);
        assert!(text
            .lines()
            .all(|l| l.len() <= 64 || l.starts_with("-----")));
        assert_eq!(decode(CERTIFICATE, &text).unwrap(), data);
        assert_eq!(
            decode(REVOCATION_LIST, &text),
            Err(ArmorError::NoBegin(REVOCATION_LIST))
        );
        let cut = &text[..text.len() - 10];
        assert_eq!(
            decode(CERTIFICATE, cut),
            Err(ArmorError::NoEnd(CERTIFICATE))
        );
        let two = format!("{text}{}", encode(CERTIFICATE, b"second"));
        assert_eq!(
            decode_all(CERTIFICATE, &two).unwrap(),
            vec![data.clone(), b"second".to_vec()]
        );
        assert_eq!(decode_all(CERTIFICATE, "").unwrap(), Vec::<Vec<u8>>::new());
        assert_eq!(
            decode_all(CERTIFICATE, cut),
            Err(ArmorError::NoEnd(CERTIFICATE))
        );
    }
}
