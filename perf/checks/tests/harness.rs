//! perf/run.py's plug-in convention, with stand-in benchmarks in a scratch directory: absent
//! benchmarks are listed as "not present", ratios come from each benchmark's own baseline,
//! RESULTS.md gets the machine and the exact commands, and a failing benchmark fails the run.

mod support;

use std::path::Path;
use std::process::Command;

/// A stand-in benchmark following the convention: ours 1.5 s against a 3.0 s baseline.
const STAND_IN: &str = r#"
import json, sys
out = sys.argv[sys.argv.index("--json") + 1]
row = {"metric": "stand-in copy", "unit": "s", "bytes": 3000000000,
       "ours": {"label": "ours", "median": 1.5, "min": 1.4, "max": 1.7, "values": [1.4, 1.5, 1.7]},
       "baseline": {"label": "cp", "median": 3.0, "min": 2.9, "max": 3.1, "values": [2.9, 3.0, 3.1]}}
doc = {"name": "agent", "title": "stand-in", "command": "python3 bench_agent.py --runs 3",
       "comparisons": [row], "section": "bench_agent",
       "markdown": "<!-- bench_agent:start -->\nstand-in section\n<!-- bench_agent:end -->"}
json.dump(doc, open(out, "w"))
print("measured")
"#;

fn harness(bench_dir: &Path, out: &Path, only: &str) -> std::process::Output {
    Command::new("python3")
        .arg("perf/run.py")
        .arg("--bench-dir")
        .arg(bench_dir)
        .arg("--out")
        .arg(out.join("out"))
        .arg("--results")
        .arg(out.join("RESULTS.md"))
        .args(["--only", only])
        .current_dir(support::repo())
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .output()
        .expect("run python3 perf/run.py")
}

#[test]
fn harness_tabulates_ratios_lists_absent_benchmarks_and_fails_on_a_broken_one() {
    let benches = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    std::fs::write(benches.path().join("bench_agent.py"), STAND_IN).unwrap();
    std::fs::write(
        benches.path().join("bench_broken.py"),
        "import sys\nprint('cannot measure')\nsys.exit(3)\n",
    )
    .unwrap();

    let run = harness(benches.path(), out.path(), "agent,dataplane,shim,scaling");
    let text = support::assert_success("perf/run.py", &run);
    assert!(
        text.contains("0.50×"),
        "ratio ours/baseline missing:\n{text}"
    );
    for absent in ["dataplane", "shim", "scaling"] {
        assert!(
            text.lines()
                .any(|l| l.starts_with(absent) && l.contains("not present")),
            "{absent} not listed as not present:\n{text}"
        );
    }
    let results = std::fs::read_to_string(out.path().join("RESULTS.md")).unwrap();
    for needle in [
        "stand-in section",
        "<!-- run:start -->",
        "cores",
        "GiB, Linux",
        "`python3 bench_agent.py --runs 3`",
        "| agent | stand-in copy | ours 1.500 (1.400–1.700) | cp 3.000 (2.900–3.100) | 0.50× |",
        "dataplane: not present",
    ] {
        assert!(
            results.contains(needle),
            "RESULTS.md lacks {needle:?}:\n{results}"
        );
    }
    let html = std::fs::read_to_string(out.path().join("out/report.html")).unwrap();
    assert!(
        html.contains("not present"),
        "report hides absent benchmarks"
    );
    assert!(
        html.contains(
            r#"data-series="ours" data-label="agent: stand-in copy" data-value="2.000000""#
        ),
        "throughput bar of the stand-in (3 GB in 1.5 s) missing"
    );

    let run = harness(benches.path(), out.path(), "broken");
    let text = support::text(&run);
    assert!(!run.status.success(), "a failing benchmark passed:\n{text}");
    assert!(
        text.contains("benchmarks failed: broken") && text.contains("cannot measure"),
        "{text}"
    );
}
