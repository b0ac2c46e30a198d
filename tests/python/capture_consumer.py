"""A cloud consumer of captured data, written the way Edge Manager fleets wrote them (S3-triggered
functions, notebooks): it knows only the stored objects, never the agent's code.

    capture_consumer.py s3 <endpoint> <bucket> <prefix>   read every .jsonl under the prefix over HTTP
    capture_consumer.py disk <root>                       read every .jsonl under a Disk destination

Prints one JSON object per record: its key, the record's metadata, and each entry's bytes resolved
(embedded data decoded, data-ref fetched) with float32 tensors unpacked by their observedContentType.
"""

import base64
import json
import os
import re
import struct
import sys
import urllib.parse
import urllib.request


def http_get(url):
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read()


def s3_keys(endpoint, bucket, prefix):
    query = urllib.parse.urlencode({"prefix": prefix})
    listing = http_get(f"{endpoint}/{bucket}?{query}").decode()
    return re.findall(r"<Key>([^<]+)</Key>", listing)


def main():
    mode = sys.argv[1]
    if mode == "s3":
        endpoint, bucket, prefix = sys.argv[2:5]
        keys = s3_keys(endpoint, bucket, prefix)

        def read_key(key):
            return http_get(f"{endpoint}/{bucket}/{urllib.parse.quote(key)}")

        def read_ref(ref):
            assert ref.startswith(f"s3://{bucket}/"), ref
            return read_key(ref[len(f"s3://{bucket}/"):])
    else:
        root = sys.argv[2]
        keys = []
        for folder, _, files in os.walk(root):
            keys += [os.path.relpath(os.path.join(folder, f), root) for f in files]

        def read_key(key):
            with open(os.path.join(root, key), "rb") as f:
                return f.read()

        def read_ref(ref):
            assert ref.startswith("file:///"), ref
            with open(ref[len("file://"):], "rb") as f:
                return f.read()

    def entry_bytes(entry):
        if "data-ref" in entry:
            return read_ref(entry["data-ref"])
        if entry["encoding"] == "BASE64":
            return base64.b64decode(entry["data"])
        return entry["data"].encode()

    def describe(entry):
        raw = entry_bytes(entry)
        out = {k: v for k, v in entry.items() if k != "data"}
        out["bytes_base64"] = base64.b64encode(raw).decode()
        match = re.fullmatch(r"Tensor\[FLOAT32; ([0-9, ]+)\]", entry["observedContentType"])
        if match:
            count = 1
            for dim in match.group(1).split(", "):
                count *= int(dim)
            out["floats"] = list(struct.unpack(f"<{count}f", raw))
        return out

    for key in sorted(k for k in keys if k.endswith(".jsonl")):
        for line in read_key(key).decode().splitlines():
            record = json.loads(line)
            summary = {
                "key": key,
                "eventVersion": record["eventVersion"],
                "eventMetadata": record["eventMetadata"],
                "deviceId": record["eventMetadata"]["deviceId"],
            }
            first = (record["deviceFleetInputs"] or [{}])[0]
            if "data" in first and len(base64.b64decode(first["data"])) == 24:
                # Exactly what the published S3-triggered functions did.
                summary["lambda_inputs"] = list(struct.unpack("6f", base64.b64decode(record["deviceFleetInputs"][0]["data"])))
            for field in ("deviceFleetInputs", "deviceFleetOutputs", "deviceFleetAuxiliaryInputs",
                          "deviceFleetAuxiliaryOutputs"):
                summary[field] = [describe(entry) for entry in record[field]]
            print(json.dumps(summary))


main()
