//! How `kybernatectl` shows the agent's answers and errors, as text or JSON.

use std::collections::BTreeMap;

use kybernate_proto::agent::v1 as pb;
use serde_json::json;

/// The agent's reply to `call`, or its error as [`status_error`] words it.
pub async fn answer<T>(
    call: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> anyhow::Result<T> {
    call.await
        .map(tonic::Response::into_inner)
        .map_err(status_error)
}

/// The agent's message, without gRPC framing; or, when the connection broke before the
/// agent answered, what that means and what to run next.
pub fn status_error(status: tonic::Status) -> anyhow::Error {
    if connection_lost(&status) {
        return anyhow::anyhow!(
            "the agent closed the connection before answering ({}): it stopped or crashed \
             mid-request. The operation may have completed, or the agent recovers it when it \
             starts again: run `kybernatectl list` (or `kybernatectl inspect NAME`) once the \
             agent is back to see the checkpoint's state",
            status.message()
        );
    }
    anyhow::anyhow!("{}", status.message())
}

/// Whether `status` was made by the client because the connection failed, not sent by the
/// agent (the agent's own statuses carry no transport error as their source).
pub fn connection_lost(status: &tonic::Status) -> bool {
    use std::error::Error;
    let transport_code = matches!(
        status.code(),
        tonic::Code::Unavailable
            | tonic::Code::Unknown
            | tonic::Code::Internal
            | tonic::Code::Cancelled
    );
    let message = status.message();
    let transport_text = [
        "transport error",
        "h2 protocol error",
        "connection closed",
        "error reading a body",
        "broken pipe",
    ]
    .iter()
    .any(|t| message.contains(t));
    transport_code && (status.source().is_some() || transport_text)
}

/// Phase durations as a JSON object of milliseconds.
pub fn phases_json(phases: &[pb::PhaseDuration]) -> serde_json::Value {
    let map: BTreeMap<&str, u64> = phases
        .iter()
        .map(|p| (p.phase.as_str(), p.millis))
        .collect();
    json!(map)
}

pub fn phases_text(phases: &[pb::PhaseDuration]) -> String {
    phases
        .iter()
        .map(|p| format!("{} {} ms", p.phase, p.millis))
        .collect::<Vec<_>>()
        .join(", ")
}

pub fn print_checkpoint(reply: &pb::CheckpointReply, json: bool) {
    if json {
        println!(
            "{}",
            json!({"name": reply.checkpoint_ref, "phases": phases_json(&reply.phases),
                   "raw_bytes": reply.raw_bytes, "stored_bytes": reply.stored_bytes,
                   "tiers": reply.tiers})
        );
    } else {
        println!("checkpoint {}", reply.checkpoint_ref);
        println!("  phases: {}", phases_text(&reply.phases));
        println!(
            "  size: {} raw, {} stored, tiers: {}",
            human_bytes(reply.raw_bytes),
            human_bytes(reply.stored_bytes),
            reply.tiers.join(", ")
        );
    }
}

pub fn print_restore(reply: &pb::RestoreReply, json: bool) {
    if json {
        println!(
            "{}",
            json!({"pid": reply.pid, "name": reply.checkpoint_ref,
                   "source_tier": reply.source_tier, "phases": phases_json(&reply.phases)})
        );
    } else {
        println!(
            "restored {} as PID {} from the {} tier",
            reply.checkpoint_ref, reply.pid, reply.source_tier
        );
        println!("  phases: {}", phases_text(&reply.phases));
    }
}

pub fn info_json(info: &pb::CheckpointInfo) -> serde_json::Value {
    json!({"name": info.checkpoint_ref, "pid": info.pid, "created_unix": info.created_unix,
           "leave_running": info.leave_running, "phases": phases_json(&info.phases),
           "raw_bytes": info.raw_bytes, "stored_bytes": info.stored_bytes,
           "tiers": info.tiers, "state": info.state, "note": info.note})
}

pub fn print_list(infos: &[pb::CheckpointInfo], json: bool) {
    if json {
        let all: Vec<_> = infos.iter().map(info_json).collect();
        println!("{}", serde_json::Value::Array(all));
        return;
    }
    println!(
        "{:<32} {:>8} {:>10} {:>10} {:<12} STATE",
        "NAME", "PID", "RAW", "STORED", "TIERS"
    );
    for info in infos {
        println!(
            "{:<32} {:>8} {:>10} {:>10} {:<12} {}",
            info.checkpoint_ref,
            info.pid,
            human_bytes(info.raw_bytes),
            human_bytes(info.stored_bytes),
            info.tiers.join(","),
            info.state
        );
        if !info.note.is_empty() {
            println!("  note: {}", info.note);
        }
    }
}

pub fn print_info(info: &pb::CheckpointInfo) {
    println!("name:          {}", info.checkpoint_ref);
    println!("pid:           {}", info.pid);
    println!("created:       {} (unix)", info.created_unix);
    println!("leave running: {}", info.leave_running);
    println!("raw size:      {}", human_bytes(info.raw_bytes));
    println!("stored:        {}", human_bytes(info.stored_bytes));
    println!("tiers:         {}", info.tiers.join(", "));
    println!("workload:      {}", info.state);
    if !info.note.is_empty() {
        println!("note:          {}", info.note);
    }
    println!("phases:        {}", phases_text(&info.phases));
}

/// Bytes in binary units, for people.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}
