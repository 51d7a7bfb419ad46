//! The Helm chart renders, with its default values, the same objects as the plain
//! manifests (except the Namespace, which `helm install --create-namespace` makes).
//!
//! Helm is not packaged for Debian 12. The chart is rendered twice: by Helm's own template
//! engine (Helm v4's Go SDK, shipped as a shared library in the PyPI package
//! `helm-python-sdk`, installed by scripts/install-k8s-tools.sh and driven by
//! `tests/helm_render.py`), and by an in-repo renderer for
//! exactly the subset of the template language the chart uses: `{{ .Values.a.b }}`,
//! `{{ .Release.Namespace }}`, `{{- .Values.x | nindent N }}` and
//! `{{- toYaml .Values.x | nindent N }}`, with `{{-`/`-}}` whitespace trimming. Any other
//! action fails the test, so the chart cannot silently grow past what is checked here.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;
use serde_json::Value;

const NAMESPACE: &str = "kybernate-system";

fn deploy() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

fn chart() -> PathBuf {
    deploy().join("helm/kybernate")
}

fn lookup<'a>(values: &'a Value, path: &str) -> &'a Value {
    let rest = path
        .strip_prefix(".Values.")
        .unwrap_or_else(|| panic!("unsupported reference {path}"));
    let v = rest.split('.').fold(values, |v, key| &v[key]);
    assert!(!v.is_null(), "{path} is not in values.yaml");
    v
}

fn scalar(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        other => panic!("not a scalar: {other}"),
    }
}

fn nindent(text: &str, n: usize) -> String {
    let pad = " ".repeat(n);
    let body: Vec<String> = text
        .trim_end_matches('\n')
        .lines()
        .map(|l| {
            if l.is_empty() {
                String::new()
            } else {
                format!("{pad}{l}")
            }
        })
        .collect();
    format!("\n{}", body.join("\n"))
}

fn action(expr: &str, values: &Value) -> String {
    let parts: Vec<&str> = expr.split('|').map(str::trim).collect();
    let (value, pipe) = match parts.as_slice() {
        [v] => (*v, None),
        [v, p] => (*v, Some(*p)),
        _ => panic!("unsupported pipeline {expr:?}"),
    };
    let text = if value == ".Release.Namespace" {
        NAMESPACE.to_owned()
    } else if let Some(path) = value.strip_prefix("toYaml ") {
        serde_yaml::to_string(lookup(values, path.trim())).unwrap()
    } else {
        scalar(lookup(values, value))
    };
    match pipe {
        None => text,
        Some(p) => {
            let n = p
                .strip_prefix("nindent ")
                .unwrap_or_else(|| panic!("unsupported function {p:?}"))
                .parse()
                .unwrap();
            nindent(&text, n)
        }
    }
}

/// Renders one template.
fn render(template: &str, values: &Value) -> String {
    let mut out = String::new();
    let mut rest = template;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let end = rest[start..].find("}}").expect("unclosed action") + start;
        let mut inner = &rest[start + 2..end];
        if let Some(trimmed) = inner.strip_prefix('-') {
            inner = trimmed;
            let keep = out.trim_end().len();
            out.truncate(keep);
        }
        let trim_after = inner.ends_with('-');
        let inner = inner.trim_end_matches('-').trim();
        out.push_str(&action(inner, values));
        rest = &rest[end + 2..];
        if trim_after {
            rest = rest.trim_start();
        }
    }
    out.push_str(rest);
    out
}

fn docs(text: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(text)
        .map(|d| Value::deserialize(d).unwrap())
        .filter(|v| !v.is_null())
        .collect()
}

fn key(v: &Value) -> String {
    format!(
        "{}/{}",
        v["kind"].as_str().unwrap(),
        v["metadata"]["name"].as_str().unwrap()
    )
}

/// The objects of deploy/*.yaml except the Namespace (`helm install --create-namespace`).
fn plain_manifests() -> BTreeMap<String, Value> {
    let mut plain = BTreeMap::new();
    for entry in std::fs::read_dir(deploy()).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml") && !path.ends_with("kustomization.yaml") {
            for doc in docs(&std::fs::read_to_string(&path).unwrap()) {
                if doc["kind"] != "Namespace" {
                    plain.insert(key(&doc), doc);
                }
            }
        }
    }
    plain
}

fn assert_same_objects(rendered: &BTreeMap<String, Value>, by: &str) {
    let plain = plain_manifests();
    assert_eq!(
        rendered.keys().collect::<Vec<_>>(),
        plain.keys().collect::<Vec<_>>(),
        "the chart ({by}) and deploy/ hold different objects"
    );
    for (k, doc) in &plain {
        assert_eq!(
            &rendered[k], doc,
            "{k} differs between the chart ({by}) and deploy/"
        );
    }
}

#[test]
fn chart_defaults_render_the_plain_manifests() {
    let values: Value =
        serde_yaml::from_str(&std::fs::read_to_string(chart().join("values.yaml")).unwrap())
            .unwrap();
    let mut rendered = BTreeMap::new();
    for entry in std::fs::read_dir(chart().join("templates")).unwrap() {
        let path = entry.unwrap().path();
        let text = render(&std::fs::read_to_string(&path).unwrap(), &values);
        for doc in docs(&text) {
            rendered.insert(key(&doc), doc);
        }
    }
    assert_same_objects(&rendered, "in-repo renderer");
}

#[test]
fn helm_itself_renders_the_chart_defaults_as_the_plain_manifests() {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/helm_render.py");
    let out = std::process::Command::new("python3")
        .arg(&script)
        .arg(chart())
        .args(["kybernate", NAMESPACE])
        .output()
        .expect("python3 is needed to drive Helm's template engine");
    assert!(
        out.status.success(),
        "Helm render failed (is helm-python-sdk installed? run scripts/install-k8s-tools.sh): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let reply: Value = serde_json::from_slice(&out.stdout).expect("helm_render.py JSON");
    assert!(
        reply["helm"].as_str().unwrap().starts_with("v4."),
        "{}",
        reply["helm"]
    );
    let mut rendered = BTreeMap::new();
    for (template, text) in reply["manifests"].as_object().unwrap() {
        for doc in docs(text.as_str().unwrap()) {
            let previous = rendered.insert(key(&doc), doc);
            assert!(previous.is_none(), "{template} repeats an object");
        }
    }
    assert_same_objects(&rendered, "helm");
}

#[test]
fn chart_crds_are_the_generated_ones() {
    for entry in std::fs::read_dir(deploy().join("crds")).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap();
        let in_chart = std::fs::read_to_string(chart().join("crds").join(name))
            .unwrap_or_else(|e| panic!("chart lacks crds/{name:?}: {e}"));
        assert!(
            in_chart == std::fs::read_to_string(&path).unwrap(),
            "chart crds/{name:?} differs from deploy/crds; run crdgen with --out for both"
        );
    }
}

#[test]
fn renderer_refuses_what_it_does_not_understand() {
    let values = serde_json::json!({"a": "x"});
    assert_eq!(render("k: {{ .Values.a }}", &values), "k: x");
    let refused = std::panic::catch_unwind(|| render("{{ if .Values.a }}y{{ end }}", &values));
    assert!(refused.is_err());
}
