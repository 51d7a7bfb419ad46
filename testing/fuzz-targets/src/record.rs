//! Target `record`: the agent's checkpoint-record reader, for record files and for records
//! adopted from a shared tier (written by other nodes).

use kybernate_agent::catalog;
use kybernate_agent::shared_records::decode_shared;
use kybernate_dataplane::CheckpointName;

use crate::Verdict;

/// An accepted record must name a valid checkpoint and survive a write/read round trip, and
/// the shared-tier reader must accept no record the plain reader refuses.
pub fn record(data: &[u8]) -> Verdict {
    let decoded = catalog::decode(data);
    let fallback = CheckpointName::new("cp").expect("a valid name");
    let name = decoded.as_ref().map_or(&fallback, |(name, _)| name);
    let shared = decode_shared(name, data);
    let (name, record) = match decoded {
        Ok(decoded) => decoded,
        Err(e) => {
            assert!(shared.is_err(), "a shared record passed that a file fails");
            return Verdict::Rejected(e);
        }
    };
    assert_eq!(name.as_str(), record.name);
    let written = serde_json::to_vec(&record).expect("a record serialises");
    let (again_name, again) = catalog::decode(&written).expect("a written record reads back");
    assert_eq!(
        (&again_name, &again),
        (&name, &record),
        "record changed in a round trip"
    );
    if let Ok(adopted) = shared {
        assert_eq!(adopted, record, "the shared reader read another record");
    }
    Verdict::Accepted
}
