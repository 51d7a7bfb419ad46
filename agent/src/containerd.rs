//! Checkpoints of containers through containerd's task API. The agent never dumps a
//! container itself: it asks containerd, containerd asks the container's shim, and the
//! kybernate shim calls back into this agent (ContainerCheckpointBegin/End) around its
//! `runc checkpoint`. So a container checkpoint from `kybernatectl` or the node worker takes
//! exactly the path a checkpoint from `ctr` or the CRI takes.

use std::path::{Path, PathBuf};
use std::time::Duration;

use containerd_client::services::v1::tasks_client::TasksClient;
use containerd_client::services::v1::CheckpointTaskRequest;
use tonic::metadata::MetadataValue;

use kybernate_client::{error_chain, unix_channel};

/// Default containerd socket.
pub const DEFAULT_CONTAINERD_SOCKET: &str = "/run/containerd/containerd.sock";
/// Namespace used when a request names none (containerd's own default).
pub const DEFAULT_NAMESPACE: &str = "default";
/// Namespace of the containers the CRI (kubelet) creates.
pub const KUBERNETES_NAMESPACE: &str = "k8s.io";

/// containerd refused or failed a container checkpoint.
#[derive(Debug, thiserror::Error)]
#[error("containerd ({}) checkpoint of container {container} in namespace {namespace}: {message}", socket.display())]
pub struct ContainerdError {
    /// containerd's socket.
    pub socket: PathBuf,
    /// The container.
    pub container: String,
    /// Its containerd namespace.
    pub namespace: String,
    /// containerd's status code (`Unavailable` when it could not be reached).
    pub code: tonic::Code,
    /// What containerd (or the shim behind it) said.
    pub message: String,
}

/// runc's checkpoint options as containerd's task API carries them (type
/// `containerd.runc.v1.CheckpointOptions`); only the fields the agent sets.
#[derive(Clone, PartialEq, prost::Message)]
struct RuncCheckpointOptions {
    /// Stop the container after the dump instead of leaving it running.
    #[prost(bool, tag = "1")]
    exit: bool,
    /// Where the shim is to write the images. containerd hands it to the shim as the
    /// checkpoint path and, given one, writes no checkpoint image of its own into its content
    /// store (a second copy of every byte that the agent does not use).
    #[prost(string, tag = "8")]
    image_path: String,
}

const RUNC_CHECKPOINT_OPTIONS: &str = "containerd.runc.v1.CheckpointOptions";

/// Asks containerd at `socket` to checkpoint task `container` in `namespace` into
/// `image_dir` (the RAM tier's directory for the checkpoint, where the kybernate shim dumps
/// anyway); the task keeps running when `leave_running`. Returns once the shim finished (its agent calls
/// included), or with containerd's error, after at most `timeout`.
pub async fn checkpoint_task(
    socket: &Path,
    namespace: &str,
    container: &str,
    image_dir: &Path,
    leave_running: bool,
    timeout: Duration,
) -> Result<(), ContainerdError> {
    let fail = |code, message| ContainerdError {
        socket: socket.to_owned(),
        container: container.to_owned(),
        namespace: namespace.to_owned(),
        code,
        message,
    };
    if !socket.exists() {
        return Err(fail(
            tonic::Code::Unavailable,
            "no such socket (is containerd running? set containerd_socket in the agent config)"
                .into(),
        ));
    }
    let channel = unix_channel(socket)
        .await
        .map_err(|e| fail(tonic::Code::Unavailable, error_chain(&e)))?;
    let namespace_value = MetadataValue::try_from(namespace).map_err(|_| {
        fail(
            tonic::Code::InvalidArgument,
            "the namespace is not a valid header value".into(),
        )
    })?;
    let options = RuncCheckpointOptions {
        exit: !leave_running,
        image_path: image_dir.display().to_string(),
    };
    let mut request = tonic::Request::new(CheckpointTaskRequest {
        container_id: container.to_owned(),
        parent_checkpoint: String::new(),
        options: Some(prost_types::Any {
            type_url: RUNC_CHECKPOINT_OPTIONS.to_owned(),
            value: prost::Message::encode_to_vec(&options),
        }),
    });
    request
        .metadata_mut()
        .insert("containerd-namespace", namespace_value);
    request.set_timeout(timeout);
    TasksClient::new(channel)
        .checkpoint(request)
        .await
        .map(|_| ())
        .map_err(|status| fail(status.code(), status.message().to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_encode_exit_as_field_one_and_the_image_path_as_field_eight() {
        let options = |exit, image_path: &str| RuncCheckpointOptions {
            exit,
            image_path: image_path.into(),
        };
        let bytes = prost::Message::encode_to_vec(&options(true, ""));
        assert_eq!(bytes, vec![0x08, 0x01]);
        let bytes = prost::Message::encode_to_vec(&options(false, ""));
        assert!(bytes.is_empty());
        let bytes = prost::Message::encode_to_vec(&options(false, "/i"));
        assert_eq!(bytes, vec![0x42, 0x02, b'/', b'i']);
    }

    #[tokio::test]
    async fn a_missing_socket_names_itself() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("containerd.sock");
        let err = checkpoint_task(
            &socket,
            "ns",
            "c1",
            Path::new("/i"),
            true,
            Duration::from_secs(1),
        )
        .await
        .unwrap_err();
        assert_eq!(err.code, tonic::Code::Unavailable);
        let text = err.to_string();
        assert!(
            text.contains("containerd.sock") && text.contains("c1") && text.contains("ns"),
            "{text}"
        );
    }
}
