"""Start `lowbit serve` on a free loopback port, send one chat completion with the official openai
client, print the reply, and stop the server. Shows exactly how any OpenAI client points at lowbit."""
from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import time

import httpx
from openai import OpenAI


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--question", default="What is the capital of France? Answer in one sentence.")
    args = ap.parse_args()
    port = free_port()
    cmd = [sys.executable, "-m", "lowbit.cli", "serve", "--model", args.model, "--port", str(port),
           "--served-model-name", "smollm2-awq"]
    print("$", " ".join(cmd[2:]).replace("lowbit.cli", "lowbit"), flush=True)
    server = subprocess.Popen(cmd)
    try:
        base = f"http://127.0.0.1:{port}"
        for _ in range(600):
            if server.poll() is not None:
                print("server exited early", file=sys.stderr)
                return 1
            try:
                if httpx.get(base + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        client = OpenAI(base_url=base + "/v1", api_key="not-needed")
        reply = client.chat.completions.create(
            model="smollm2-awq", messages=[{"role": "user", "content": args.question}], max_tokens=64, temperature=0
        )
        print(f"\nuser: {args.question}\nassistant: {reply.choices[0].message.content}")
        print(f"usage: {reply.usage.prompt_tokens} prompt + {reply.usage.completion_tokens} completion tokens")
        print(f"\nPoint any OpenAI client at it: OpenAI(base_url='{base}/v1', api_key='...')")
        return 0
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    sys.exit(main())
