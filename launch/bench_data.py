"""Data pipeline benchmark: preprocessing and loader throughput against bare baselines.

1. Preprocessing: ``python -m data_tools.preprocess --workers W`` end to end
   (interpreter start, read JSON lines, tokenize, val split, write tar shards,
   checksums, index) versus
   ``tokenizers``' own ``encode_batch`` on the same texts in one process (Rust
   threads on all cores), already in memory. Goal: ratio >= 0.8.
2. Loader: ``TrainBatches.step_batches()`` (global order, packing, int64 tensors)
   in one process versus slicing the same number of tokens as windows out of a
   flat numpy memmap of the train split and converting them the same way.
   Goal: >= 1M tokens/s per process.
3. With ``--remote``: the same loader over HTTP. ``python -m http.server`` (another
   process) serves the shards on 127.0.0.1; one epoch of the train split is read
   from a cold cache (the clock includes opening: manifest, tokenizer, index
   sidecars, then every shard fetched, verified and published), then again from the
   warm cache (a new loader, as a restarted run would), next to the local
   memory-mapped loader over the same epoch and to what training consumes:
   ``launch/pretrain.py --config configs/tiny.yaml`` on these shards, its
   ``tokens_per_s`` once warm. Goal: cold and warm each >= 50x training.

Usage: ``python launch/bench_data.py [--mb 16] [--workers 2] [--seq-len 2048] [--remote] [--output F.json]``
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from data_tools.megatron import export_megatron  # noqa: E402
from data_tools.stdlib_corpus import build_corpus  # noqa: E402
from data_tools.train_tokenizer import load_tokenizer, train_tokenizer  # noqa: E402
from megalm.config.schema import DataConfig  # noqa: E402
from megalm.data import TrainBatches, load_manifest, open_split  # noqa: E402
from megalm.train.metrics import read_metrics  # noqa: E402


def bench_preprocess(work: Path, mb: float, workers: int, vocab: int, shard_tokens: int) -> dict:
    corpus, n_docs, n_bytes = build_corpus(work / "corpus", max_mb=mb)
    tok_path = train_tokenizer([str(corpus)], vocab, work / "tok")
    texts = [json.loads(line)["text"] for line in corpus.read_text().splitlines()]
    tok = load_tokenizer(tok_path)
    tok.encode_batch(texts[:8], add_special_tokens=False)  # warm the thread pool
    t0 = time.perf_counter()
    raw_tokens = sum(len(e.ids) for e in tok.encode_batch(texts, add_special_tokens=False))
    raw_s = time.perf_counter() - t0
    t0 = time.perf_counter()  # the CLI as users run it: interpreter start to manifest written
    cmd = [
        sys.executable,
        "-m",
        "data_tools.preprocess",
        "--input",
        str(corpus),
        "--tokenizer",
        str(tok_path),
        "--output",
        str(work / "shards"),
        "--workers",
        str(workers),
        "--shard-tokens",
        str(shard_tokens),
        "--val-fraction",
        "0.01",
    ]
    subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True)
    ours_s = time.perf_counter() - t0
    ours_tokens = sum(s["tokens"] for s in load_manifest(work / "shards").shards)
    assert ours_tokens == raw_tokens, (ours_tokens, raw_tokens)
    return {
        "documents": n_docs,
        "bytes": n_bytes,
        "tokens": raw_tokens,
        "raw_encode_batch_tok_s": raw_tokens / raw_s,
        "preprocess_tok_s": ours_tokens / ours_s,
        "preprocess_s": ours_s,
        "raw_s": raw_s,
        "ratio": raw_s / ours_s,
    }


def bench_loader(shards: Path, seq_len: int, micro: int, seconds: float) -> dict:
    manifest = load_manifest(shards)
    export_megatron(shards, str(shards / "flat"), "train", append_eos=True)  # the same EOS-joined stream
    flat = np.memmap(shards / "flat.bin", dtype=np.dtype(manifest.dtype), mode="r")
    windows = open_split(manifest, "train", seq_len)
    loader = TrainBatches(windows, 0, micro, micro, 0, 1)

    def ours() -> int:
        ((x, _),) = loader.step_batches()
        return x.numel()

    order = np.random.default_rng(0).permutation(len(windows))
    state = {"i": 0}

    def memmap() -> int:
        idx = order[np.arange(state["i"], state["i"] + micro) % len(order)]
        state["i"] += micro
        w = torch.from_numpy(
            np.stack([flat[i * seq_len : i * seq_len + seq_len + 1] for i in idx]).astype(np.int64)
        )
        x = w[:, :-1]
        return x.numel()

    out = {"windows": len(windows), "seq_len": seq_len, "micro_batch": micro}
    for name, fn in (("loader", ours), ("memmap", memmap), ("loader_2", ours), ("memmap_2", memmap)):
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            n += fn()
        out[f"{name}_tok_s"] = n / (time.perf_counter() - t0)
    out["loader_tok_s"] = max(out.pop("loader_2_tok_s"), out["loader_tok_s"])
    out["memmap_tok_s"] = max(out.pop("memmap_2_tok_s"), out["memmap_tok_s"])
    out["ratio"] = out["loader_tok_s"] / out["memmap_tok_s"]
    return out


@contextmanager
def http_server(root: Path) -> Iterator[str]:
    """``python -m http.server`` serving ``root`` on a free port of 127.0.0.1; yields its URL."""
    cmd = [sys.executable, "-u", "-m", "http.server", "0", "--bind", "127.0.0.1", "--directory", str(root)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        port = re.search(r"port (\d+)", proc.stdout.readline())[1]
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait()


def _epoch_tok_s(manifest_of, seq_len: int, micro: int) -> tuple[float, int]:
    """Tokens/s of opening the train split (``manifest_of()``) and reading one epoch of it."""
    t0 = time.perf_counter()
    windows = open_split(manifest_of(), "train", seq_len)
    loader = TrainBatches(windows, 0, micro, micro, 0, 1)
    tokens = 0
    for _ in range(len(windows) // micro):
        ((x, _),) = loader.step_batches()
        tokens += x.numel()
    return tokens / (time.perf_counter() - t0), tokens


def bench_remote(shards: Path, work: Path, seq_len: int, micro: int) -> dict:
    """Loader tokens/s from HTTP with a cold and a warm cache, and from local memory maps."""
    out = {}
    with http_server(shards) as url:
        data = DataConfig(dir=url, cache_dir=str(work / "cache"))
        remote = lambda: load_manifest(url, data)  # noqa: E731
        out["cold_tok_s"], out["epoch_tokens"] = _epoch_tok_s(remote, seq_len, micro)
        out["warm_tok_s"], _ = _epoch_tok_s(remote, seq_len, micro)
    out["local_tok_s"], _ = _epoch_tok_s(lambda: load_manifest(shards), seq_len, micro)
    out["shards"] = len(load_manifest(shards).split("train"))
    out["shard_bytes"] = sum(s["bytes"] for s in load_manifest(shards).split("train"))
    return out


def bench_training(shards: Path, work: Path, steps: int) -> float:
    """Tokens/s ``configs/tiny.yaml`` trains at on these shards (mean of the records after the first)."""
    cmd = [
        sys.executable,
        str(ROOT / "launch" / "pretrain.py"),
        "--config",
        str(ROOT / "configs" / "tiny.yaml"),
        f"data.dir={shards}",
        f"run.dir={work / 'tiny'}",
        f"training.max_steps={steps}",
        f"training.log_interval={max(1, steps // 3)}",
        f"training.eval_interval={steps}",
        f"training.save_interval={steps}",
        "training.sample_tokens=0",
    ]
    subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True)
    records = [r for r in read_metrics(work / "tiny" / "metrics.jsonl") if "tokens_per_s" in r]
    return float(np.mean([r["tokens_per_s"] for r in records[1:]]))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mb", type=float, default=16.0, help="stdlib corpus size")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--shard-tokens", type=int, default=2_000_000)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--seconds", type=float, default=3.0, help="per loader measurement")
    p.add_argument("--remote", action="store_true", help="also: the loader over HTTP, cold and warm cache")
    p.add_argument("--train-steps", type=int, default=30, help="--remote: tiny.yaml steps to time training")
    p.add_argument("--output", type=Path, default=Path("runs/bench_data.json"))
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        pre = bench_preprocess(Path(tmp), args.mb, args.workers, args.vocab_size, args.shard_tokens)
        load = bench_loader(Path(tmp) / "shards", args.seq_len, args.micro_batch, args.seconds)
        remote = None
        if args.remote:
            remote = bench_remote(Path(tmp) / "shards", Path(tmp), args.seq_len, args.micro_batch)
            remote["train_tok_s"] = bench_training(Path(tmp) / "shards", Path(tmp), args.train_steps)
    result = {
        "cpus": os.cpu_count(),
        "workers": args.workers,
        "preprocess": pre,
        "loader": load,
        "remote": remote,
        "goals": {"preprocess_ratio": 0.8, "loader_tok_s": 1e6, "remote_over_training": 50},
    }
    rows = [
        (
            "preprocess, tok/s",
            f"{pre['preprocess_tok_s']:,.0f}",
            f"{pre['raw_encode_batch_tok_s']:,.0f}",
            f"{pre['ratio']:.2f}",
            ">= 0.8",
        ),
        (
            "loader, tok/s/process",
            f"{load['loader_tok_s']:,.0f}",
            f"{load['memmap_tok_s']:,.0f}",
            f"{load['ratio']:.2f}",
            ">= 1M tok/s",
        ),
    ]
    print(
        f"corpus {pre['bytes'] / 1e6:.1f} MB, {pre['documents']} documents, {pre['tokens']:,} tokens; "
        f"{args.workers} workers on {os.cpu_count()} CPUs; loader T={args.seq_len} micro={args.micro_batch}"
    )
    print(f"{'':24}{'megalm':>14}{'baseline':>14}{'ratio':>8}  goal")
    for name, ours, base, ratio, goal in rows:
        print(f"{name:24}{ours:>14}{base:>14}{ratio:>8}  {goal}")
    print("baselines: tokenizers encode_batch (in memory, all cores); numpy memmap window slicing")
    if remote:
        print_remote(remote)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.output}")


def print_remote(r: dict) -> None:
    """The --remote table: each loader figure and its ratio to tiny.yaml's training consumption."""
    print(
        f"\nremote: {r['shards']} train shards, {r['shard_bytes'] / 1e6:.1f} MB, one epoch = "
        f"{r['epoch_tokens']:,} tokens, served by python -m http.server on 127.0.0.1"
    )
    print(f"{'loader, tok/s/process':32}{'tok/s':>14}{'/ training':>12}  goal")
    for name, key in (("http, cold cache (incl. open)", "cold_tok_s"), ("http, warm cache", "warm_tok_s")):
        print(f"{name:32}{r[key]:>14,.0f}{r[key] / r['train_tok_s']:>11,.0f}x  >= 50x")
    print(f"{'local memory maps':32}{r['local_tok_s']:>14,.0f}{r['local_tok_s'] / r['train_tok_s']:>11,.0f}x")
    print(f"{'training, configs/tiny.yaml':32}{r['train_tok_s']:>14,.0f}{1:>11}x")


if __name__ == "__main__":
    main()
