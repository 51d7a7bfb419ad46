//! Golden tests on real configs: `containerd config default` of containerd 1.6 and 2.1, a
//! config with `imports`, a MicroK8s template, a k3s template with Go-template actions, and
//! k3s/RKE2 nodes without a template. Each goes through dry run, install, idempotence and
//! uninstall. Set KYBERNATE_UPDATE_GOLDEN=1 to rewrite tests/golden after reviewing a change.

mod common;

use std::fs;
use std::path::Path;

use common::{fixture, Host};
use kybernate_installer::flavour::Flavour;
use kybernate_installer::install::plan_install;
use kybernate_installer::shim::ShimStep;
use kybernate_installer::uninstall::plan_uninstall;

struct Case {
    name: &'static str,
    flavour: Flavour,
    /// (host path, fixture) pairs to lay out.
    files: &'static [(&'static str, &'static str)],
    /// The host path the install writes.
    edited: &'static str,
}

const CASES: &[Case] = &[
    Case {
        name: "containerd-1.6-default",
        flavour: Flavour::Vanilla,
        files: &[("/etc/containerd/config.toml", "containerd-1.6-default.toml")],
        edited: "/etc/containerd/config.toml",
    },
    Case {
        name: "containerd-2.1-default",
        flavour: Flavour::Vanilla,
        files: &[("/etc/containerd/config.toml", "containerd-2.1-default.toml")],
        edited: "/etc/containerd/config.toml",
    },
    Case {
        name: "containerd-2.1-imports",
        flavour: Flavour::Vanilla,
        files: &[("/etc/containerd/config.toml", "containerd-2.1-imports.toml")],
        edited: "/etc/containerd/conf.d/kybernate.toml",
    },
    Case {
        name: "microk8s-template",
        flavour: Flavour::MicroK8s,
        files: &[(
            "/var/snap/microk8s/current/args/containerd-template.toml",
            "microk8s-containerd-template.toml",
        )],
        edited: "/var/snap/microk8s/current/args/containerd-template.toml",
    },
    Case {
        name: "k3s-template",
        flavour: Flavour::K3s,
        files: &[
            (
                "/var/lib/rancher/k3s/agent/etc/containerd/config.toml",
                "k3s-generated-config.toml",
            ),
            (
                "/var/lib/rancher/k3s/agent/etc/containerd/config.toml.tmpl",
                "k3s-config.toml.tmpl",
            ),
        ],
        edited: "/var/lib/rancher/k3s/agent/etc/containerd/config.toml.tmpl",
    },
    Case {
        name: "k3s-no-template",
        flavour: Flavour::K3s,
        files: &[(
            "/var/lib/rancher/k3s/agent/etc/containerd/config.toml",
            "k3s-generated-config.toml",
        )],
        edited: "/var/lib/rancher/k3s/agent/etc/containerd/config.toml.tmpl",
    },
    Case {
        name: "rke2-no-template",
        flavour: Flavour::Rke2,
        files: &[(
            "/var/lib/rancher/rke2/agent/etc/containerd/config.toml",
            "k3s-generated-config.toml",
        )],
        edited: "/var/lib/rancher/rke2/agent/etc/containerd/config.toml.tmpl",
    },
];

fn golden(name: &str, actual: &str) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(name);
    if std::env::var_os("KYBERNATE_UPDATE_GOLDEN").is_some() {
        fs::write(&path, actual).unwrap();
        return;
    }
    let expected =
        fs::read_to_string(&path).unwrap_or_else(|e| panic!("golden file {}: {e}", path.display()));
    if expected != actual {
        let diff = similar::TextDiff::from_lines(expected.as_str(), actual);
        panic!(
            "{} differs from the golden file:\n{}",
            path.display(),
            diff.unified_diff()
        );
    }
}

fn run_case(case: &Case) {
    let host = Host::new();
    for (host_path, name) in case.files {
        host.put(host_path, &fixture(name));
    }
    let opts = host.options();
    let pristine = host.snapshot();

    // Dry run: the exact diff, and nothing written.
    let plan = plan_install(&opts).unwrap();
    assert_eq!(
        plan.target.flavour, case.flavour,
        "{}: detected flavour",
        case.name
    );
    let diff = plan
        .diff()
        .replace(&host.root().display().to_string(), "/host");
    let diff = diff.replace(&host.shim_source.display().to_string(), "SHIM_SOURCE");
    golden(&format!("{}.dry-run.diff", case.name), &diff);
    assert_eq!(
        host.snapshot(),
        pristine,
        "{}: the dry run wrote something",
        case.name
    );

    // Install.
    plan.apply().unwrap();
    let installed = fs::read_to_string(host.path(case.edited)).unwrap();
    golden(&format!("{}.installed", case.name), &installed);
    assert_eq!(
        fs::read(host.path("/usr/local/bin/containerd-shim-kybernate-v1")).unwrap(),
        fs::read(&host.shim_source).unwrap(),
        "{}: shim bytes",
        case.name
    );
    for (host_path, name) in case.files {
        let original = fixture(name);
        let now = fs::read_to_string(host.path(host_path)).unwrap();
        // Every Go-template action survives, verbatim and in order.
        let actions: Vec<&str> = original.lines().filter(|l| l.contains("{{")).collect();
        let kept: Vec<&str> = now.lines().filter(|l| l.contains("{{")).collect();
        assert_eq!(
            actions, kept,
            "{}: template actions of {host_path}",
            case.name
        );
        // The original's lines all remain, in order (nothing unrelated moved or changed).
        let mut rest = now.lines();
        for line in original.lines() {
            assert!(
                rest.any(|l| l == line),
                "{}: line {line:?} of {host_path} lost or moved",
                case.name
            );
        }
    }
    let after_install = host.snapshot();

    // Idempotence: a second run plans no change and writes nothing.
    let again = plan_install(&opts).unwrap();
    assert!(
        !again.config_changed(),
        "{}: second install changes the config",
        case.name
    );
    assert!(
        matches!(again.shim, ShimStep::Unchanged { .. }),
        "{}: shim recopied",
        case.name
    );
    assert!(
        !again.diff().contains("+++"),
        "{}: second dry run shows a diff",
        case.name
    );
    again.apply().unwrap();
    assert_eq!(
        host.snapshot(),
        after_install,
        "{}: second install wrote something",
        case.name
    );

    // Uninstall: back to the exact bytes (and files) from before, no backup left behind.
    let undo = plan_uninstall(&opts).unwrap();
    assert!(
        undo.config_changed(),
        "{}: uninstall changes nothing",
        case.name
    );
    let undo_diff = undo.diff();
    assert!(
        undo_diff.contains("-  ") || undo_diff.contains("/dev/null"),
        "{}: uninstall dry run: {undo_diff}",
        case.name
    );
    undo.apply().unwrap();
    assert_eq!(
        host.snapshot(),
        pristine,
        "{}: uninstall did not restore the host",
        case.name
    );

    // Uninstalling again is a no-op.
    let twice = plan_uninstall(&opts).unwrap();
    assert!(
        !twice.config_changed(),
        "{}: second uninstall changes something",
        case.name
    );
}

#[test]
fn containerd_16_default_config_round_trip() {
    run_case(&CASES[0]);
}

#[test]
fn containerd_21_default_config_round_trip() {
    run_case(&CASES[1]);
}

#[test]
fn containerd_21_imports_use_a_dropin_and_leave_the_config_alone() {
    run_case(&CASES[2]);
}

#[test]
fn microk8s_template_round_trip_keeps_placeholders() {
    run_case(&CASES[3]);
}

#[test]
fn k3s_template_round_trip_keeps_go_template_actions() {
    run_case(&CASES[4]);
}

#[test]
fn k3s_without_template_creates_one_from_the_generated_config_and_removes_it() {
    run_case(&CASES[5]);
}

#[test]
fn rke2_without_template_creates_one_from_the_generated_config_and_removes_it() {
    run_case(&CASES[6]);
}
