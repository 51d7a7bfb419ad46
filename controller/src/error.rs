//! The controller's error type, with one metric label per variant.

/// A reconcile failed (the object is retried with backoff).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A Kubernetes API call failed.
    #[error("{action} {kind} {namespace}/{name}: {source}")]
    Kube {
        /// What we tried: get, patch, create, delete, list.
        action: &'static str,
        /// Object kind.
        kind: &'static str,
        /// Namespace.
        namespace: String,
        /// Object name.
        name: String,
        /// The client error (boxed: it is large and errors are rare).
        #[source]
        source: Box<kube::Error>,
    },
    /// An object without a namespace reached a namespaced reconciler.
    #[error("{kind} {name} has no namespace")]
    NoNamespace {
        /// Object kind.
        kind: &'static str,
        /// Object name.
        name: String,
    },
    /// A checkpoint being deleted is still needed; its finalizer stays (not a failure: the
    /// object is looked at again after a fixed interval, without backoff).
    #[error("{namespace}/{name} is still needed by {user}")]
    StillReferenced {
        /// Namespace.
        namespace: String,
        /// The checkpoint.
        name: String,
        /// Who needs it.
        user: String,
    },
    /// The finalizer helper refused an object (it has no name).
    #[error("finalizer {finalizer} on {kind} {namespace}/{name}: {reason}")]
    Finalizer {
        /// The finalizer.
        finalizer: &'static str,
        /// Object kind.
        kind: &'static str,
        /// Namespace.
        namespace: String,
        /// Object name.
        name: String,
        /// What went wrong.
        reason: String,
    },
    /// A pod could not be built from a template or captured spec.
    #[error("cannot build pod for {owner}: {reason}")]
    PodBuild {
        /// The GpuRestore or GpuWorkload.
        owner: String,
        /// Why.
        reason: String,
    },
}

impl Error {
    /// Short label for the `kybernate_controller_errors_total` metric.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::Kube { action, .. } => match *action {
                "get" => "kube_get",
                "patch" => "kube_patch",
                "create" => "kube_create",
                "delete" => "kube_delete",
                "list" => "kube_list",
                _ => "kube_other",
            },
            Self::NoNamespace { .. } => "no_namespace",
            Self::StillReferenced { .. } => "still_referenced",
            Self::Finalizer { .. } => "finalizer",
            Self::PodBuild { .. } => "pod_build",
        }
    }
}

/// Adds object context to a kube call's error.
pub(crate) fn kube_err(
    action: &'static str,
    kind: &'static str,
    namespace: &str,
    name: &str,
) -> impl FnOnce(kube::Error) -> Error {
    let namespace = namespace.to_owned();
    let name = name.to_owned();
    move |source| Error::Kube {
        action,
        kind,
        namespace,
        name,
        source: Box::new(source),
    }
}

/// Unwraps the finalizer helper's error: a reconcile's own error stays as it is, a failed
/// finalizer patch becomes a [`Error::Kube`] naming the object.
pub(crate) fn finalizer_err(
    finalizer: &'static str,
    kind: &'static str,
    namespace: &str,
    name: &str,
) -> impl FnOnce(kube::runtime::finalizer::Error<Error>) -> Error {
    use kube::runtime::finalizer::Error as F;
    let namespace = namespace.to_owned();
    let name = name.to_owned();
    move |error| match error {
        F::ApplyFailed(e) | F::CleanupFailed(e) => e,
        F::AddFinalizer(source) | F::RemoveFinalizer(source) => Error::Kube {
            action: "patch",
            kind: "finalizers",
            namespace,
            name,
            source: Box::new(source),
        },
        other => Error::Finalizer {
            finalizer,
            kind,
            namespace,
            name,
            reason: other.to_string(),
        },
    }
}
