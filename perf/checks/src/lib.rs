//! The checks of `perf/` live in this crate's integration tests so that the workspace's test
//! command (`cargo nextest run --workspace`) runs them: `tests/dashboards.rs` proves every
//! Grafana panel in `perf/dashboards/` against a real Prometheus scraping a real agent, and
//! `tests/report.rs` renders the harness's HTML report in headless Chromium and checks that
//! every chart drew the run's data. The work is done by the Python tools next to the
//! benchmarks (`perf/check_dashboards.py`, `perf/check_report.py`, `perf/run.py`); the tests
//! start them with the agent binaries of this build and fail loudly when a tool is missing.
