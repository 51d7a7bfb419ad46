//! The committed CRDs in deploy/crds match the Rust types, and the schemas carry the
//! validation the API server must enforce.

use std::path::PathBuf;

use kybernate_api as api;

fn crds_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/crds")
}

#[test]
fn committed_crds_match_the_rust_types() {
    for (file, def) in api::all() {
        let path = crds_dir().join(file);
        let committed = std::fs::read_to_string(&path).unwrap_or_else(|e| {
            panic!(
                "{} is missing ({e}); run `cargo run -p kybernate-controller --bin crdgen -- --out deploy/crds --out deploy/helm/kybernate/crds`",
                path.display()
            )
        });
        let generated = api::render(&def).unwrap();
        assert!(
            committed == generated,
            "{} drifted from the Rust types; run `cargo run -p kybernate-controller --bin crdgen -- --out deploy/crds --out deploy/helm/kybernate/crds`",
            path.display()
        );
    }
}

fn schema(
    def: &k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
) -> serde_json::Value {
    let v = serde_json::to_value(def).unwrap();
    v["spec"]["versions"][0]["schema"]["openAPIV3Schema"].clone()
}

#[test]
fn schemas_require_fields_restrict_enums_and_carry_cel_rules() {
    use kube::CustomResourceExt;
    let cp = schema(&api::GpuCheckpoint::crd());
    let spec = &cp["properties"]["spec"];
    assert_eq!(spec["required"], serde_json::json!(["podName"]));
    assert_eq!(
        spec["properties"]["storageTier"]["enum"],
        serde_json::json!(["ram", "nvme", "s3"])
    );
    let rules = serde_json::to_string(&spec["x-kubernetes-validations"]).unwrap();
    assert!(rules.contains("self == oldSelf"), "{rules}");
    let status = &cp["properties"]["status"]["properties"];
    assert_eq!(
        status["phase"]["enum"],
        serde_json::json!([
            "Pending",
            "Scheduled",
            "Checkpointing",
            "Draining",
            "Completed",
            "Failed"
        ])
    );
    let wl = schema(&api::GpuWorkload::crd());
    let spec = &wl["properties"]["spec"];
    let required: Vec<String> = serde_json::from_value(spec["required"].clone()).unwrap();
    assert!(required.contains(&"template".into()) && required.contains(&"schedule".into()));
    assert_eq!(
        spec["properties"]["schedule"]["properties"]["intervalSeconds"]["minimum"].as_f64(),
        Some(60.0)
    );
    let rs = schema(&api::GpuRestore::crd());
    assert_eq!(
        rs["properties"]["spec"]["required"],
        serde_json::json!(["checkpointName"])
    );
    for def in [
        api::GpuCheckpoint::crd(),
        api::GpuRestore::crd(),
        api::GpuWorkload::crd(),
    ] {
        let v = serde_json::to_value(&def).unwrap();
        assert_eq!(v["spec"]["scope"], "Namespaced");
        assert_eq!(v["spec"]["group"], "kybernate.io");
        assert!(v["spec"]["versions"][0]["subresources"]["status"].is_object());
        assert!(
            v["spec"]["versions"][0]["additionalPrinterColumns"]
                .as_array()
                .unwrap()
                .len()
                >= 4
        );
    }
}

#[test]
fn conditions_are_a_list_map_keyed_by_type_so_two_writers_merge() {
    use kube::CustomResourceExt;
    for def in [
        api::GpuCheckpoint::crd(),
        api::GpuRestore::crd(),
        api::GpuWorkload::crd(),
    ] {
        let status = &schema(&def)["properties"]["status"]["properties"];
        let conditions = &status["conditions"];
        assert_eq!(conditions["x-kubernetes-list-type"], "map", "{conditions}");
        assert_eq!(
            conditions["x-kubernetes-list-map-keys"],
            serde_json::json!(["type"])
        );
        let required: Vec<String> =
            serde_json::from_value(conditions["items"]["required"].clone()).unwrap();
        assert!(
            required.contains(&"type".to_owned()),
            "a list-map key must be required: {required:?}"
        );
    }
}

#[test]
fn grants_are_cluster_scoped_and_refuse_malformed_namespaces() {
    use kube::CustomResourceExt;
    let def = api::GpuCheckpointGrant::crd();
    let v = serde_json::to_value(&def).unwrap();
    assert_eq!(
        v["spec"]["scope"], "Cluster",
        "tenants must not grant themselves"
    );
    let spec = &schema(&def)["properties"]["spec"];
    let required: Vec<String> = serde_json::from_value(spec["required"].clone()).unwrap();
    assert!(required.contains(&"from".into()) && required.contains(&"to".into()));
    let from = &spec["properties"]["from"];
    let rules = serde_json::to_string(&from["x-kubernetes-validations"]).unwrap();
    assert!(
        rules.contains("has(self.__namespace__)") && rules.contains("nodeLocal"),
        "{rules}"
    );
    let namespace = &from["properties"]["namespace"];
    let targets = &spec["properties"]["to"]["properties"]["namespaces"];
    assert_eq!(targets["minItems"], 1, "{targets}");
    for field in [namespace, &targets["items"]] {
        assert_eq!(field["maxLength"], 63, "{field}");
        assert_eq!(
            field["pattern"], "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$",
            "an RFC 1123 label, as namespaces are"
        );
    }
    for good in ["a", "tenant-a", "x1"] {
        assert!(api::is_namespace_name(good), "{good}");
    }
    for bad in ["", "-a", "a-", "Tenant", "a_b", "a.b"] {
        assert!(!api::is_namespace_name(bad), "{bad:?} must be refused");
    }
}
