//! A scripted Kubernetes API server on loopback for an agent started with `--node-name n1`:
//! it serves the node worker's watches (no GpuCheckpoints or GpuRestores; the
//! GpuCheckpointGrants a test adds), accepts its Node label patch, and records every Event
//! posted and every request it did not expect.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::http::{Method, StatusCode, Uri};
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_stream::StreamExt;

/// What the server holds and saw.
#[derive(Default)]
pub struct ApiState {
    /// GpuCheckpointGrants by name.
    pub grants: BTreeMap<String, Value>,
    grant_watchers: Vec<mpsc::UnboundedSender<Value>>,
    /// Pods of node n1.
    pub pods: Vec<Value>,
    pod_watches: usize,
    /// Other watches, held open with no events.
    idle_watchers: Vec<mpsc::UnboundedSender<Value>>,
    /// (path, body) of every Event posted.
    pub events: Vec<(String, Value)>,
    /// Requests the server has no answer for.
    pub unexpected: Vec<String>,
    rv: u64,
}

impl ApiState {
    /// Whether the agent has listed and now watches grants and pods (its stores are filled).
    pub fn watching(&self) -> bool {
        !self.grant_watchers.is_empty() && self.pod_watches > 0
    }
}

/// The server; it runs until the test process ends.
#[derive(Clone)]
pub struct KubeApi {
    pub state: Arc<Mutex<ApiState>>,
    port: u16,
}

impl KubeApi {
    /// Starts the server on a free loopback port.
    pub fn start() -> Self {
        let state = Arc::new(Mutex::new(ApiState::default()));
        let (tx, rx) = std::sync::mpsc::channel();
        let served = state.clone();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                tx.send(listener.local_addr().unwrap().port()).unwrap();
                let app =
                    axum::Router::new().fallback(move |m: Method, u: Uri, b: axum::body::Bytes| {
                        handle(served.clone(), m, u, b)
                    });
                axum::serve(listener, app).await.unwrap();
            });
        });
        let port = rx.recv().unwrap();
        Self { state, port }
    }

    /// Writes a kubeconfig pointing at this server into `path`.
    pub fn write_kubeconfig(&self, path: &Path) {
        std::fs::write(
            path,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: mock\n  cluster:\n    server: http://127.0.0.1:{}\n\
                 users:\n- name: u\n  user:\n    token: test\ncontexts:\n- name: c\n  context:\n    cluster: mock\n    user: u\n\
                 current-context: c\n",
                self.port
            ),
        )
        .unwrap();
    }

    /// Adds a grant and tells the watches.
    pub fn add_grant(&self, grant: Value) {
        let mut s = self.state.lock().unwrap();
        s.rv += 1;
        let name = grant["metadata"]["name"].as_str().unwrap().to_owned();
        s.grants.insert(name, grant.clone());
        let line = json!({"type": "ADDED", "object": grant});
        s.grant_watchers.retain(|w| w.send(line.clone()).is_ok());
    }

    /// Serves a pod of node n1 (from the first list on: add pods before the agent starts).
    pub fn add_pod(&self, namespace: &str, name: &str, uid: &str, service_account: &str) {
        self.state.lock().unwrap().pods.push(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": namespace, "uid": uid, "resourceVersion": "1"},
            "spec": {"nodeName": "n1", "serviceAccountName": service_account,
                     "containers": [{"name": "c", "image": "busybox"}]},
        }));
    }

    /// The Events posted with `reason`.
    pub fn events(&self, reason: &str) -> Vec<Value> {
        let s = self.state.lock().unwrap();
        s.events
            .iter()
            .filter(|(_, e)| e["reason"] == reason)
            .map(|(_, e)| e.clone())
            .collect()
    }
}

fn list(kind: &str, rv: u64, items: Vec<Value>) -> Value {
    json!({"apiVersion": "kybernate.io/v1alpha1", "kind": format!("{kind}List"),
           "metadata": {"resourceVersion": rv.to_string()}, "items": items})
}

async fn handle(
    state: Arc<Mutex<ApiState>>,
    method: Method,
    uri: Uri,
    body: axum::body::Bytes,
) -> (StatusCode, Body) {
    let path = uri.path().to_owned();
    let query = uri.query().unwrap_or_default().to_owned();
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let reply = |code: u16, v: Value| {
        (
            StatusCode::from_u16(code).unwrap(),
            Body::from(v.to_string()),
        )
    };
    let watch = query.contains("watch=true");
    let mut s = state.lock().unwrap();
    let rv = s.rv;
    match (method.as_str(), path.as_str()) {
        ("GET", "/apis/kybernate.io/v1alpha1/gpucheckpointgrants") if watch => {
            let (tx, rx) = mpsc::unbounded_channel();
            s.grant_watchers.push(tx);
            (StatusCode::OK, watch_body(rx))
        }
        ("GET", "/apis/kybernate.io/v1alpha1/gpucheckpointgrants") => {
            let items = s.grants.values().cloned().collect();
            reply(200, list("GpuCheckpointGrant", rv, items))
        }
        (
            "GET",
            "/apis/kybernate.io/v1alpha1/gpucheckpoints"
            | "/apis/kybernate.io/v1alpha1/gpurestores",
        ) if watch => {
            let (tx, rx) = mpsc::unbounded_channel();
            s.idle_watchers.push(tx);
            (StatusCode::OK, watch_body(rx))
        }
        ("GET", "/apis/kybernate.io/v1alpha1/gpucheckpoints") => {
            reply(200, list("GpuCheckpoint", rv, Vec::new()))
        }
        ("GET", "/apis/kybernate.io/v1alpha1/gpurestores") => {
            reply(200, list("GpuRestore", rv, Vec::new()))
        }
        ("GET", "/api/v1/pods") if query.contains("fieldSelector=spec.nodeName%3Dn1") => {
            if watch {
                let (tx, rx) = mpsc::unbounded_channel();
                s.idle_watchers.push(tx);
                s.pod_watches += 1;
                return (StatusCode::OK, watch_body(rx));
            }
            let items = s.pods.clone();
            reply(
                200,
                json!({"apiVersion": "v1", "kind": "PodList",
                       "metadata": {"resourceVersion": rv.to_string()}, "items": items}),
            )
        }
        ("PATCH", "/api/v1/nodes/n1") => reply(
            200,
            json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n1"}}),
        ),
        ("POST", p) if p.ends_with("/events") => {
            s.events.push((path.clone(), body.clone()));
            reply(201, body)
        }
        _ => {
            s.unexpected.push(format!("{method} {path}?{query}"));
            reply(
                404,
                json!({"kind": "Status", "apiVersion": "v1", "metadata": {},
                       "status": "Failure", "reason": "NotFound", "code": 404}),
            )
        }
    }
}

/// A body that yields watch events as they are queued and stays open.
fn watch_body(rx: mpsc::UnboundedReceiver<Value>) -> Body {
    let events = tokio_stream::wrappers::UnboundedReceiverStream::new(rx)
        .map(|event| Ok::<_, std::io::Error>(format!("{event}\n")));
    Body::from_stream(events)
}
