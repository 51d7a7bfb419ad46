//! Asks a running containerd over its socket, through the CRI `Status` call with verbose
//! info, whether it answers and which runtime handlers its CRI plugin has loaded. This is
//! what kubelet sees, so it proves the restart picked the config up.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use tonic::codegen::http::uri::PathAndQuery;

use crate::restart::{ContainerdProbe, ProbeOutcome};
use crate::runtime_spec::RUNTIME_NAME;

/// `runtime.v1.StatusRequest`, only the field the probe sets.
#[derive(Clone, PartialEq, prost::Message)]
struct StatusRequest {
    #[prost(bool, tag = "1")]
    verbose: bool,
}

/// `runtime.v1.StatusResponse`, only the verbose info map (field 1 is skipped).
#[derive(Clone, PartialEq, prost::Message)]
struct StatusResponse {
    #[prost(map = "string, string", tag = "2")]
    info: HashMap<String, String>,
}

/// The real probe: CRI `Status` over containerd's Unix socket.
#[derive(Debug, Clone)]
pub struct CriStatusProbe {
    socket: PathBuf,
    timeout: Duration,
}

impl CriStatusProbe {
    /// A probe of the containerd listening on `socket`.
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        Self {
            socket: socket.into(),
            timeout: Duration::from_secs(5),
        }
    }

    /// The verbose status info, keyed as containerd returns it (`config` holds the CRI
    /// config as JSON).
    pub fn status_info(&self) -> Result<HashMap<String, String>, String> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("tokio runtime: {e}"))?;
        let socket = self.socket.clone();
        let timeout = self.timeout;
        runtime.block_on(async move {
            let call = async {
                let channel = kybernate_client::unix_channel(&socket)
                    .await
                    .map_err(|e| format!("connect: {}", kybernate_client::error_chain(&e)))?;
                let mut grpc = tonic::client::Grpc::new(channel);
                grpc.ready().await.map_err(|e| format!("not ready: {e}"))?;
                let codec = tonic_prost::ProstCodec::<StatusRequest, StatusResponse>::default();
                let path = PathAndQuery::from_static("/runtime.v1.RuntimeService/Status");
                let response = grpc
                    .unary(
                        tonic::Request::new(StatusRequest { verbose: true }),
                        path,
                        codec,
                    )
                    .await
                    .map_err(|s| format!("CRI Status: {}", s.message()))?;
                Ok(response.into_inner().info)
            };
            tokio::time::timeout(timeout, call)
                .await
                .map_err(|_| "timed out".to_string())?
        })
    }
}

/// Whether any `runtimes` object in the status info's JSON documents has `name`.
pub fn lists_runtime(info: &HashMap<String, String>, name: &str) -> bool {
    fn search(v: &serde_json::Value, name: &str) -> bool {
        match v {
            serde_json::Value::Object(map) => map.iter().any(|(k, child)| {
                (k.eq_ignore_ascii_case("runtimes") && child.get(name).is_some())
                    || search(child, name)
            }),
            serde_json::Value::Array(items) => items.iter().any(|c| search(c, name)),
            _ => false,
        }
    }
    info.values()
        .filter_map(|text| serde_json::from_str::<serde_json::Value>(text).ok())
        .any(|v| search(&v, name))
}

impl ContainerdProbe for CriStatusProbe {
    fn probe(&self) -> ProbeOutcome {
        match self.status_info() {
            Ok(info) => ProbeOutcome::Answering {
                runtime_listed: lists_runtime(&info, RUNTIME_NAME),
            },
            Err(why) => ProbeOutcome::Unreachable(why),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_runtime_in_the_cri_config_json() {
        let mut info = HashMap::new();
        info.insert("golang".to_string(), "\"go1.21\"".to_string());
        info.insert(
            "config".to_string(),
            r#"{"containerd":{"defaultRuntimeName":"runc","runtimes":{"runc":{},"kybernate":{"runtimeType":"io.containerd.kybernate.v1"}}}}"#.to_string(),
        );
        assert!(lists_runtime(&info, "kybernate"));
        assert!(!lists_runtime(&info, "gvisor"));
        info.insert("config".to_string(), "not json".to_string());
        assert!(!lists_runtime(&info, "kybernate"));
    }
}
