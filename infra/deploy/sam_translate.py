"""Print template.yaml as the CloudFormation JSON that SAM's transform makes of it (no AWS call).

    .venv/aws-tools/bin/python infra/deploy/sam_translate.py [template.yaml] > translated.json

Runs with the AWS tools' interpreter (aws-sam-translator comes with the SAM CLI). The tests read the
result to check what is deployed, not what is written: the REST API's paths and integrations, the MQ
event source mappings, the IAM policies.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from samcli.yamlhelper import yaml_parse
from samtranslator.translator.transform import transform


class _NoManagedPolicies:
    """SAM asks IAM for managed policy ARNs by name; the template names none, so nothing to look up."""

    def load(self) -> dict[str, str]:
        return {}


_LOCAL_PATHS = {
    "AWS::Serverless::Function": "CodeUri",
    "AWS::Serverless::LayerVersion": "ContentUri",
}


def translate(path: Path) -> dict[str, Any]:
    # The transform fills in pseudo-parameters (the partition) from the session's region: any will do.
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    template = yaml_parse(path.read_text())
    # As `sam validate` does: local code paths become S3 URIs (sam deploy uploads them there).
    for resource in template.get("Resources", {}).values():
        key = _LOCAL_PATHS.get(resource.get("Type"))
        value = resource.get("Properties", {}).get(key) if key else None
        if isinstance(value, str) and not value.startswith("s3://"):
            resource["Properties"][key] = f"s3://minichat-artifacts/{value}"
    return transform(template, {}, _NoManagedPolicies())


if __name__ == "__main__":
    source = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parents[2] / "template.yaml")
    json.dump(translate(source), sys.stdout, indent=1, sort_keys=True, default=str)
