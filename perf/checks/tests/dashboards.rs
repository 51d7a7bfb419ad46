//! Every panel of perf/dashboards/*.json, evaluated by a real Prometheus that scraped a real
//! agent through checkpoints, restores and a failure.

mod support;

#[test]
fn every_dashboard_query_is_valid_returns_data_and_names_exported_metrics() {
    support::require(&["prometheus"]);
    let out = support::python(&["perf/check_dashboards.py"]);
    let text = support::assert_success("perf/check_dashboards.py", &out);
    assert!(
        text.contains("every dashboard query is valid and returns data"),
        "{text}"
    );
    // Both dashboards were read and their panels queried (a file that parsed to nothing
    // would otherwise pass).
    for dashboard in ["kybernate-latency.json", "kybernate-storage.json"] {
        assert!(
            text.contains(&format!("ok  {dashboard}: ")),
            "no query of {dashboard} was checked:\n{text}"
        );
    }
}
