//! Restart logic against a fake init system: which command each flavour issues, and that
//! the installer waits for containerd to come back (and list the runtime) before it
//! reports success.

mod common;

use std::cell::RefCell;
use std::collections::VecDeque;
use std::path::Path;
use std::time::Duration;

use common::Host;
use kybernate_installer::files::HostRoot;
use kybernate_installer::flavour::Flavour;
use kybernate_installer::restart::{
    restart_and_wait, restart_for, ContainerdProbe, HostCommand, ProbeOutcome, WaitPolicy,
};
use kybernate_installer::InstallerError;

/// One log of everything the fakes saw, in order.
#[derive(Default)]
struct Events(RefCell<Vec<String>>);

/// The fake init system: records commands, optionally fails them.
struct FakeInit<'a> {
    events: &'a Events,
    fail: bool,
}

impl HostCommand for FakeInit<'_> {
    fn run(&self, argv: &[&str]) -> kybernate_installer::Result<()> {
        self.events
            .0
            .borrow_mut()
            .push(format!("run {}", argv.join(" ")));
        if self.fail {
            return Err(InstallerError::Restart {
                command: argv.join(" "),
                detail: "exit status: 5: Unit not found".into(),
            });
        }
        Ok(())
    }
}

/// A containerd that answers as scripted, then keeps giving the last answer.
struct ScriptedContainerd<'a> {
    events: &'a Events,
    script: RefCell<VecDeque<ProbeOutcome>>,
}

impl ContainerdProbe for ScriptedContainerd<'_> {
    fn probe(&self) -> ProbeOutcome {
        let mut script = self.script.borrow_mut();
        let outcome = if script.len() > 1 {
            script.pop_front().unwrap()
        } else {
            script[0].clone()
        };
        self.events
            .0
            .borrow_mut()
            .push(format!("probe {outcome:?}"));
        outcome
    }
}

const POLICY: WaitPolicy = WaitPolicy {
    attempts: 5,
    interval: Duration::ZERO,
};

/// What one restart did: its result and everything the fakes saw, in order.
struct Outcome {
    result: kybernate_installer::Result<u32>,
    log: Vec<String>,
}

/// Restarts `flavour`'s containerd through the fake init system (whose command fails when
/// `fail`) and waits on a containerd answering `script` at `socket`.
fn restart_with(
    flavour: Flavour,
    host: &HostRoot,
    script: &[ProbeOutcome],
    socket: &str,
    expect_listed: bool,
    fail: bool,
) -> Outcome {
    let events = Events::default();
    let probe = ScriptedContainerd {
        events: &events,
        script: RefCell::new(script.iter().cloned().collect()),
    };
    let restart = restart_for(flavour, host);
    let result = restart_and_wait(
        restart.as_ref(),
        &FakeInit {
            events: &events,
            fail,
        },
        &probe,
        Path::new(socket),
        expect_listed,
        POLICY,
    );
    Outcome {
        result,
        log: events.0.into_inner(),
    }
}

const LISTED: ProbeOutcome = ProbeOutcome::Answering {
    runtime_listed: true,
};
const NOT_LISTED: ProbeOutcome = ProbeOutcome::Answering {
    runtime_listed: false,
};

fn command_for(flavour: Flavour, host: &HostRoot) -> Vec<String> {
    let outcome = restart_with(flavour, host, &[LISTED], "/s", true, false);
    outcome.result.unwrap();
    outcome
        .log
        .into_iter()
        .filter(|e| e.starts_with("run "))
        .collect()
}

#[test]
fn each_flavour_issues_its_own_restart_command() {
    let host = Host::new();
    let root = HostRoot::new(host.root());
    assert_eq!(
        command_for(Flavour::Vanilla, &root),
        ["run systemctl restart containerd"]
    );
    assert_eq!(
        command_for(Flavour::MicroK8s, &root),
        ["run snap restart microk8s.daemon-containerd"]
    );
    assert_eq!(
        command_for(Flavour::K3s, &root),
        ["run systemctl restart k3s"]
    );
    assert_eq!(
        command_for(Flavour::Rke2, &root),
        ["run systemctl restart rke2-server"]
    );
}

#[test]
fn agent_nodes_restart_the_agent_unit() {
    let host = Host::new();
    host.put("/etc/systemd/system/k3s-agent.service", "[Service]\n");
    host.put(
        "/usr/local/lib/systemd/system/rke2-agent.service",
        "[Service]\n",
    );
    let root = HostRoot::new(host.root());
    assert_eq!(
        command_for(Flavour::K3s, &root),
        ["run systemctl restart k3s-agent"]
    );
    assert_eq!(
        command_for(Flavour::Rke2, &root),
        ["run systemctl restart rke2-agent"]
    );
}

#[test]
fn waits_until_containerd_answers_and_lists_the_runtime() {
    let script = [
        ProbeOutcome::Unreachable("connect: no such file".into()),
        ProbeOutcome::Unreachable("connect: connection refused".into()),
        NOT_LISTED,
        LISTED,
    ];
    let root = HostRoot::new("/");
    let outcome = restart_with(Flavour::Vanilla, &root, &script, "/s", true, false);
    assert_eq!(outcome.result.unwrap(), 4);
    let log = outcome.log;
    assert_eq!(
        log[0], "run systemctl restart containerd",
        "restart comes before the first probe"
    );
    assert_eq!(log.len(), 5);
    assert_eq!(log[4], "probe Answering { runtime_listed: true }");
}

#[test]
fn reports_when_containerd_never_lists_the_runtime() {
    let root = HostRoot::new("/");
    let outcome = restart_with(
        Flavour::MicroK8s,
        &root,
        &[NOT_LISTED],
        "/run/c.sock",
        true,
        false,
    );
    assert_eq!(
        outcome.result.unwrap_err().to_string(),
        "containerd at /run/c.sock answers but does not list runtime kybernate after 5 checks"
    );
    assert_eq!(
        outcome
            .log
            .iter()
            .filter(|e| e.starts_with("probe"))
            .count(),
        5
    );
}

#[test]
fn reports_when_containerd_does_not_come_back() {
    let script = [ProbeOutcome::Unreachable(
        "connect: connection refused".into(),
    )];
    let root = HostRoot::new("/");
    let outcome = restart_with(Flavour::K3s, &root, &script, "/run/k.sock", true, false);
    let err = outcome.result.unwrap_err();
    assert!(
        err.to_string()
            .contains("did not answer (connect: connection refused)"),
        "{err}"
    );
}

#[test]
fn after_uninstall_it_waits_until_the_runtime_is_gone() {
    let root = HostRoot::new("/");
    let outcome = restart_with(
        Flavour::Vanilla,
        &root,
        &[LISTED, NOT_LISTED],
        "/s",
        false,
        false,
    );
    assert_eq!(outcome.result.unwrap(), 2);
}

#[test]
fn a_failing_restart_command_is_reported_without_probing() {
    let root = HostRoot::new("/");
    let outcome = restart_with(Flavour::Vanilla, &root, &[LISTED], "/s", true, true);
    assert_eq!(outcome.result.unwrap_err().to_string(), "restarting containerd with `systemctl restart containerd` failed: exit status: 5: Unit not found");
    assert_eq!(outcome.log.len(), 1, "no probe after a failed restart");
}
