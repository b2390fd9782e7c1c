"""Product code uses the public APIs of Ray and MLflow (the private ones replaced in issue 13).

A private API stays only where nothing public works, with a comment saying why; these have
public replacements, so none may come back.
"""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
PRODUCT_CODE = ("pipelines", "components", "serving")
FORBIDDEN = {
    "_internal=True": "Serve's internal Deployment.options flag: switch versions through user_config",
    "ray.train.v2.api": "Ray Train's internal module path: import from ray.train",
    "_to_mlflow_entity": "MLflow's private dataset conversion: build mlflow.entities.Dataset or use log_input",
    "_get_global_client": "Serve's private client: use serve.status() / serve.start()",
}


def test_no_private_api_in_product_code():
    hits = []
    for folder in PRODUCT_CODE:
        for path in sorted((REPO / folder).rglob("*.py")):
            for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                hits += [
                    f"{path.relative_to(REPO)}:{lineno}: {needle} ({why})"
                    for needle, why in FORBIDDEN.items()
                    if needle in line
                ]
    assert not hits, "private APIs in product code:\n" + "\n".join(hits)
