"""Child process for the crash test: rewrite one JSON file forever, each version self-checking."""

import hashlib
import sys

from trainguard.atomic import atomic_write_json

path = sys.argv[1]
size = int(sys.argv[2])
i = 0
print("ready", flush=True)
while True:
    i += 1
    payload = (f"{i:08d}" * (size // 8 + 1))[:size]
    atomic_write_json(path, {"i": i, "payload": payload, "sha256": hashlib.sha256(payload.encode()).hexdigest()})
