"""The web client on AWS: the template's one-origin CloudFront distribution, and publish_web.py (moto)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import boto3
import pytest
from aws_support import ROOT, load_script
from moto import mock_aws

pytestmark = pytest.mark.slow

CACHING_DISABLED = "4135ea2d-6df8-44a3-9df3-4b5a84be39ad"
ALL_VIEWER_EXCEPT_HOST = "b689b0a8-53d0-40ab-baf2-68738e2966ac"


def test_cloudfront_serves_web_and_sends_api_paths_to_the_rest_api(translated: dict[str, Any]) -> None:
    resources = translated["Resources"]
    config = resources["WebDistribution"]["Properties"]["DistributionConfig"]
    origins = {origin["Id"]: origin for origin in config["Origins"]}
    assert config["DefaultCacheBehavior"]["TargetOriginId"] == "web"
    assert origins["web"]["OriginAccessControlId"] == {"Fn::GetAtt": ["WebOriginAccessControl", "Id"]}
    api = origins["api"]
    assert "MiniChatApi" in json.dumps(api["DomainName"]) and api["OriginPath"] == {
        "Fn::Sub": "/${Environment}"
    }
    assert {"HeaderName": "X-MiniChat-Origin", "HeaderValue": "cloudfront"} in api["OriginCustomHeaders"]
    (behavior,) = config["CacheBehaviors"]
    assert behavior["PathPattern"] == "/api/*" and behavior["TargetOriginId"] == "api"
    assert behavior["CachePolicyId"] == CACHING_DISABLED
    assert behavior["OriginRequestPolicyId"] == ALL_VIEWER_EXCEPT_HOST  # API Gateway needs its own Host
    assert {"POST", "PATCH", "DELETE"} <= set(behavior["AllowedMethods"])
    assert behavior["Compress"] is False
    # The bucket is private: only this distribution reads it.
    block = resources["WebBucket"]["Properties"]["PublicAccessBlockConfiguration"]
    assert all(block.values())
    (statement,) = resources["WebBucketPolicy"]["Properties"]["PolicyDocument"]["Statement"]
    assert statement["Principal"] == {"Service": "cloudfront.amazonaws.com"}
    assert statement["Action"] == "s3:GetObject"
    assert "WebDistribution" in json.dumps(statement["Condition"])


@mock_aws
def test_publish_web_uploads_the_client_prunes_and_invalidates(tmp_path: Path) -> None:
    publish_web = load_script("infra/deploy/publish_web.py")
    s3 = boto3.client("s3", region_name="us-east-1")
    cloudfront = boto3.client("cloudfront", region_name="us-east-1")
    s3.create_bucket(Bucket="minichat-web")
    s3.put_object(Bucket="minichat-web", Key="old.js", Body=b"gone")
    distribution = cloudfront.create_distribution(
        DistributionConfig={
            "CallerReference": "t",
            "Comment": "",
            "Enabled": True,
            "Origins": {
                "Quantity": 1,
                "Items": [
                    {
                        "Id": "web",
                        "DomainName": "minichat-web.s3.amazonaws.com",
                        "S3OriginConfig": {"OriginAccessIdentity": ""},
                    }
                ],
            },
            "DefaultCacheBehavior": {
                "TargetOriginId": "web",
                "ViewerProtocolPolicy": "redirect-to-https",
                "CachePolicyId": CACHING_DISABLED,
            },
        }
    )["Distribution"]["Id"]

    done = publish_web.publish(s3=s3, cloudfront=cloudfront, bucket="minichat-web", distribution=distribution)

    expected = {
        p.relative_to(ROOT / "web").as_posix()
        for p in (ROOT / "web").glob("*.*")
        if p.suffix in {".html", ".js", ".css"}
    }
    assert set(done["uploaded"]) == expected and "index.html" in expected
    keys = {item["Key"] for item in s3.list_objects_v2(Bucket="minichat-web")["Contents"]}
    assert keys == expected  # old.js removed, README/package.json never uploaded
    assert done["removed"] == ["old.js"]
    index = s3.get_object(Bucket="minichat-web", Key="index.html")
    assert index["ContentType"].startswith("text/html") and index["CacheControl"] == "no-cache"
    script = s3.get_object(Bucket="minichat-web", Key="app.js")
    assert script["ContentType"].startswith("text/javascript")
    assert script["Body"].read() == (ROOT / "web" / "app.js").read_bytes()
    invalidations = cloudfront.list_invalidations(DistributionId=distribution)["InvalidationList"]
    assert invalidations["Quantity"] == 1
