//! Reconcile tests against the scripted API server.

mod checkpoint;
mod conditions;
mod crdgen;
mod fencing;
mod lease;
mod restore;
mod schedule;
mod workload;

/// Path of a namespaced custom object in `default`.
fn kyb(plural: &str, name: &str) -> String {
    format!("/apis/kybernate.io/v1alpha1/namespaces/default/{plural}/{name}")
}

/// Path of a core object in `default`.
fn core(plural: &str, name: &str) -> String {
    format!("/api/v1/namespaces/default/{plural}/{name}")
}

fn node_path(name: &str) -> String {
    format!("/api/v1/nodes/{name}")
}
