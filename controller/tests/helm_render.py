"""Renders a Helm chart with Helm's own template engine (the Go SDK inside the PyPI package
helm-python-sdk) and prints {template path: manifest} as JSON.

Usage: helm_render.py CHART RELEASE NAMESPACE
"""
import json
import sys

try:
    import helm_python as helm
except ImportError:
    sys.exit("helm-python-sdk is not installed; run scripts/install-k8s-tools.sh")

chart_dir, release, namespace = sys.argv[1:4]
with helm.Chart.load(chart_dir) as chart:
    rendered = chart.render({}, name=release, namespace=namespace)
json.dump({"helm": helm.helm_sdk_version(), "manifests": rendered}, sys.stdout)
