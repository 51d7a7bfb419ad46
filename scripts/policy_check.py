"""The Kubernetes policy scan: checkov, offline, on deploy/ and on the Helm chart rendered
with its defaults. Every finding must be listed with its reason in
deploy/policy/exceptions.yaml, and every entry there must still match a finding, so the file
stays the complete, current list of what we accept and why.

Usage: policy_check.py CHECKOV [DEPLOY_DIR]
Run it with a Python that has PyYAML (checkov's own). DEPLOY_DIR (default deploy/) holds the
manifests, the chart (helm/kybernate) and policy/exceptions.yaml.
"""
import json
import pathlib
import subprocess
import sys
import tempfile

import yaml

ROOT = pathlib.Path(__file__).resolve().parent.parent


def findings(checkov, directory):
    """{(check, "Kind/name")} of the failed checks in directory."""
    out = subprocess.run(
        [checkov, "-d", str(directory), "--framework", "kubernetes", "--skip-download",
         "--quiet", "--compact", "-o", "json"],
        capture_output=True, text=True, check=False)
    if out.returncode not in (0, 1):
        sys.exit(f"checkov failed on {directory}:\n{out.stderr}")
    reports = json.loads(out.stdout)
    if isinstance(reports, dict):
        reports = [reports]
    if not any("results" in report for report in reports):
        sys.exit(f"checkov found no Kubernetes objects in {directory}")
    found = set()
    for report in reports:
        if report["summary"].get("parsing_errors"):
            sys.exit(f"checkov could not parse a manifest in {directory}")
        for failed in report["results"]["failed_checks"]:
            kind, _namespace, name = failed["resource"].split(".", 2)
            found.add((failed["check_id"], f"{kind}/{name}"))
    return found


def render_chart(chart, into):
    """Writes the chart's default rendering (Helm's own engine) into the directory `into`."""
    out = subprocess.run(
        ["python3", str(ROOT / "controller/tests/helm_render.py"), str(chart), "kybernate",
         "kybernate-system"],
        capture_output=True, text=True, check=False)
    if out.returncode != 0:
        sys.exit(f"rendering the Helm chart failed:\n{out.stderr}")
    for template, text in json.loads(out.stdout)["manifests"].items():
        (into / template.replace("/", "_")).write_text(text)


def main():
    checkov = sys.argv[1]
    # checkov finds nothing in a directory named through "..": resolve it.
    deploy = (pathlib.Path(sys.argv[2]) if len(sys.argv) > 2 else ROOT / "deploy").resolve()
    exceptions = yaml.safe_load((deploy / "policy/exceptions.yaml").read_text())
    accepted = {(e["check"], e["object"]) for e in exceptions}
    missing_reason = [e for e in exceptions if not str(e.get("reason", "")).strip()]
    if missing_reason:
        sys.exit(f"exceptions without a reason: {missing_reason}")
    failed = False
    with tempfile.TemporaryDirectory() as rendered:
        rendered = pathlib.Path(rendered)
        render_chart(deploy / "helm/kybernate", rendered)
        for label, directory in [("deploy/", deploy), ("the Helm chart", rendered)]:
            found = findings(checkov, directory)
            problems = [
                f"{check} on {obj} is not an accepted exception (fix it, or add it with its "
                "reason to deploy/policy/exceptions.yaml)"
                for check, obj in sorted(found - accepted)
            ] + [
                f"the exception {check} on {obj} no longer matches a finding; remove it from "
                "deploy/policy/exceptions.yaml"
                for check, obj in sorted(accepted - found)
            ]
            for problem in problems:
                print(f"{label}: {problem}")
            if not problems:
                print(f"{label}: {len(found)} findings, each an accepted exception")
            failed = failed or bool(problems)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
