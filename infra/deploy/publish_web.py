"""Upload the web client (web/) to the stack's bucket and refresh CloudFront: the fourth deploy step.

    python3 infra/deploy/publish_web.py --stack-name minichat-dev
    python3 infra/deploy/publish_web.py --bucket BUCKET --distribution ID     # without the stack lookup

The stack's outputs WebBucketName and WebDistributionId say where (template.yaml, WebHosting=cloudfront).
Files go up with their content type; index.html is revalidated on every load (it names the scripts), the
rest may be cached for an hour. Objects no longer in web/ are removed. Then one invalidation of `/*`.
"""

from __future__ import annotations

import argparse
import mimetypes
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
WEB = ROOT / "web"
# What the browser needs; the rest of web/ (README, package.json for the tests) is not served.
SERVED = {".html", ".js", ".css", ".svg", ".png", ".ico", ".webmanifest"}
TYPES = {
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".html": "text/html; charset=utf-8",
}


def web_files(folder: Path = WEB) -> list[Path]:
    """The files of the web client, relative to `folder`."""
    return sorted(
        p.relative_to(folder)
        for p in folder.rglob("*")
        if p.is_file() and p.suffix in SERVED and "node_modules" not in p.parts
    )


def stack_outputs(cloudformation: Any, stack_name: str) -> dict[str, str]:
    (stack,) = cloudformation.describe_stacks(StackName=stack_name)["Stacks"]
    return {o["OutputKey"]: o["OutputValue"] for o in stack.get("Outputs", [])}


def publish(
    *, s3: Any, cloudfront: Any, bucket: str, distribution: str, folder: Path = WEB
) -> dict[str, Any]:
    """Upload, prune, invalidate; returns what was done."""
    files = web_files(folder)
    for relative in files:
        key = relative.as_posix()
        content_type = (
            TYPES.get(relative.suffix) or mimetypes.guess_type(key)[0] or "application/octet-stream"
        )
        cache = "no-cache" if key == "index.html" else "public, max-age=3600"
        s3.put_object(
            Bucket=bucket,
            Key=key,
            Body=(folder / relative).read_bytes(),
            ContentType=content_type,
            CacheControl=cache,
        )
    keep = {relative.as_posix() for relative in files}
    stale: list[str] = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        stale += [item["Key"] for item in page.get("Contents", []) if item["Key"] not in keep]
    for start in range(0, len(stale), 1000):
        s3.delete_objects(
            Bucket=bucket, Delete={"Objects": [{"Key": k} for k in stale[start : start + 1000]]}
        )
    invalidation = cloudfront.create_invalidation(
        DistributionId=distribution,
        InvalidationBatch={"Paths": {"Quantity": 1, "Items": ["/*"]}, "CallerReference": str(time.time_ns())},
    )
    return {"uploaded": sorted(keep), "removed": stale, "invalidation": invalidation["Invalidation"]["Id"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stack-name")
    parser.add_argument("--bucket")
    parser.add_argument("--distribution")
    args = parser.parse_args()
    import boto3

    bucket, distribution = args.bucket, args.distribution
    if args.stack_name:
        outputs = stack_outputs(boto3.client("cloudformation"), args.stack_name)
        bucket = bucket or outputs.get("WebBucketName")
        distribution = distribution or outputs.get("WebDistributionId")
    if not bucket or not distribution:
        parser.error(
            "no bucket or distribution: deploy with WebHosting=cloudfront,"
            " or pass --bucket and --distribution"
        )
    done = publish(
        s3=boto3.client("s3"), cloudfront=boto3.client("cloudfront"), bucket=bucket, distribution=distribution
    )
    print(f"uploaded {len(done['uploaded'])} files to s3://{bucket}, removed {len(done['removed'])}")
    print(f"invalidation {done['invalidation']} on {distribution}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
