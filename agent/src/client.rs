//! Connecting to the agent's Unix socket, for `kybernatectl` and tests.

use std::path::{Path, PathBuf};

use hyper_util::rt::TokioIo;
use kybernate_proto::agent::v1::agent_client::AgentClient;
use tonic::transport::{Channel, Endpoint, Uri};

/// The agent could not be reached.
#[derive(Debug, thiserror::Error)]
#[error("cannot reach the Kybernate agent at {}: {message}", socket.display())]
pub struct ConnectError {
    /// The socket tried.
    pub socket: PathBuf,
    /// Why it failed.
    pub message: String,
}

/// Opens a client on `socket`.
pub async fn connect(socket: &Path) -> Result<AgentClient<Channel>, ConnectError> {
    let fail = |message: String| ConnectError {
        socket: socket.to_owned(),
        message,
    };
    if !socket.exists() {
        return Err(fail("no such socket (is kybernate-agent running?)".into()));
    }
    let channel = unix_channel(socket)
        .await
        .map_err(|e| fail(source_chain(&e)))?;
    Ok(AgentClient::new(channel))
}

/// A gRPC channel whose every connection goes to Unix socket `socket` (the agent's or
/// containerd's).
pub async fn unix_channel(socket: &Path) -> Result<Channel, tonic::transport::Error> {
    let path = socket.to_owned();
    // The URI is required by the API but unused: every connection goes to the socket.
    Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(path).await?))
            }
        }))
        .await
}

/// An error and its causes, joined, for messages.
pub fn source_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}
