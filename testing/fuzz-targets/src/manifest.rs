//! Target `manifest`: the checkpoint manifest reader of the data plane.

use kybernate_dataplane::{CheckpointManifest, MANIFEST_MAGIC, MANIFEST_VERSION};

use crate::Verdict;

/// Input that starts with the manifest magic is read as it is, so the header checks are
/// fuzzed. Any other input is taken as a manifest body and framed with a valid header and
/// checksum first: random bytes almost never carry a matching BLAKE3 sum, and without the
/// framing the fuzzer would never get past it to the body parser.
///
/// An accepted manifest must write out and read back as the same manifest.
pub fn manifest(data: &[u8]) -> Verdict {
    let framed;
    let bytes = if data.starts_with(&MANIFEST_MAGIC) {
        data
    } else {
        framed = frame(data);
        &framed
    };
    let parsed = match CheckpointManifest::read_from(bytes) {
        Ok(parsed) => parsed,
        Err(e) => return Verdict::Rejected(e.to_string()),
    };
    let mut written = Vec::new();
    parsed
        .write_to(&mut written)
        .expect("an accepted manifest can be written");
    let again = CheckpointManifest::read_from(written.as_slice())
        .expect("a written manifest can be read back");
    assert_eq!(again, parsed, "manifest changed in a write/read round trip");
    let _ = parsed.raw_bytes();
    Verdict::Accepted
}

/// `body` with the header and checksum a manifest file has.
pub fn frame(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 52);
    out.extend_from_slice(&MANIFEST_MAGIC);
    out.extend_from_slice(&MANIFEST_VERSION.to_le_bytes());
    let len = u64::try_from(body.len()).expect("a slice length fits u64");
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(body);
    out.extend_from_slice(blake3::hash(body).as_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bare_body_is_framed_and_a_whole_manifest_read_as_it_is() {
        assert!(matches!(manifest(b""), Verdict::Rejected(e) if e.contains("body ends early")));
        let mut whole = frame(b"");
        whole[8] = 9;
        let verdict = manifest(&whole);
        assert!(
            matches!(&verdict, Verdict::Rejected(e) if e.contains("version 9")),
            "{verdict:?}"
        );
    }
}
