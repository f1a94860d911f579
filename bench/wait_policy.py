"""Benchmark 4b: how long the API server's OpenMP threads spin once idle, and what a text query pays.

    python bench/wait_policy.py [--size 250000] [--queries 100] [--rounds 2] [--first N]

A text query encodes its text on every core (torch, on the encoder's one text thread), then scans the
product codes on every core (faiss). OpenMP threads that keep spinning once the encoding is done take
a core from the scan; threads that sleep at once must be woken for each of the encoder's hundreds of
small parallel steps. Each variant serves the synthetic collection of `--size` images
(bench/synthetic.py) with `python api.py` under that OpenMP environment (one variant also encodes
texts with ONNX Runtime, `TEXT_RUNTIME=onnx`); one client sends the same
captions over HTTP as bench/scale.py does, and the server's Server-Timing header splits each request
into encoding, ranking and pictures. The client's own encoding of the same captions (this process,
OpenMP's defaults, one caption after another) is bench/scale.py's "encode p50". The variants run
`--rounds` times, interleaved; the medians of all rounds are reported.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import requests
from common import markdown_table, percentile, report
from query_latency import captions, paired, post_search
from scale import first_pass, measured_server
from synthetic import synthetic_collection

from clip_encoder import ClipEncoder

VARIANTS = {
    "GOMP_SPINCOUNT=100000 (api.py's default)": {"OMP_WAIT_POLICY": "", "GOMP_SPINCOUNT": "100000"},
    "GOMP_SPINCOUNT=100000, TEXT_RUNTIME=onnx": {
        "OMP_WAIT_POLICY": "",
        "GOMP_SPINCOUNT": "100000",
        "TEXT_RUNTIME": "onnx",
    },
    "OMP_WAIT_POLICY=PASSIVE (before)": {"OMP_WAIT_POLICY": "PASSIVE"},
    "GOMP_SPINCOUNT=30000": {"OMP_WAIT_POLICY": "", "GOMP_SPINCOUNT": "30000"},
    "GOMP_SPINCOUNT=300000 (libgomp's default)": {"OMP_WAIT_POLICY": "", "GOMP_SPINCOUNT": "300000"},
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=250000)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--first", type=int, default=len(VARIANTS), help="run only the first N variants (the default first)"
    )
    return parser.parse_args()


def measure(
    variant: dict[str, str], texts: list[str], encoder: ClipEncoder, size: int
) -> dict[str, list[float]]:
    settings = synthetic_collection(size).settings(RATE_LIMIT_PER_MINUTE=0, API_THREADS=4)
    stages: dict[str, list[float]] = defaultdict(list)
    with measured_server(settings, variant) as server, requests.Session() as session:
        first_pass(server.url)  # the product codes ready
        pairs = [
            (
                lambda t=text: encoder.encode_texts([t]),
                post_search(session, server.url, {"query": text, "top_k": 10}, stages),
            )
            for text in texts
        ]
        client_ms, http_ms = paired(pairs)
        measured = {stage: values[-len(texts) :] for stage, values in stages.items()}  # no warm-up
        return {"http": http_ms, "client encode": client_ms, **measured}


def main() -> None:
    args = parse_args()
    texts = captions(args.queries)
    encoder = ClipEncoder(str(synthetic_collection(args.size).settings().MODEL_NAME), "cpu")
    results: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for _ in range(args.rounds):
        for label, variant in list(VARIANTS.items())[: args.first]:
            for name, values in measure(variant, texts, encoder, args.size).items():
                results[label][name] += values
            time.sleep(1)
    rows = []
    for label, measured in results.items():
        http, client = percentile(measured["http"], 50), percentile(measured["client encode"], 50)
        encode = percentile(measured["encode"], 50)
        rows.append(
            [
                args.size,
                label,
                http,
                percentile(measured["http"], 99),
                client,
                http - client,
                encode,
                percentile(measured["rank"], 50),
                percentile(measured["pictures"], 50),
                http - encode,
            ]
        )
    table = markdown_table(
        [
            "images",
            "server's OpenMP",
            "text p50 ms",
            "p99 ms",
            "client encode p50",
            "p50 - client encode",
            "server encode p50",
            "server rank p50",
            "server pictures p50",
            "p50 - server encode",
        ],
        rows,
    )
    notes = [
        f"{args.rounds} rounds of {args.queries} captions per variant, interleaved; the client encodes "
        "with OpenMP's defaults. Server stages from its Server-Timing header; the rest of a request "
        "(Flask, JSON, HTTP) is text p50 - the three stages.",
    ]
    report("API server: OpenMP wait policy", [table], notes, "ViT-B/32 architecture (512-d)")


if __name__ == "__main__":
    main()
