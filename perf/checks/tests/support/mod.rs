//! Shared set-up of the perf checks: the repository, this build's agent binaries, and the
//! tools (python3, prometheus, chromium) that must be present; anything missing fails loudly.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The repository root (this crate is `perf/checks`).
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("repository root")
}

/// `kybernate-agent` and `kybernatectl` of this build: the test binary runs from
/// `<target>/<profile>/deps`, and the workspace build puts the agent's binaries in
/// `<target>/<profile>`.
pub fn agent_binaries() -> (PathBuf, PathBuf) {
    let exe = std::env::current_exe().expect("test executable path");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test executable lives in <target>/<profile>/deps");
    let agent = profile_dir.join("kybernate-agent");
    let ctl = profile_dir.join("kybernatectl");
    for bin in [&agent, &ctl] {
        assert!(
            bin.exists(),
            "{} is missing: build the agent first (cargo build -p kybernate-agent --bins, or run the \
             whole workspace's tests)",
            bin.display()
        );
    }
    (agent, ctl)
}

/// Fails unless running as root with CRIU 4.x and every tool in `tools` on PATH.
pub fn require(tools: &[&str]) {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "the perf checks checkpoint real processes with CRIU and must run as root"
    );
    let criu = Command::new("criu")
        .arg("--version")
        .output()
        .unwrap_or_else(|e| panic!("criu is not on PATH ({e}); run scripts/install-deps.sh"));
    assert!(
        String::from_utf8_lossy(&criu.stdout).contains("Version: 4."),
        "criu on PATH is not CRIU 4.x; run scripts/install-deps.sh"
    );
    for tool in ["python3"].iter().chain(tools) {
        let found = std::env::var_os("PATH")
            .map(|path| std::env::split_paths(&path).any(|dir| dir.join(tool).is_file()))
            .unwrap_or(false);
        assert!(
            found,
            "{tool} is not on PATH: run scripts/install-perf-tools.sh (prometheus, chromium) as root"
        );
    }
}

/// Runs `python3 ARGS` in the repository with this build's agent binaries.
pub fn python(args: &[&str]) -> Output {
    let (agent, ctl) = agent_binaries();
    Command::new("python3")
        .args(args)
        .current_dir(repo())
        .env("KYBERNATE_AGENT_BIN", agent)
        .env("KYBERNATECTL_BIN", ctl)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .output()
        .unwrap_or_else(|e| panic!("cannot run python3 {args:?}: {e}"))
}

/// Stdout and stderr of a finished tool, for failure messages.
pub fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Expects `out` to be a success; prints its output either way.
pub fn assert_success(what: &str, out: &Output) -> String {
    let text = text(out);
    println!("{what}:\n{text}");
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{text}",
        out.status
    );
    text
}
