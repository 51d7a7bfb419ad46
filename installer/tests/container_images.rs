//! The agent and controller images, proven the way they are deployed (root, CI): each is
//! built offline with buildah on the local bookworm slim base. The agent image is imported
//! into a private containerd and run as deploy/40-agent-daemonset.yaml runs it — the
//! installer init container first, against a temp host root, then the agent, not privileged
//! but with exactly the capabilities, read-only root and seccomp setting of the manifest, the
//! host's PIDs and the manifest's host mounts — and from the host, `kybernatectl` on the
//! mounted socket checkpoints and restores a host process (and refuses one holding
//! capabilities the agent lacks). The controller image runs
//! as its Deployment runs it (non-root, read-only root filesystem) and, with no API server
//! to reach, exits with one clear line.

mod common;
mod daemon;
mod images;

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use daemon::{containerd_16, PrivateContainerd};
use images::{config_map_file, ctr_run_flags, AgentPod, BuiltImages, PodMount, VolumeSource};
use kybernate_installer::restart::ProbeOutcome;

fn require_root() {
    let out = Command::new("id").arg("-u").output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "0",
        "the image tests build images and run containerd: run them as root (CI does)"
    );
}

/// The host directories this run's agent uses: under the DaemonSet's host mounts, one
/// directory per test run, removed on drop.
struct HostDirs {
    socket: PathBuf,
    state: PathBuf,
    ram: PathBuf,
}

impl HostDirs {
    fn new(config_dir: &Path) -> Self {
        let run = format!("ci-image-{}", std::process::id());
        let dirs = Self {
            socket: PathBuf::from(format!("/run/kybernate/{run}/agent.sock")),
            state: PathBuf::from(format!("/var/lib/kybernate/{run}")),
            ram: PathBuf::from(format!("/dev/shm/kybernate-{run}")),
        };
        // The ConfigMap's agent.toml, pointed at this run's directories.
        let mut doc: toml_edit::DocumentMut = config_map_file("kybernate-agent", "agent.toml")
            .parse()
            .expect("agent.toml in the ConfigMap");
        doc["socket"] = toml_edit::value(dirs.socket.display().to_string());
        doc["state_dir"] = toml_edit::value(dirs.state.display().to_string());
        doc["tiers"]["ram_path"] = toml_edit::value(dirs.ram.display().to_string());
        fs::create_dir_all(config_dir).unwrap();
        // The agent refuses configured tier directories that do not exist.
        fs::create_dir_all(&dirs.ram).unwrap();
        fs::write(config_dir.join("agent.toml"), doc.to_string()).unwrap();
        dirs
    }
}

impl Drop for HostDirs {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(self.socket.parent().unwrap());
        let _ = fs::remove_dir_all(&self.state);
        let _ = fs::remove_dir_all(&self.ram);
    }
}

/// A shell on the host keeping a counter in memory and appending `epoch counter` lines to a
/// file it holds open; a restarted process would show a new epoch and count from 1 again. It
/// forks nothing while it runs (it waits by timing out on a FIFO), so the checkpoint holds one
/// process and no short-lived child whose PID could still be taken when the restore needs it.
///
/// Each line is one `write(2)` to an `O_APPEND` descriptor, so every state of the file a dump
/// can catch holds the last complete line. An earlier version rewrote the file with
/// `echo ... > file`: the shell's open(O_TRUNC) and its write are separate system calls, and a
/// stop-mode dump that froze the shell between them, then killed it, left the file empty
/// (the test then read no state right after the checkpoint).
struct HostWorkload {
    child: Option<Child>,
    pid: i32,
    file: PathBuf,
}

impl HostWorkload {
    /// A shell loop publishing a counter, run as root holding exactly `capabilities` (`CAP_`
    /// names; all of root's when `None`).
    fn start(dir: &Path, capabilities: Option<&[String]>) -> Self {
        let file = dir.join("counter");
        let fifo = dir.join("tick");
        let made = Command::new("mkfifo").arg(&fifo).status().unwrap();
        assert!(made.success(), "mkfifo {}", fifo.display());
        let script = format!(
            "e=$$-$RANDOM$RANDOM; i=0; exec 3>>{f}; while :; do i=$((i+1)); \
             echo \"$e $i\" >&3; read -t 0.05 <> {t} || :; done",
            f = file.display(),
            t = fifo.display()
        );
        let mut command = Command::new("setsid");
        if let Some(capabilities) = capabilities {
            // Root's permitted set after exec is its bounding set.
            let mut bounding = String::from("-all");
            for cap in capabilities {
                bounding.push_str(",+");
                bounding.push_str(&cap.trim_start_matches("CAP_").to_lowercase());
            }
            command.args(["setpriv", "--bounding-set", &bounding]);
        }
        let child = command
            .args(["bash", "-c", &script])
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let pid = i32::try_from(child.id()).unwrap();
        let workload = Self {
            child: Some(child),
            pid,
            file,
        };
        workload.wait_for(|_, n| n >= 3);
        workload
    }

    /// The last complete line: the state the workload published last.
    fn read(&self) -> Option<(String, u64)> {
        let text = fs::read_to_string(&self.file).ok()?;
        let complete = &text[..=text.rfind('\n')?];
        let (epoch, n) = complete.lines().last()?.split_once(' ')?;
        Some((epoch.to_string(), n.parse().ok()?))
    }

    fn wait_for(&self, done: impl Fn(&str, u64) -> bool) -> (String, u64) {
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut last = None;
        while Instant::now() < deadline {
            last = self.read();
            if let Some((e, n)) = &last {
                if done(e, *n) {
                    return (e.clone(), *n);
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("workload state never reached the expected value (last {last:?})");
    }

    /// After the dump killed it: reap our child and wait until its PID is free.
    fn reap_dumped(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.wait();
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while Path::new(&format!("/proc/{}", self.pid)).exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for HostWorkload {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.pid)])
            .status();
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Where each of the pod's volumes comes from on this test's host: the host's `/` is the
/// temp host root, the containerd socket the private containerd's, the ConfigMap a temp
/// directory, an optional Secret that does not exist an empty one (as the kubelet mounts
/// it); every other host path is the host's own.
fn volume_on_test_host(node: &PrivateContainerd, config_dir: &Path, mount: &PodMount) -> PathBuf {
    match &mount.source {
        VolumeSource::HostPath { path, .. } if path == "/" => node.host.root(),
        VolumeSource::HostPath { kind, .. } if kind == "Socket" => node.socket.clone(),
        VolumeSource::HostPath { path, kind } => {
            if kind == "DirectoryOrCreate" {
                fs::create_dir_all(path).unwrap();
            }
            PathBuf::from(path)
        }
        VolumeSource::ConfigMap { .. } => config_dir.to_path_buf(),
        VolumeSource::OptionalSecret { name } => {
            let dir = node.host.dir.path().join(format!("secret-{name}"));
            fs::create_dir_all(&dir).unwrap();
            fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).unwrap();
            dir
        }
    }
}

fn expand(words: &[String], node_name: &str) -> Vec<String> {
    words
        .iter()
        .map(|w| w.replace("$(NODE_NAME)", node_name))
        .collect()
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn ctl(socket: &Path, args: &[&str]) -> serde_json::Value {
    let out = Command::new(images::bin_dir().join("kybernatectl"))
        .arg("--socket")
        .arg(socket)
        .args(["--output", "json"])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "kybernatectl {args:?}: {}",
        text(&out)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The task's host PID from `ctr tasks ls`, while it runs.
fn task_pid(node: &PrivateContainerd, id: &str) -> Option<(u32, String)> {
    node.ctr_ok(&["tasks", "ls"]).lines().find_map(|l| {
        let cols: Vec<&str> = l.split_whitespace().collect();
        (cols.first() == Some(&id)).then(|| (cols[1].parse().unwrap(), cols[2].to_string()))
    })
}

/// GET /metrics on the agent's metrics port inside the pod's network namespace (the
/// readiness probe's view).
fn scrape(agent_pid: u32, port: &str) -> String {
    let out = Command::new("nsenter")
        .args([
            "--target",
            &agent_pid.to_string(),
            "--net",
            "--",
            "bash",
            "-c",
        ])
        .arg(format!(
            "exec 3<>/dev/tcp/127.0.0.1/{port}; \
             printf 'GET /metrics HTTP/1.0\\r\\nHost: x\\r\\n\\r\\n' >&3; cat <&3"
        ))
        .output()
        .unwrap();
    assert!(out.status.success(), "scraping metrics: {}", text(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn agent_image_checkpoints_and_restores_a_host_process_as_the_daemonset_runs_it() {
    require_root();
    let pod = AgentPod::from_deploy();
    let built = BuiltImages::build("kybernate-agent");
    let image = built.name("kybernate-agent");
    let labels = &built.inspect("kybernate-agent")["OCIv1"]["config"]["Labels"];
    assert_eq!(labels["org.opencontainers.image.licenses"], "Apache-2.0");
    assert_eq!(
        labels["org.opencontainers.image.version"],
        env!("CARGO_PKG_VERSION")
    );
    assert!(
        labels["org.opencontainers.image.revision"].is_string(),
        "{labels}"
    );

    let mut node = PrivateContainerd::new(containerd_16());
    node.start();
    let archive = built.export("kybernate-agent");
    node.ctr_ok(&["images", "import", archive.to_str().unwrap()]);
    let config_dir = node.host.dir.path().join("configmap");
    let dirs = HostDirs::new(&config_dir);

    // The init container: the DaemonSet's installer command against the temp host root;
    // the test restarts its private containerd itself.
    let init = pod.init_container("installer");
    assert!(
        pod.host_pid && !init.privileged && init.drops_all_capabilities,
        "{pod:?}"
    );
    let mut args = vec!["run".to_string(), "--rm".into()];
    args.extend(ctr_run_flags(
        &pod,
        init,
        |m| volume_on_test_host(&node, &config_dir, m),
        None,
    ));
    args.extend([image.clone(), format!("installer-{}", std::process::id())]);
    args.extend(expand(&init.command, "ci-node"));
    args.extend(expand(&init.args, "ci-node"));
    args.push("--no-restart".into());
    let out = node.ctr(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(
        out.status.success(),
        "installer in the image: {}",
        text(&out)
    );
    let installed = node
        .host
        .path("/usr/local/bin/containerd-shim-kybernate-v1");
    assert_eq!(
        fs::read(&installed).expect("the installer put the shim on the host"),
        fs::read(
            built
                .work
                .path()
                .join("contexts/agent/bin/containerd-shim-kybernate-v1")
        )
        .unwrap(),
        "the host's shim is the image's"
    );
    node.stop();
    assert_eq!(
        node.start(),
        ProbeOutcome::Answering {
            runtime_listed: true
        },
        "containerd lists the kybernate runtime after the installer ran"
    );

    // The agent container, as the DaemonSet starts it.
    let resolve = |m: &PodMount| volume_on_test_host(&node, &config_dir, m);
    let agent = pod.container("agent");
    let agent_id = format!("agent-{}", std::process::id());
    let agent_log = node.host.dir.path().join("agent.log");
    let mut args = vec![
        "run".to_string(),
        "-d".into(),
        "--log-uri".into(),
        format!("file://{}", agent_log.display()),
    ];
    args.extend(ctr_run_flags(&pod, agent, resolve, None));
    args.extend([image.clone(), agent_id.clone()]);
    args.extend(expand(&agent.command, "ci-node"));
    args.extend(expand(&agent.args, "ci-node"));
    node.ctr_ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let log = || fs::read_to_string(&agent_log).unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !dirs.socket.exists() {
        let status = task_pid(&node, &agent_id).map(|t| t.1);
        assert!(
            status.as_deref() == Some("RUNNING") && Instant::now() < deadline,
            "the agent did not serve on {} ({status:?}):\n{}",
            dirs.socket.display(),
            log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let (agent_pid, _) = task_pid(&node, &agent_id).unwrap();
    // The agent binds its socket first and probes CRIU after its start-up checks.
    let deadline = Instant::now() + Duration::from_secs(30);
    let found = loop {
        if let Some(line) = log().lines().find(|l| l.contains("found CRIU")) {
            break line.to_string();
        }
        assert!(
            Instant::now() < deadline,
            "the agent did not find CRIU:\n{}",
            log()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(found.contains("4.2"), "CRIU 4.2 expected: {found}");

    // Not privileged: the agent holds exactly the capabilities the DaemonSet adds.
    let held: BTreeSet<String> = caps::read(Some(agent_pid as i32), caps::CapSet::Effective)
        .expect("read the agent's capabilities")
        .iter()
        .map(ToString::to_string)
        .collect();
    let added: BTreeSet<String> = images::grantable(&agent.added_capabilities)
        .into_iter()
        .collect();
    assert!(agent.drops_all_capabilities && !agent.privileged);
    assert_eq!(held, added, "the agent's effective capabilities");

    // A process holding capabilities the agent lacks (all of root's) could be dumped but
    // never restored by this agent: refused before anything is frozen, naming them.
    let work = tempfile::tempdir().unwrap();
    let full_dir = work.path().join("full");
    fs::create_dir(&full_dir).unwrap();
    let full = HostWorkload::start(&full_dir, None);
    let refused = Command::new(images::bin_dir().join("kybernatectl"))
        .arg("--socket")
        .arg(&dirs.socket)
        .args([
            "checkpoint",
            "--pid",
            &full.pid.to_string(),
            "--name",
            "full-caps",
        ])
        .output()
        .unwrap();
    assert!(!refused.status.success(), "{}", text(&refused));
    let message = text(&refused);
    assert!(
        message.contains("CAP_SYS_MODULE") && message.contains("could never restore"),
        "{message}"
    );
    let (_, before) = full.read().unwrap();
    full.wait_for(|_, n| n > before + 2);
    drop(full);

    // From the host: checkpoint a host process that holds no more than the agent (here the
    // agent's own set) through the mounted socket, restore it.
    let held_dir = work.path().join("held");
    fs::create_dir(&held_dir).unwrap();
    let mut workload = HostWorkload::start(
        &held_dir,
        Some(&images::grantable(&agent.added_capabilities)),
    );
    let name = format!("ci-image-{}", std::process::id());
    let cp = ctl(
        &dirs.socket,
        &[
            "checkpoint",
            "--pid",
            &workload.pid.to_string(),
            "--name",
            &name,
        ],
    );
    assert_eq!(cp["tiers"], serde_json::json!(["ram", "nvme"]), "{cp}");
    workload.reap_dumped();
    let (epoch, at_dump) = workload.read().unwrap();
    let ram_images = dirs.ram.join(&name);
    assert!(
        fs::read_dir(&ram_images)
            .map(|d| d.count() > 0)
            .unwrap_or(false),
        "the RAM tier on the host holds the images at {}",
        ram_images.display()
    );
    let nvme = dirs.state.join("nvme");
    assert!(
        fs::read_dir(&nvme).map(|d| d.count() > 0).unwrap_or(false),
        "the NVMe tier on the host at {} is empty",
        nvme.display()
    );

    let restored = ctl(&dirs.socket, &["restore", &name]);
    assert_eq!(
        restored["pid"].as_i64(),
        Some(i64::from(workload.pid)),
        "{restored}"
    );
    let (after_epoch, _) = workload.wait_for(|_, n| n > at_dump + 3);
    assert_eq!(
        after_epoch, epoch,
        "the restored process is the checkpointed one"
    );

    let port = agent
        .args
        .iter()
        .find_map(|a| a.strip_prefix("--metrics-addr="))
        .and_then(|a| a.rsplit(':').next())
        .expect("the DaemonSet sets --metrics-addr");
    let metrics = scrape(agent_pid, port);
    assert!(
        metrics.contains(
            "kybernate_phase_duration_seconds_count{operation=\"restore\",phase=\"criu_restore\"} 1"
        ),
        "{metrics}"
    );
    drop(workload);
    let _ = ctl(&dirs.socket, &["delete", &name]);
    node.ctr_ok(&["tasks", "kill", "-s", "SIGTERM", &agent_id]);
    let deadline = Instant::now() + Duration::from_secs(20);
    while task_pid(&node, &agent_id).is_some_and(|t| t.1 == "RUNNING") {
        assert!(Instant::now() < deadline, "the agent ignored SIGTERM");
        std::thread::sleep(Duration::from_millis(100));
    }
    node.ctr_ok(&["tasks", "delete", &agent_id]);
    node.ctr_ok(&["containers", "rm", &agent_id]);

    // Bad input: the agent without one of its host directory mounts exits with one line
    // naming the directory.
    for mount in &agent.mounts {
        let VolumeSource::HostPath { kind, .. } = &mount.source else {
            continue;
        };
        if !kind.starts_with("Directory") {
            continue;
        }
        let mut args = vec!["run".to_string(), "--rm".into()];
        args.extend(ctr_run_flags(&pod, agent, resolve, Some(&mount.name)));
        args.extend([
            image.clone(),
            format!("no-{}-{}", mount.name, std::process::id()),
        ]);
        args.extend(expand(&agent.command, "ci-node"));
        args.extend(expand(&agent.args, "ci-node"));
        let out = node.ctr(&args.iter().map(String::as_str).collect::<Vec<_>>());
        assert!(
            !out.status.success(),
            "agent without {}: {}",
            mount.name,
            text(&out)
        );
        let all = text(&out);
        let plain: Vec<&str> = all
            .lines()
            .filter(|l| !l.trim().is_empty() && !l.starts_with('{'))
            .collect();
        assert_eq!(
            plain.len(),
            1,
            "one error line without {}: {all}",
            mount.name
        );
        assert!(
            plain[0].contains(&mount.mount_path) && plain[0].contains("not the host's"),
            "the line names {}: {}",
            mount.mount_path,
            plain[0]
        );
    }
}

#[test]
fn controller_image_runs_read_only_as_non_root_and_fails_cleanly_without_an_api_server() {
    require_root();
    let built = BuiltImages::build("kybernate-controller");
    let config = &built.inspect("kybernate-controller")["OCIv1"]["config"];
    assert_eq!(config["User"], "65532:65532", "{config}");
    assert_eq!(
        config["Labels"]["org.opencontainers.image.licenses"],
        "Apache-2.0"
    );
    let mut node = PrivateContainerd::new(containerd_16());
    node.start();
    let archive = built.export("kybernate-controller");
    node.ctr_ok(&["images", "import", archive.to_str().unwrap()]);

    let doc: serde_yaml::Value = serde_yaml::from_str(
        &fs::read_to_string(images::workspace().join("deploy/50-controller-deployment.yaml"))
            .unwrap(),
    )
    .unwrap();
    let container = &doc["spec"]["template"]["spec"]["containers"][0];
    let security = &container["securityContext"];
    assert_eq!(security["readOnlyRootFilesystem"].as_bool(), Some(true));
    let words = |key: &str| -> Vec<String> {
        container[key]
            .as_sequence()
            .unwrap()
            .iter()
            .map(|w| w.as_str().unwrap().to_string())
            .collect()
    };
    // No credentials at all, then a kubeconfig naming an API server nobody listens on.
    let kubeconfig = node.host.dir.path().join("kubeconfig");
    fs::write(
        &kubeconfig,
        "apiVersion: v1\nkind: Config\ncurrent-context: none\n\
         clusters: [{name: none, cluster: {server: 'https://127.0.0.1:1', insecure-skip-tls-verify: true}}]\n\
         contexts: [{name: none, context: {cluster: none, user: none}}]\n\
         users: [{name: none, user: {token: not-a-secret}}]\n",
    )
    .unwrap();
    let unreachable = [
        "--mount".to_string(),
        format!(
            "type=bind,src={},dst=/etc/kubeconfig,options=rbind:ro",
            kubeconfig.display()
        ),
        "--env".into(),
        "KUBECONFIG=/etc/kubeconfig".into(),
    ];
    for (case, extra, expected) in [
        ("no credentials", &[][..], "in-cluster"),
        (
            "unreachable API server",
            &unreachable[..],
            "leader election",
        ),
    ] {
        let mut args = vec!["run".to_string(), "--rm".into(), "--read-only".into()];
        args.extend(extra.iter().cloned());
        args.extend([
            built.name("kybernate-controller"),
            format!("controller-{}", std::process::id()),
        ]);
        args.extend(words("command"));
        args.extend(words("args"));
        let out = node.ctr(&args.iter().map(String::as_str).collect::<Vec<_>>());
        let all = text(&out);
        assert!(
            !out.status.success(),
            "{case}: the controller cannot run: {all}"
        );
        let plain: Vec<&str> = all
            .lines()
            .filter(|l| l.starts_with("Error") || l.contains("panicked"))
            .collect();
        assert_eq!(plain.len(), 1, "{case}: one error line, no panic: {all}");
        assert!(
            plain[0].contains(expected),
            "{case}: the line names {expected}: {all}"
        );
    }
}
