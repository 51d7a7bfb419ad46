//! gRPC over Unix sockets: how `kybernatectl`, the shim and the installer reach the
//! Kybernate agent and containerd.
//!
//! Every connection checks who serves the socket before a request is sent. A checkpoint
//! request names workloads and a restore hands back their memory, so a socket path that
//! another user managed to bind (a stale path in a directory they can write, a container
//! that mounted its own socket over ours) must not receive them. The kernel tells the
//! server's uid (SO_PEERCRED); only root or the caller's own user is trusted. The agent
//! checks its callers the same way on its side.

use std::io;
use std::path::{Path, PathBuf};

use hyper_util::rt::TokioIo;
use kybernate_proto::agent::v1::agent_client::AgentClient;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};

/// Where the agent listens unless configured otherwise (`[agent] socket`).
pub const DEFAULT_AGENT_SOCKET: &str = "/run/kybernate/agent.sock";

/// The agent could not be reached.
#[derive(Debug, thiserror::Error)]
#[error("cannot reach the Kybernate agent at {}: {message}", socket.display())]
pub struct ConnectError {
    /// The socket tried.
    pub socket: PathBuf,
    /// Why it failed, with its causes.
    pub message: String,
}

/// Opens a client of the agent listening on `socket`.
pub async fn connect_agent(socket: &Path) -> Result<AgentClient<Channel>, ConnectError> {
    let fail = |message: String| ConnectError {
        socket: socket.to_owned(),
        message,
    };
    if !socket.exists() {
        return Err(fail("no such socket (is kybernate-agent running?)".into()));
    }
    let channel = unix_channel(socket)
        .await
        .map_err(|e| fail(error_chain(&e)))?;
    Ok(AgentClient::new(channel))
}

/// A gRPC channel whose every connection goes to the Unix socket `socket`, served by root or
/// by the caller's own user (see the crate docs).
pub async fn unix_channel(socket: &Path) -> Result<Channel, tonic::transport::Error> {
    let path = socket.to_owned();
    // The URI is required by the API but unused: every connection goes to the socket.
    Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move {
                let stream = UnixStream::connect(&path).await?;
                check_server(&stream, &path)?;
                Ok::<_, io::Error>(TokioIo::new(stream))
            }
        }))
        .await
}

/// Refuses a connection whose server runs as neither root nor the caller's own user.
fn check_server(stream: &UnixStream, socket: &Path) -> io::Result<()> {
    let server = stream.peer_cred()?;
    // SAFETY: geteuid has no preconditions and cannot fail.
    let own = unsafe { libc::geteuid() };
    if server_is_trusted(server.uid(), own) {
        return Ok(());
    }
    let pid = server
        .pid()
        .map(|p| format!(" (pid {p})"))
        .unwrap_or_default();
    Err(io::Error::new(
        io::ErrorKind::PermissionDenied,
        format!(
            "the process serving {} runs as uid {}{pid}; only root or uid {own} is trusted \
             with checkpoint requests",
            socket.display(),
            server.uid()
        ),
    ))
}

/// Whether a server running as `server_uid` may be sent requests by a caller running as
/// `own_uid`.
pub fn server_is_trusted(server_uid: u32, own_uid: u32) -> bool {
    server_uid == 0 || server_uid == own_uid
}

/// An error and its causes, joined with `: `, for messages: tonic's transport errors say
/// only "transport error" at the top and keep the reason in their sources.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_and_the_callers_own_user_are_trusted_and_nobody_else() {
        assert!(server_is_trusted(0, 0));
        assert!(server_is_trusted(0, 1000));
        assert!(server_is_trusted(1000, 1000));
        assert!(!server_is_trusted(1000, 0));
        assert!(!server_is_trusted(1001, 1000));
    }

    #[test]
    fn the_chain_names_every_cause() {
        #[derive(Debug, thiserror::Error)]
        #[error("transport error")]
        struct Outer(#[source] io::Error);
        let e = Outer(io::Error::new(io::ErrorKind::NotFound, "no such socket"));
        assert_eq!(error_chain(&e), "transport error: no such socket");
    }
}
