//! `allowed_uids`: exactly the listed non-root uids can use the agent's socket (real agent,
//! root; the callers run as other uids through setpriv).

mod support;

use std::process::{Command, Output};

use support::{TestAgent, CTL};

/// kybernatectl `args` against `agent`, run as `uid` with no supplementary groups.
fn ctl_as(agent: &TestAgent, uid: u32, args: &[&str]) -> Output {
    let id = uid.to_string();
    Command::new("setpriv")
        .args([
            "--reuid",
            &id,
            "--regid",
            &id,
            "--clear-groups",
            CTL,
            "--socket",
        ])
        .arg(&agent.socket)
        .args(args)
        .output()
        .expect("run kybernatectl through setpriv")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn allowed_uids_can_connect_and_no_one_else() {
    let agent = TestAgent::start_with_config("allowed_uids = [4242]\n");
    let allowed = ctl_as(&agent, 4242, &["list"]);
    assert!(allowed.status.success(), "uid 4242: {}", text(&allowed));

    let other = ctl_as(&agent, 4243, &["list"]);
    assert!(!other.status.success(), "uid 4243 must be refused");
    let message = text(&other);
    assert!(
        message.contains("ermission denied") && message.contains("agent.sock"),
        "a clear error naming the socket: {message}"
    );
}

#[test]
fn without_allowed_uids_only_root_can_connect() {
    let agent = TestAgent::start();
    let out = ctl_as(&agent, 4242, &["list"]);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(agent.ctl(&["list"]).status.success());
}
