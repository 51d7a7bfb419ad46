//! A socket served by another user is refused before any request reaches it. Needs root (to
//! run the impostor under another uid), as CI is.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A Unix socket listener run as `uid` by python3 under setpriv.
struct Impostor(Child);

impl Impostor {
    fn listen(socket: &Path, uid: u32) -> Self {
        let script = "import socket,sys,time\n\
                      s=socket.socket(socket.AF_UNIX)\n\
                      s.bind(sys.argv[1]); s.listen(8)\n\
                      while True: c,_=s.accept(); time.sleep(60)\n";
        let child = Command::new("setpriv")
            .args([
                &format!("--reuid={uid}"),
                &format!("--regid={uid}"),
                "--clear-groups",
                // Debian's own interpreter: one under root's home is not reachable as uid 4242.
                "/usr/bin/python3",
                "-c",
                script,
            ])
            .arg(socket)
            .stdin(Stdio::null())
            .spawn()
            .expect("setpriv and python3 run the impostor");
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut impostor = Self(child);
        while !socket.exists() {
            let exited = impostor.0.try_wait().unwrap();
            assert!(exited.is_none(), "the impostor exited: {exited:?}");
            assert!(
                Instant::now() < deadline,
                "the impostor never bound {socket:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        impostor
    }
}

impl Drop for Impostor {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn a_socket_served_by_another_user_is_refused_naming_its_uid() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "this test runs as root (it starts a server under uid 4242)"
    );
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let socket = dir.path().join("agent.sock");
    let _impostor = Impostor::listen(&socket, 4242);

    let err = kybernate_client::connect_agent(&socket).await.unwrap_err();
    assert!(err.message.contains("runs as uid 4242"), "{err}");
    assert!(err.message.contains("only root"), "{err}");
    assert!(
        err.to_string().contains(&socket.display().to_string()),
        "{err}"
    );
}
