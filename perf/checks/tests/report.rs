//! The harness's HTML report, rendered in headless Chromium: every chart must draw the data
//! of the run that produced it, and an empty chart must fail the check.

mod support;

use std::path::Path;

fn check(results: &Path, report: &Path, shot: &Path) -> std::process::Output {
    support::python(&[
        "perf/check_report.py",
        results.to_str().unwrap(),
        report.to_str().unwrap(),
        "--shot",
        shot.to_str().unwrap(),
    ])
}

#[test]
fn report_of_a_quick_run_draws_every_chart_with_the_run_data() {
    support::require(&["chromium"]);
    let out = tempfile::tempdir().unwrap();
    let dir = out.path().to_str().unwrap();
    let run = support::python(&[
        "perf/run.py",
        "--quick",
        "--only",
        "agent,scaling",
        "--out",
        dir,
        "--no-results",
    ]);
    let text = support::assert_success("perf/run.py --quick", &run);
    assert!(text.contains("HTML report:"), "{text}");

    let results: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.path().join("results.json")).unwrap()).unwrap();
    for name in ["agent", "scaling"] {
        assert_eq!(
            results["benchmarks"][name]["status"], "ok",
            "benchmark {name} did not run: {}",
            results["benchmarks"][name]
        );
    }
    let sizes = results["benchmarks"]["scaling"]["sizes"]
        .as_array()
        .unwrap();
    assert_eq!(sizes.len(), 3, "the quick scaling run measures three sizes");

    let html = std::fs::read_to_string(out.path().join("report.html")).unwrap();
    for banned in ["http://", "https://", "<link", "src="] {
        assert!(
            !html.contains(banned),
            "the report must be self-contained, found {banned:?}"
        );
    }

    let shot = out.path().join("report.png");
    let checked = check(
        &out.path().join("results.json"),
        &out.path().join("report.html"),
        &shot,
    );
    let text = support::assert_success("perf/check_report.py", &checked);
    assert!(text.contains("every chart drew the run's data"), "{text}");
    assert!(std::fs::metadata(&shot).unwrap().len() > 10_000);

    // The same run with one phase four thousand times shorter than the bars it sits in: it
    // must still show in the screenshot (sub-pixel segments used to vanish into their
    // neighbours, which failed this check on a real run).
    let mut skewed = results;
    for size in skewed["benchmarks"]["scaling"]["sizes"]
        .as_array_mut()
        .unwrap()
    {
        size["checkpoint"]["criu_dump"]["median"] = serde_json::json!(2.0);
        size["checkpoint"]["digest"]["median"] = serde_json::json!(0.0005);
    }
    let skewed_results = out.path().join("skewed.json");
    std::fs::write(&skewed_results, skewed.to_string()).unwrap();
    let skewed_report = out.path().join("skewed.html");
    support::assert_success(
        "perf/report.py",
        &support::python(&[
            "perf/report.py",
            skewed_results.to_str().unwrap(),
            "-o",
            skewed_report.to_str().unwrap(),
        ]),
    );
    let checked = check(
        &skewed_results,
        &skewed_report,
        &out.path().join("skewed.png"),
    );
    let text = support::assert_success("perf/check_report.py on a 0.5 ms phase", &checked);
    assert!(text.contains("every chart drew the run's data"), "{text}");
}

#[test]
fn a_report_without_data_fails_the_check() {
    support::require(&["chromium"]);
    let out = tempfile::tempdir().unwrap();
    let results = out.path().join("results.json");
    std::fs::write(
        &results,
        serde_json::json!({
            "date": "2026-01-01 00:00 UTC",
            "machine": {"cores": 2, "memory_gib": 24, "kernel": "test"},
            "command": "python3 perf/run.py",
            "benchmarks": {
                "agent": {"status": "not present", "description": "agent vs bare CRIU"},
                "scaling": {"status": "failed", "reason": "exit 1", "description": "scaling"}
            }
        })
        .to_string(),
    )
    .unwrap();
    let report = out.path().join("report.html");
    support::assert_success(
        "perf/report.py",
        &support::python(&[
            "perf/report.py",
            results.to_str().unwrap(),
            "-o",
            report.to_str().unwrap(),
        ]),
    );
    let checked = check(&results, &report, &out.path().join("report.png"));
    let text = support::text(&checked);
    assert!(!checked.status.success(), "an empty report passed:\n{text}");
    for chart in [
        "checkpoint-phases",
        "restore-phases",
        "throughput",
        "scaling",
    ] {
        assert!(
            text.contains(&format!("chart {chart}: drew nothing")),
            "{chart} not reported empty:\n{text}"
        );
    }
}
