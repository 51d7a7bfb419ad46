//! The agent as a Kubernetes node worker, end to end: a scripted API server on loopback
//! hands the real agent binary (`--node-name n1`, KUBECONFIG pointing at the mock) a
//! GpuCheckpoint for a container running in a private containerd (namespace `k8s.io`) under
//! the kybernate shim; the agent checkpoints it through containerd's task API and the shim
//! (as `kybernatectl checkpoint --container` does) and applies the status (server-side apply
//! as `kybernate-agent`; its finalizer through kube-runtime's helper, as JSON patches). A
//! stale re-delivery is refused and never runs twice; deleting the object deletes the
//! stored checkpoint. A GpuRestore of a real node-local checkpoint is refused (Failed,
//! an Event) until a GpuCheckpointGrant allows it, then staged into RAM by a real prefetch;
//! one for an unknown checkpoint fails naming it. Needs root, CRIU 4.x, containerd 1.6 and the shim built
//! (`cargo build -p containerd-shim-kybernate-v1`).

#[path = "support/containerd.rs"]
mod containerd;
mod support;

use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use containerd::{Containerd, Release};
use kybernate_sample_workload::Status;
use serde_json::{json, Value};
use support::{Workload, CTL};
use tokio::sync::mpsc;

const AGENT: &str = env!("CARGO_BIN_EXE_kybernate-agent");
const WAIT: Duration = Duration::from_secs(120);
const CHECKPOINTS: &str = "/apis/kybernate.io/v1alpha1/namespaces/default/gpucheckpoints/";
const CP_PATH: &str = "/apis/kybernate.io/v1alpha1/namespaces/default/gpucheckpoints/cp1";
const RESTORES: &str = "/apis/kybernate.io/v1alpha1/namespaces/default/gpurestores/";

/// RFC 7386 JSON merge patch.
fn merge(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(fields) => {
            if !target.is_object() {
                *target = json!({});
            }
            let obj = target.as_object_mut().unwrap();
            for (k, v) in fields {
                if v.is_null() {
                    obj.remove(k);
                } else {
                    merge(obj.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        other => *target = other.clone(),
    }
}

/// What the scripted API server holds and saw.
#[derive(Default)]
struct ApiState {
    /// GpuCheckpoints by name.
    checkpoints: std::collections::BTreeMap<String, Value>,
    rv: u64,
    /// (path, body, answered status) of every PATCH.
    patches: Vec<(String, Value, u16)>,
    unexpected: Vec<String>,
    /// (path, body) of every Event posted.
    events: Vec<(String, Value)>,
    watchers: Vec<mpsc::UnboundedSender<Value>>,
    /// GpuRestores by name, and the watches of them.
    restores: std::collections::BTreeMap<String, Value>,
    restore_watchers: Vec<mpsc::UnboundedSender<Value>>,
    /// GpuCheckpointGrants by name, and the watches of them.
    grants: std::collections::BTreeMap<String, Value>,
    grant_watchers: Vec<mpsc::UnboundedSender<Value>>,
    /// Watches of the node's pods (none are served).
    pod_watchers: Vec<mpsc::UnboundedSender<Value>>,
}

impl ApiState {
    fn broadcast(&mut self, event: &str, object: &Value) {
        let line = json!({"type": event, "object": object});
        self.watchers.retain(|w| w.send(line.clone()).is_ok());
    }

    fn broadcast_restore(&mut self, event: &str, object: &Value) {
        let line = json!({"type": event, "object": object});
        self.restore_watchers
            .retain(|w| w.send(line.clone()).is_ok());
    }

    fn broadcast_grant(&mut self, event: &str, object: &Value) {
        let line = json!({"type": event, "object": object});
        self.grant_watchers.retain(|w| w.send(line.clone()).is_ok());
    }
}

type Shared = Arc<Mutex<ApiState>>;

async fn handle(
    state: Shared,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> (StatusCode, Body) {
    let path = uri.path().to_owned();
    let query = uri.query().unwrap_or_default().to_owned();
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let content_type = headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let reply = |code: u16, v: Value| {
        (
            StatusCode::from_u16(code).unwrap(),
            Body::from(v.to_string()),
        )
    };
    let mut s = state.lock().unwrap();
    // Every write of the agent is a forced server-side apply as `kybernate-agent`, except
    // the finalizer helper's JSON patches.
    if method == Method::PATCH
        && !(content_type == "application/apply-patch+yaml"
            && query.contains("fieldManager=kybernate-agent")
            && query.contains("force=true"))
        && content_type != "application/json-patch+json"
    {
        s.unexpected
            .push(format!("{method} {path}?{query} as {content_type}: {body}"));
    }
    match (method.as_str(), path.as_str()) {
        ("GET", "/apis/kybernate.io/v1alpha1/gpucheckpoints") if query.contains("watch=true") => {
            assert!(
                query.contains("labelSelector=kybernate.io%2Fnode%3Dn1"),
                "{query}"
            );
            let (tx, rx) = mpsc::unbounded_channel::<Value>();
            s.watchers.push(tx);
            (StatusCode::OK, watch_body(rx))
        }
        ("GET", "/apis/kybernate.io/v1alpha1/gpucheckpoints") => {
            let items: Vec<Value> = s.checkpoints.values().cloned().collect();
            assert!(
                query.contains("labelSelector=kybernate.io%2Fnode%3Dn1"),
                "{query}"
            );
            reply(
                200,
                json!({"apiVersion": "kybernate.io/v1alpha1", "kind": "GpuCheckpointList",
                "metadata": {"resourceVersion": s.rv.to_string()}, "items": items}),
            )
        }
        ("GET", "/apis/kybernate.io/v1alpha1/gpurestores") => {
            assert!(
                query.contains("labelSelector=kybernate.io%2Fnode%3Dn1"),
                "{query}"
            );
            if query.contains("watch=true") {
                let (tx, rx) = mpsc::unbounded_channel::<Value>();
                s.restore_watchers.push(tx);
                return (StatusCode::OK, watch_body(rx));
            }
            let items: Vec<Value> = s.restores.values().cloned().collect();
            reply(
                200,
                json!({"apiVersion": "kybernate.io/v1alpha1", "kind": "GpuRestoreList",
                "metadata": {"resourceVersion": s.rv.to_string()}, "items": items}),
            )
        }
        ("GET", "/api/v1/pods") => {
            assert!(
                query.contains("fieldSelector=spec.nodeName%3Dn1"),
                "{query}"
            );
            if query.contains("watch=true") {
                let (tx, rx) = mpsc::unbounded_channel::<Value>();
                s.pod_watchers.push(tx);
                return (StatusCode::OK, watch_body(rx));
            }
            reply(
                200,
                json!({"apiVersion": "v1", "kind": "PodList",
                "metadata": {"resourceVersion": s.rv.to_string()}, "items": []}),
            )
        }
        ("GET", "/apis/kybernate.io/v1alpha1/gpucheckpointgrants") => {
            if query.contains("watch=true") {
                let (tx, rx) = mpsc::unbounded_channel::<Value>();
                s.grant_watchers.push(tx);
                return (StatusCode::OK, watch_body(rx));
            }
            let items: Vec<Value> = s.grants.values().cloned().collect();
            reply(
                200,
                json!({"apiVersion": "kybernate.io/v1alpha1", "kind": "GpuCheckpointGrantList",
                "metadata": {"resourceVersion": s.rv.to_string()}, "items": items}),
            )
        }
        ("PATCH", p) if p.starts_with(RESTORES) && p.ends_with("/status") => {
            let name = p[RESTORES.len()..].trim_end_matches("/status").to_owned();
            s.patches.push((path.clone(), body.clone(), 200));
            s.rv += 1;
            let rv = s.rv.to_string();
            let mut object = s.restores.get(&name).cloned().unwrap_or(Value::Null);
            merge(&mut object, &json!({"status": body["status"].clone()}));
            object["metadata"]["resourceVersion"] = json!(rv);
            s.restores.insert(name, object.clone());
            s.broadcast_restore("MODIFIED", &object);
            reply(200, object)
        }
        ("PATCH", "/api/v1/nodes/n1") => {
            s.patches.push((path.clone(), body.clone(), 200));
            let mut node = json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n1"}});
            merge(&mut node, &body);
            reply(200, node)
        }
        ("PATCH", p) if p.starts_with(CHECKPOINTS) => {
            let name = p[CHECKPOINTS.len()..]
                .trim_end_matches("/status")
                .to_owned();
            let Some(mut object) = s.checkpoints.get(&name).cloned() else {
                s.unexpected.push(format!("{method} {path}?{query}"));
                return reply(
                    404,
                    json!({"kind": "Status", "apiVersion": "v1", "metadata": {},
                    "status": "Failure", "reason": "NotFound", "code": 404}),
                );
            };
            if content_type == "application/json-patch+json" {
                // kube-runtime's finalizer helper: `test` guards each change.
                let ops: json_patch::Patch = serde_json::from_value(body.clone()).unwrap();
                if let Err(error) = json_patch::patch(&mut object, &ops) {
                    s.patches.push((path.clone(), body.clone(), 422));
                    return reply(
                        422,
                        json!({"kind": "Status", "apiVersion": "v1", "metadata": {},
                        "status": "Failure", "reason": "Invalid", "code": 422,
                        "message": error.to_string()}),
                    );
                }
                s.patches.push((path.clone(), body.clone(), 200));
                s.rv += 1;
                let rv = s.rv.to_string();
                object["metadata"]["resourceVersion"] = json!(rv);
                s.checkpoints.insert(name, object.clone());
                s.broadcast("MODIFIED", &object);
                return reply(200, object);
            }
            let wanted = body["metadata"]["resourceVersion"]
                .as_str()
                .map(str::to_owned);
            if wanted.is_some_and(|w| object["metadata"]["resourceVersion"] != w) {
                s.patches.push((path.clone(), body.clone(), 409));
                return reply(
                    409,
                    json!({"kind": "Status", "apiVersion": "v1", "metadata": {},
                    "status": "Failure", "reason": "Conflict", "code": 409,
                    "message": "the object has been modified"}),
                );
            }
            s.patches.push((path.clone(), body.clone(), 200));
            let mut patch = body.clone();
            if let Some(meta) = patch.get_mut("metadata").and_then(Value::as_object_mut) {
                meta.remove("resourceVersion");
            }
            let patch = if p.ends_with("/status") {
                json!({"status": patch["status"].clone()})
            } else {
                patch
            };
            merge(&mut object, &patch);
            s.rv += 1;
            let rv = s.rv.to_string();
            object["metadata"]["resourceVersion"] = json!(rv);
            s.checkpoints.insert(name, object.clone());
            s.broadcast("MODIFIED", &object);
            reply(200, object)
        }
        ("POST", p) if p.contains("/events") => {
            s.events.push((p.to_owned(), body.clone()));
            reply(201, body)
        }
        _ => {
            s.unexpected.push(format!("{method} {path}?{query}"));
            reply(
                404,
                json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "reason": "NotFound", "code": 404}),
            )
        }
    }
}

/// A body that yields watch events as they are queued and stays open.
fn watch_body(rx: mpsc::UnboundedReceiver<Value>) -> Body {
    use futures::StreamExt;
    let events = tokio_stream::wrappers::UnboundedReceiverStream::new(rx)
        .map(|event| Ok::<_, std::io::Error>(format!("{event}\n")));
    Body::from_stream(events)
}

fn start_api(state: Shared) -> u16 {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            tx.send(listener.local_addr().unwrap().port()).unwrap();
            let app = axum::Router::new().fallback(
                move |m: Method, u: Uri, h: HeaderMap, b: axum::body::Bytes| {
                    handle(state.clone(), m, u, h, b)
                },
            );
            axum::serve(listener, app).await.unwrap();
        });
    });
    rx.recv().unwrap()
}

struct AgentProcess(Child);

impl Drop for AgentProcess {
    fn drop(&mut self) {
        // SAFETY: kill(2) to our own child.
        unsafe { libc::kill(i32::try_from(self.0.id()).unwrap(), libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline && self.0.try_wait().unwrap().is_none() {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The real agent binary for node n1, pointed at a scripted API server over `state`.
fn start_agent(
    dir: &std::path::Path,
    state: Shared,
    containerd_socket: Option<&std::path::Path>,
) -> (AgentProcess, PathBuf, PathBuf) {
    let port = start_api(state.clone());
    let kubeconfig = dir.join("kubeconfig");
    std::fs::write(&kubeconfig, format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: mock\n  cluster:\n    server: http://127.0.0.1:{port}\n\
         users:\n- name: u\n  user:\n    token: test\ncontexts:\n- name: c\n  context:\n    cluster: mock\n    user: u\n\
         current-context: c\n")).unwrap();
    let socket = dir.join("agent.sock");
    let log = dir.join("agent.log");
    let metrics_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut command = Command::new(AGENT);
    command
        .arg("--state-dir")
        .arg(dir.join("state"))
        .arg("--socket")
        .arg(&socket)
        .arg("--metrics-addr")
        .arg(format!("127.0.0.1:{metrics_port}"))
        .args(["--node-name", "n1"]);
    let config = dir.join("agent.toml");
    let containerd = containerd_socket
        .map(|socket| format!("containerd_socket = \"{}\"\n", socket.display()))
        .unwrap_or_default();
    std::fs::write(&config, containerd).unwrap();
    command.arg("--config").arg(config);
    command
        .env("KUBECONFIG", &kubeconfig)
        .env_remove("KUBERNETES_SERVICE_HOST")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap());
    // SAFETY: setsid() is async-signal-safe.
    unsafe {
        command.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let agent = AgentProcess(command.spawn().expect("start kybernate-agent"));
    (agent, socket, log)
}

fn wait_until(what: &str, state: &Shared, log: &std::path::Path, done: impl Fn(&ApiState) -> bool) {
    let deadline = Instant::now() + WAIT;
    loop {
        if done(&state.lock().unwrap()) {
            return;
        }
        let s = state.lock().unwrap();
        assert!(
            Instant::now() < deadline,
            "{what} never happened; patches: {:?}\nunexpected: {:?}\nagent log:\n{}",
            s.patches,
            s.unexpected,
            std::fs::read_to_string(log).unwrap_or_default()
        );
        drop(s);
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until the workload's status file satisfies `ready`.
fn wait_status(path: &std::path::Path, ready: impl Fn(&Status) -> bool) -> Status {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(status) = Status::read(path) {
            if ready(&status) {
                return status;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the workload made no progress: {:?}",
            Status::read(path)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn status_patches(s: &ApiState, phase: &str) -> Vec<Value> {
    s.patches
        .iter()
        .filter(|(p, b, code)| {
            p.ends_with("/status") && *code == 200 && b["status"]["phase"] == phase
        })
        .map(|(_, b, _)| b.clone())
        .collect()
}

/// A GpuCheckpoint of container `container_id` (pod `w`), as the controller hands it to
/// node n1: labelled, claimed by nobody yet, into NVMe, leaving the pod running.
fn scheduled_checkpoint(name: &str, container_id: &str) -> Value {
    json!({
        "apiVersion": "kybernate.io/v1alpha1", "kind": "GpuCheckpoint",
        "metadata": {"name": name, "namespace": "default", "uid": format!("uid-{name}"),
                     "resourceVersion": "5", "labels": {"kybernate.io/node": "n1"},
                     "finalizers": ["kybernate.io/referenced"]},
        "spec": {"podName": "w", "storageTier": "nvme", "leaveRunning": true,
                 "timeouts": {"dumpSeconds": 120, "overallSeconds": 600}},
        "status": {"phase": "Scheduled", "nodeName": "n1", "podUid": "uid-w",
                   "containers": [{"name": "w", "containerId": container_id}]},
    })
}

#[test]
fn agent_executes_a_gpucheckpoint_for_a_real_container_once() {
    support::require_root_and_criu();
    let dir = tempfile::Builder::new()
        .prefix("kybernate-worker-")
        .tempdir_in("/dev/shm")
        .unwrap();
    // The pod's container: the workload under the kybernate runtime in containerd's k8s.io
    // namespace, which the worker checkpoints through containerd and the shim.
    let containerd = Containerd::start(dir.path(), &dir.path().join("agent.sock"));
    let status = dir.path().join("status").join("workload");
    std::fs::create_dir_all(status.parent().unwrap()).unwrap();
    let container_id = format!("kybtest{:08x}", rand::random::<u32>());
    containerd.run_workload(&container_id, std::path::Path::new(CTL), 64, &status);
    wait_status(&status, |st| st.counter >= 5);

    let scheduled = scheduled_checkpoint("cp1", &container_id);
    let state: Shared = Arc::new(Mutex::new(ApiState {
        checkpoints: [("cp1".to_owned(), scheduled.clone())].into(),
        rv: 5,
        ..ApiState::default()
    }));
    let (_agent, socket, log) = start_agent(dir.path(), state.clone(), Some(&containerd.socket));

    wait_until("the Completed status", &state, &log, |s| {
        !status_patches(s, "Completed").is_empty()
    });
    let s = state.lock().unwrap();
    let node = s
        .patches
        .iter()
        .find(|(p, _, _)| p == "/api/v1/nodes/n1")
        .expect("node labelled");
    assert_eq!(
        node.1["metadata"]["labels"]["kybernate.io/gpu-count"], "0",
        "no GPU here"
    );
    assert_eq!(node.1["metadata"]["labels"]["kybernate.io/agent"], "ready");
    let finalizer = s
        .patches
        .iter()
        .find(|(p, _, _)| p == CP_PATH)
        .expect("finalizer patch");
    assert_eq!(
        finalizer.1,
        json!([
            {"op": "test", "path": "/metadata/finalizers", "value": ["kybernate.io/referenced"]},
            {"op": "add", "path": "/metadata/finalizers/-", "value": "kybernate.io/artifacts"},
        ]),
        "the finalizer helper adds ours, guarded by the list it saw"
    );
    let checkpointing = status_patches(&s, "Checkpointing");
    assert_eq!(checkpointing.len(), 1);
    assert_eq!(checkpointing[0]["status"]["artifactRef"], "default_cp1");
    assert_eq!(
        checkpointing[0]["metadata"]["resourceVersion"], "6",
        "the claim is guarded by the version it was decided on (after the finalizer)"
    );
    // Checkpointing → Draining (dump done, storing into nvme) → Completed.
    let order: Vec<&str> = s
        .patches
        .iter()
        .filter(|(p, _, c)| p.ends_with("/status") && *c == 200)
        .filter_map(|(_, b, _)| b["status"]["phase"].as_str())
        .collect();
    assert_eq!(order, ["Checkpointing", "Draining", "Completed"]);
    let draining = &status_patches(&s, "Draining")[0]["status"]["conditions"][0];
    assert_eq!(draining["type"], "Draining");
    assert!(
        draining["message"]
            .as_str()
            .unwrap()
            .contains("storing into nvme on node n1"),
        "{draining}"
    );
    let done = &status_patches(&s, "Completed")[0]["status"];
    assert_eq!(done["artifactRef"], "default_cp1");
    assert!(done["rawBytes"].as_u64().unwrap() > 64 << 20, "{done}");
    assert!(done["storedBytes"].as_u64().unwrap() > 0, "{done}");
    assert!(
        done["tiers"].as_array().unwrap().contains(&json!("nvme")),
        "{done}"
    );
    let phases: Vec<&str> = done["phases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["phase"].as_str().unwrap())
        .collect();
    assert!(phases.contains(&"criu_dump"), "{phases:?}");
    assert_eq!(done["gpu"]["count"], 0);
    assert!(s.unexpected.is_empty(), "{:?}", s.unexpected);
    drop(s);
    let before = Status::read(&status).unwrap().counter;
    wait_status(&status, |st| st.counter > before + 3);

    // A stale re-delivery of the Scheduled object: refused (its finalizer list is stale, and
    // so would be its claim), nothing runs again.
    let rejected = |s: &ApiState| {
        s.patches
            .iter()
            .filter(|(_, _, c)| matches!(*c, 409 | 422))
            .count()
    };
    let before = rejected(&state.lock().unwrap());
    state.lock().unwrap().broadcast("MODIFIED", &scheduled);
    wait_until("the stale copy's rejection", &state, &log, |s| {
        rejected(s) > before
    });
    let listed = Command::new(CTL)
        .arg("--socket")
        .arg(&socket)
        .args(["--output", "json", "list"])
        .output()
        .unwrap();
    let listed: Value = serde_json::from_slice(&listed.stdout).expect("list JSON");
    assert_eq!(
        listed.as_array().map(Vec::len),
        Some(1),
        "exactly one checkpoint: {listed}"
    );
    assert_eq!(
        status_patches(&state.lock().unwrap(), "Checkpointing").len(),
        1
    );

    // Deletion: the agent removes the stored checkpoint, then its finalizer.
    let deleting = {
        let mut s = state.lock().unwrap();
        let object = s.checkpoints.get_mut("cp1").unwrap();
        object["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
        object.clone()
    };
    state.lock().unwrap().broadcast("MODIFIED", &deleting);
    wait_until("the artifacts finalizer removal", &state, &log, |s| {
        s.checkpoints["cp1"]["metadata"]["finalizers"] == json!(["kybernate.io/referenced"])
    });
    let listed = Command::new(CTL)
        .arg("--socket")
        .arg(&socket)
        .args(["--output", "json", "list"])
        .output()
        .unwrap();
    let listed: Value = serde_json::from_slice(&listed.stdout).expect("list JSON");
    assert_eq!(
        listed.as_array().map(Vec::len),
        Some(0),
        "stored checkpoint deleted: {listed}"
    );
}

fn restore_object(name: &str, artifact: &str) -> Value {
    json!({
        "apiVersion": "kybernate.io/v1alpha1", "kind": "GpuRestore",
        "metadata": {"name": name, "namespace": "default", "uid": format!("uid-{name}"),
                     "resourceVersion": "3", "labels": {"kybernate.io/node": "n1"}},
        "spec": {"checkpointName": artifact.trim_start_matches("default_")},
        "status": {"phase": "Restoring", "podName": format!("{name}-restored"), "artifactRef": artifact},
    })
}

fn restore_patches(s: &ApiState, name: &str) -> Vec<Value> {
    let path = format!("{RESTORES}{name}/status");
    s.patches
        .iter()
        .filter(|(p, _, c)| *p == path && *c == 200)
        .map(|(_, b, _)| b["status"].clone())
        .collect()
}

fn deliver_restore(state: &Shared, object: Value) {
    let mut s = state.lock().unwrap();
    let name = object["metadata"]["name"].as_str().unwrap().to_owned();
    s.restores.insert(name, object.clone());
    s.broadcast_restore("ADDED", &object);
}

#[test]
fn agent_stages_a_gpurestore_from_a_real_checkpoint_and_names_an_unknown_one() {
    support::require_root_and_criu();
    let dir = tempfile::Builder::new()
        .prefix("kybernate-stage-")
        .tempdir_in("/dev/shm")
        .unwrap();
    let state: Shared = Arc::new(Mutex::new(ApiState::default()));
    let (_agent, socket, log) = start_agent(dir.path(), state.clone(), None);
    let ctl = |args: &[&str]| -> Value {
        let out = Command::new(CTL)
            .arg("--socket")
            .arg(&socket)
            .args(["--output", "json"])
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("kybernatectl JSON")
    };
    wait_until("the agent's GpuRestore watch", &state, &log, |s| {
        !s.restore_watchers.is_empty()
    });

    // A real checkpoint on this node, stored in RAM and NVMe; then RAM loses its copy.
    let mut workload = Workload::start(dir.path(), 16, &[]);
    let pid = workload.pid.to_string();
    let cp = ctl(&[
        "checkpoint",
        "--pid",
        &pid,
        "--name",
        "default_cp9",
        "--tier",
        "nvme",
    ]);
    assert_eq!(cp["tiers"], json!(["ram", "nvme"]), "{cp}");
    workload.reap_dumped();
    std::fs::remove_dir_all(dir.path().join("state/ram/default_cp9")).unwrap();
    assert_eq!(ctl(&["inspect", "default_cp9"])["tiers"], json!(["nvme"]));

    // A node-local checkpoint reaches a pod only through a grant: without one the
    // GpuRestore fails naming the checkpoint and the namespace, with an Event on it, and
    // nothing is staged.
    wait_until("the agent's GpuCheckpointGrant watch", &state, &log, |s| {
        !s.grant_watchers.is_empty()
    });
    deliver_restore(&state, restore_object("r0", "default_cp9"));
    wait_until("the refusal of r0", &state, &log, |s| {
        !restore_patches(s, "r0").is_empty()
    });
    let refused = restore_patches(&state.lock().unwrap(), "r0")[0].clone();
    assert_eq!(refused["phase"], "Failed", "{refused}");
    let condition = &refused["conditions"][0];
    assert_eq!(condition["type"], "Failed", "{condition}");
    assert_eq!(
        condition["reason"], "CheckpointRestoreRefused",
        "{condition}"
    );
    let message = condition["message"].as_str().unwrap();
    assert!(
        message.contains("default_cp9")
            && message.contains("node-local")
            && message.contains("namespace default")
            && message.contains("GpuCheckpointGrant"),
        "{message}"
    );
    wait_until("the CheckpointRestoreRefused event", &state, &log, |s| {
        s.events
            .iter()
            .any(|(_, e)| e["reason"] == "CheckpointRestoreRefused")
    });
    {
        let s = state.lock().unwrap();
        let (_, event) = s
            .events
            .iter()
            .find(|(_, e)| e["reason"] == "CheckpointRestoreRefused")
            .unwrap();
        assert_eq!(event["type"], "Warning", "{event}");
        assert_eq!(event["regarding"]["kind"], "GpuRestore", "{event}");
        assert_eq!(event["regarding"]["name"], "r0", "{event}");
    }
    assert_eq!(
        ctl(&["inspect", "default_cp9"])["tiers"],
        json!(["nvme"]),
        "a refused restore stages nothing"
    );

    // The administrator grants node-local checkpoints to namespace default.
    let grant = json!({
        "apiVersion": "kybernate.io/v1alpha1", "kind": "GpuCheckpointGrant",
        "metadata": {"name": "node-to-default", "uid": "uid-grant", "resourceVersion": "4"},
        "spec": {"from": {"nodeLocal": true}, "to": {"namespaces": ["default"]}},
    });
    {
        let mut s = state.lock().unwrap();
        s.grants.insert("node-to-default".into(), grant.clone());
        s.broadcast_grant("ADDED", &grant);
    }
    let deadline = Instant::now() + WAIT;
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("GpuCheckpointGrant in force")
    {
        assert!(Instant::now() < deadline, "the agent never saw the grant");
        std::thread::sleep(Duration::from_millis(50));
    }

    let r1 = restore_object("r1", "default_cp9");
    deliver_restore(&state, r1.clone());
    wait_until("the Staged status", &state, &log, |s| {
        !restore_patches(s, "r1").is_empty()
    });
    let staged = restore_patches(&state.lock().unwrap(), "r1")[0].clone();
    assert_eq!(staged["staging"]["nodeName"], "n1", "{staged}");
    assert_eq!(staged["staging"]["tier"], "ram", "{staged}");
    assert_eq!(staged["staging"]["fromTier"], "nvme", "{staged}");
    assert!(
        !staged["staging"]["phases"].as_array().unwrap().is_empty(),
        "{staged}"
    );
    let condition = &staged["conditions"][0];
    assert_eq!(condition["type"], "Staged");
    assert_eq!(condition["status"], "True");
    assert_eq!(condition["reason"], "Prefetched");
    assert!(
        condition["message"]
            .as_str()
            .unwrap()
            .contains("default_cp9"),
        "{condition}"
    );
    assert!(
        staged.get("phase").is_none(),
        "the controller owns the phase: {staged}"
    );
    assert_eq!(
        ctl(&["inspect", "default_cp9"])["tiers"],
        json!(["ram", "nvme"])
    );

    // The staged object comes back (our own write): nothing more happens. Then a
    // GpuRestore of a checkpoint this node never stored: Failed, naming it. The watch is
    // handled in order, so r2's answer comes after anything r1 would have caused.
    let staged_r1 = state.lock().unwrap().restores["r1"].clone();
    state
        .lock()
        .unwrap()
        .broadcast_restore("MODIFIED", &staged_r1);
    deliver_restore(&state, restore_object("r2", "default_missing"));
    wait_until("the Failed status of r2", &state, &log, |s| {
        !restore_patches(s, "r2").is_empty()
    });
    let s = state.lock().unwrap();
    assert_eq!(restore_patches(&s, "r1").len(), 1, "r1 staged once");
    let failed = &restore_patches(&s, "r2")[0];
    assert_eq!(failed["phase"], "Failed", "{failed}");
    assert_eq!(failed["conditions"][0]["type"], "Failed");
    assert_eq!(failed["conditions"][0]["reason"], "CheckpointNotFound");
    let message = failed["conditions"][0]["message"].as_str().unwrap();
    assert!(
        message.contains("default_missing") && message.contains("node n1"),
        "{message}"
    );
    assert!(s.unexpected.is_empty(), "{:?}", s.unexpected);
    drop(s);

    // The prefetch tier is reloaded live: the next restore is staged into NVMe.
    std::fs::write(
        dir.path().join("agent.toml"),
        "[policy]\nrestore_prefetch_tier = \"nvme\"\n",
    )
    .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while ctl(&["config", "show"])["values"]["policy.restore_prefetch_tier"]["value"] != "\"nvme\""
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the edit was never applied: {}\n{}",
            ctl(&["config", "show"]),
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    deliver_restore(&state, restore_object("r3", "default_cp9"));
    wait_until("the Staged status of r3", &state, &log, |s| {
        !restore_patches(s, "r3").is_empty()
    });
    let staged = restore_patches(&state.lock().unwrap(), "r3")[0].clone();
    assert_eq!(staged["staging"]["tier"], "nvme", "{staged}");

    // A rejected edit becomes a Warning Event on the Node naming the key and the problem.
    std::fs::write(
        dir.path().join("agent.toml"),
        "[tiers]\nram_budget_bytes = -5\n",
    )
    .unwrap();
    wait_until("the ConfigRejected event", &state, &log, |s| {
        s.events
            .iter()
            .any(|(_, e)| e["reason"] == "ConfigRejected")
    });
    let s = state.lock().unwrap();
    let (path, event) = s
        .events
        .iter()
        .find(|(_, e)| e["reason"] == "ConfigRejected")
        .unwrap();
    assert!(path.starts_with("/apis/events.k8s.io/v1/"), "{path}");
    assert_eq!(event["type"], "Warning", "{event}");
    assert_eq!(event["regarding"]["kind"], "Node", "{event}");
    assert_eq!(event["regarding"]["name"], "n1", "{event}");
    let note = event["note"].as_str().unwrap();
    assert!(note.contains("ram_budget_bytes"), "{note}");
    drop(s);
    assert_eq!(
        ctl(&["config", "show"])["values"]["policy.restore_prefetch_tier"]["value"],
        "\"nvme\"",
        "the agent keeps the previous config"
    );
}

/// Names of the GpuCheckpoints whose status the agent set to `phase`.
fn objects_in_phase(s: &ApiState, phase: &str) -> std::collections::BTreeSet<String> {
    s.patches
        .iter()
        .filter(|(p, b, code)| {
            p.ends_with("/status") && *code == 200 && b["status"]["phase"] == phase
        })
        .filter_map(|(p, _, _)| {
            p.strip_prefix(CHECKPOINTS)
                .map(|n| n.trim_end_matches("/status").to_owned())
        })
        .collect()
}

/// Five GpuCheckpoints of five containers, handed to the node worker at once: each goes
/// through containerd's task API and the shim, one after the other. containerd 1.6 archives
/// the same empty checkpoint directory for each and refuses a blob it holds already, so
/// before the agent judged by its own record only the first one completed. All five must
/// complete, and each must restore: a new container created with the restore annotation
/// continues the checkpointed workload (same epoch, memory intact, counting on).
fn five_gpucheckpoints_in_a_row(release: Release) {
    support::require_root_and_criu();
    let dir = tempfile::Builder::new()
        .prefix("kybernate-row-")
        .tempdir_in("/dev/shm")
        .unwrap();
    let containerd = Containerd::start_release(dir.path(), &dir.path().join("agent.sock"), release);
    let status_dir = dir.path().join("status");
    std::fs::create_dir_all(&status_dir).unwrap();
    let containers: Vec<(String, PathBuf)> = (1..=5)
        .map(|i| {
            let id = format!("kybrow{i}x{:08x}", rand::random::<u32>());
            let status = status_dir.join(format!("w{i}"));
            containerd.run_workload(&id, std::path::Path::new(CTL), 16, &status);
            (id, status)
        })
        .collect();
    let mut checkpoints = std::collections::BTreeMap::new();
    for (i, (id, status)) in containers.iter().enumerate() {
        wait_status(status, |st| st.counter >= 5);
        let name = format!("cp{}", i + 1);
        checkpoints.insert(name.clone(), scheduled_checkpoint(&name, id));
    }
    let state: Shared = Arc::new(Mutex::new(ApiState {
        checkpoints,
        rv: 5,
        ..ApiState::default()
    }));
    let (_agent, socket, log) = start_agent(dir.path(), state.clone(), Some(&containerd.socket));
    wait_until("five Completed or Failed statuses", &state, &log, |s| {
        objects_in_phase(s, "Completed").len() + objects_in_phase(s, "Failed").len() == 5
    });
    {
        let s = state.lock().unwrap();
        let failed: Vec<&Value> = s
            .patches
            .iter()
            .filter(|(_, b, _)| b["status"]["phase"] == "Failed")
            .map(|(_, b, _)| b)
            .collect();
        assert!(failed.is_empty(), "checkpoints failed: {failed:?}");
        assert_eq!(objects_in_phase(&s, "Completed").len(), 5);
        assert!(s.unexpected.is_empty(), "{:?}", s.unexpected);
    }
    let listed = Command::new(CTL)
        .arg("--socket")
        .arg(&socket)
        .args(["--output", "json", "list"])
        .output()
        .unwrap();
    let listed: Value = serde_json::from_slice(&listed.stdout).expect("list JSON");
    assert_eq!(listed.as_array().map(Vec::len), Some(5), "{listed}");

    let epochs: Vec<u64> = containers
        .iter()
        .map(|(_, status)| Status::read(status).unwrap().epoch)
        .collect();
    for (id, status) in &containers {
        containerd.remove(id);
        // Blank the status (same size: CRIU checks the size of files it restores), so
        // only the restored process can fill it again.
        std::fs::write(status, [b' '; kybernate_sample_workload::STATUS_BYTES]).unwrap();
    }
    for (i, ((id, status), epoch)) in containers.iter().zip(epochs).enumerate() {
        let restored = format!("{id}r");
        containerd.run_restored_workload(
            &restored,
            std::path::Path::new(CTL),
            status,
            &format!("default_cp{}", i + 1),
        );
        let first = wait_status(status, |st| st.counter > 0);
        assert_eq!(
            first.epoch,
            epoch,
            "cp{} restored another workload (a restart?)",
            i + 1
        );
        containerd.ctr_ok(&["tasks", "kill", "-s", "SIGUSR1", &restored]);
        let checked = wait_status(status, |st| st.verified > first.verified);
        assert!(checked.memory_ok, "cp{}: memory not intact", i + 1);
        wait_status(status, |st| st.counter > checked.counter + 3);
        containerd.remove(&restored);
    }
}

#[test]
fn containerd_16_node_worker_checkpoints_five_containers_in_a_row() {
    five_gpucheckpoints_in_a_row(Release::V16);
}

#[test]
fn containerd_21_node_worker_checkpoints_five_containers_in_a_row() {
    five_gpucheckpoints_in_a_row(Release::V21);
}
