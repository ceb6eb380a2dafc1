"""The data pipeline at scale: `prepare` on synthetic corpora of 100 MB and 1 GB (more with --sizes).

For each corpus, in a fresh process each: prepare wall time, tokens/s, peak RSS (main process and
the largest worker), cache bytes per token, and the time to the first optimizer step of a tiny
model training from the prepared data. On the largest corpus, a prepare with a 10M-token budget
and the fraction of the file it read. And the tokenizer's own batched throughput in one process,
the reference for "at least 80% of it times the processes used". Targets: issue 11, BENCHMARKS.md.

The corpus: English sentences of the builtin corpus, 5-40 per document (about 2 KB), one document
per line, seeded. The tokenizer: the demo model's (SmolLM2, a 49,152-entry byte-level BPE, so
uint16 ids), converted once from its GGUF file; `--tokenizer tiny` uses the 512-entry test one.

    python bench/data_pipeline.py                       # 100M and 1G, in /tmp/layermoe-bench-data
    python bench/data_pipeline.py --sizes 100M,1G,4G    # more
    python bench/data_pipeline.py --sizes 20M           # a quick smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GENS = {"en": 1}


def parse_size(text: str) -> int:
    units = {"K": 1e3, "M": 1e6, "G": 1e9}
    return int(float(text[:-1]) * units[text[-1].upper()]) if text[-1].upper() in units else int(text)


def make_corpus(path: Path, size: int, seed: int = 0) -> None:
    import numpy as np

    from layermoe.data import builtin_corpus_path

    if path.is_file() and path.stat().st_size >= size:
        return
    with open(builtin_corpus_path(), encoding="utf-8") as f:
        sentences = np.array([line.rstrip("\n").split("\t", 1)[1] for line in f if line.startswith("en\t")], dtype=object)
    rng = np.random.default_rng(seed)
    tmp = path.with_suffix(".tmp")
    written = 0
    with open(tmp, "w", encoding="utf-8") as out:
        while written < size:
            counts = rng.integers(5, 41, size=500)
            picks = rng.integers(0, len(sentences), size=int(counts.sum()))
            ends = np.cumsum(counts)
            docs = [" ".join(sentences[picks[e - c:e]]) for c, e in zip(counts, ends)]
            text = "\n".join(docs) + "\n"
            out.write(text)
            written += len(text.encode("utf-8"))
    os.replace(tmp, path)


def bench_tokenizer(data_dir: Path, which: str) -> Path:
    """The tokenizer as a directory (converted once), so every job loads it in a fraction of a second."""
    target = data_dir / f"tokenizer-{which}"
    if not (target / "tokenizer_config.json").is_file():
        if which == "tiny":
            from layermoe.testing import make_tiny_tokenizer

            tok = make_tiny_tokenizer()
        else:
            from transformers import AutoTokenizer

            from layermoe.modeling.base import demo_model_path

            gguf = demo_model_path()
            tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        tok.save_pretrained(target)
    return target


def tiny_model(data_dir: Path, tokenizer_dir: Path) -> Path:
    """A 2-layer expanded model whose vocabulary fits the tokenizer: what `train` would load, but tiny."""
    target = data_dir / f"model-{tokenizer_dir.name}"
    if (target / "config.json").is_file():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from layermoe.modeling import save_layermoe, upcycle
    from layermoe.testing import make_tiny_config

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    dense = AutoModelForCausalLM.from_config(make_tiny_config("llama", vocab_size=len(tok)))
    save_layermoe(upcycle(dense, [1, 1], classifier_layers=[0]), target, tok)
    return target


# ---------------------------------------------------------------- jobs (each in its own process)


def _peak_rss_mib() -> tuple[float, float]:
    """(this process, its largest finished child) peak resident set, MiB."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    child = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return own, child


class _PssSampler:
    """The largest total proportional set size (shared pages split among their users) of this process and
    its children, sampled every 0.5 s: RSS counts the pages forked workers share with the main process
    once per process, PSS once in all."""

    def __init__(self):
        import threading

        self.peak, self.stop = 0, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _pss_kib(self, pid: int) -> int:
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    return int(line.split()[1])
        except (OSError, ValueError):
            pass
        return 0

    def _run(self):
        me = os.getpid()
        while not self.stop.wait(0.5):
            try:
                children = [int(p) for p in Path(f"/proc/{me}/task/{me}/children").read_text().split()]
            except OSError:
                children = []
            self.peak = max(self.peak, sum(self._pss_kib(p) for p in [me, *children]))

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


def _cpu_s(who) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def evict(path: Path) -> None:
    """Drop a file's pages from the page cache, so that `resident_bytes` afterwards shows what was read."""
    os.sync()
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def resident_bytes(path: Path) -> int | None:
    """Bytes of the file in the page cache (util-linux `fincore`), or None without it."""
    try:
        out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
                             capture_output=True, text=True, check=True).stdout
        return int(out.split()[0])
    except (OSError, subprocess.CalledProcessError, ValueError, IndexError):
        return None


def job_prepare(a: dict) -> dict:
    from transformers import AutoTokenizer

    from layermoe.data import DataSelection, Source, prepare

    tok = AutoTokenizer.from_pretrained(a["tokenizer"])
    selection = DataSelection(stage=1, tokens_per_language=a.get("budget"))
    cpu_main, cpu_workers, start = _cpu_s(resource.RUSAGE_SELF), _cpu_s(resource.RUSAGE_CHILDREN), time.perf_counter()
    with _PssSampler() as pss:
        prepared = prepare({"en": Source("en", a["corpus"])}, GENS, 1, selection, tok, a["root"], num_proc=a["num_proc"],
                           show_progress=False)
    wall = time.perf_counter() - start
    cpu_main, cpu_workers = _cpu_s(resource.RUSAGE_SELF) - cpu_main, _cpu_s(resource.RUSAGE_CHILDREN) - cpu_workers
    stats = prepared.meta["stats"][0]
    own, child = _peak_rss_mib()
    cache = sum(f.stat().st_size for f in prepared.path.iterdir())
    return {"wall_s": wall, "tokens": prepared.num_tokens, "documents": prepared.meta["num_documents"],
            "tokens_per_s": prepared.num_tokens / wall, "source_bytes": stats["source_bytes"],
            "bytes_read": stats["bytes_read"], "read_fraction": stats["bytes_read"] / stats["source_bytes"],
            "cpu_s_main": cpu_main, "cpu_s_workers": cpu_workers,
            "tokens_per_cpu_s": prepared.num_tokens / max(cpu_main + cpu_workers, 1e-9),
            "documents_read": stats["documents_read"], "peak_rss_main_mib": own, "peak_rss_worker_mib": child,
            "peak_pss_all_mib": pss.peak / 1024,
            "cache_bytes": cache, "cache_bytes_per_token": cache / prepared.num_tokens, "dtype": prepared.meta["dtype"],
            "prepared": str(prepared.path)}


def job_first_step(a: dict) -> dict:
    started = a["launched"]
    import torch

    torch.set_num_threads(1)
    from layermoe.data import PackedData, block_indices, open_prepared
    from layermoe.training.config import TrainConfig
    from layermoe.training.loop import train_stage

    called = time.time()
    data = PackedData(open_prepared(a["prepared"]), 1024, 0)  # what train_stage does with the data, alone
    data.batch(block_indices(0, 1, len(data), 0))
    data_s = time.time() - called
    first: dict = {}

    def on_step(record):
        first.setdefault("at", time.time())

    called = time.time()
    config = TrainConfig(stage=1, max_steps=1, seq_len=1024, micro_batch_size=1, checkpoint_every=0, log_every=1)
    result = train_stage(a["model"], Path(a["out"]) / "out", None, GENS, 1, config, Path(a["out"]) / "work",
                         prepared_dir=a["prepared"], on_step=on_step)
    return {"from_launch_s": first["at"] - started, "from_train_stage_s": first["at"] - called,
            "import_s": called - started - data_s, "data_open_and_first_batch_s": data_s, "blocks": result.data["blocks"],
            "peak_rss_main_mib": _peak_rss_mib()[0]}


def job_tokenizer(a: dict) -> dict:
    """The tokenizer alone, batched, one process, one thread: tokens/s on the corpus's first documents."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(a["tokenizer"])
    with open(a["corpus"], encoding="utf-8") as f:
        docs = [line.rstrip("\n") for _, line in zip(range(a["documents"]), f)]
    start, cpu, tokens = time.perf_counter(), time.process_time(), 0
    for i in range(0, len(docs), 128):
        tokens += sum(map(len, tok(docs[i:i + 128], add_special_tokens=True, return_attention_mask=False)["input_ids"]))
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    return {"tokens_per_s": tokens / wall, "tokens_per_cpu_s": tokens / cpu,
            "bytes_per_s": sum(len(d.encode()) for d in docs) / wall,
            "bytes_per_token": sum(len(d.encode()) for d in docs) / tokens}


JOBS = {"prepare": job_prepare, "first_step": job_first_step, "tokenizer": job_tokenizer}


def run_job(name: str, args: dict) -> dict:
    args = {**args, "launched": time.time()}
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1",
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    load = os.getloadavg()[0]
    proc = subprocess.run([sys.executable, __file__, "--job", name, json.dumps(args)], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"job {name} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["load_before"], result["load_after"] = load, os.getloadavg()[0]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="100M,1G")
    parser.add_argument("--data-dir", type=Path, default=Path("/tmp/layermoe-bench-data"))
    parser.add_argument("--tokenizer", choices=["demo", "tiny"], default="demo")
    parser.add_argument("--num-proc", type=int, default=None)
    parser.add_argument("--budget", type=int, default=10_000_000, help="token budget of the reading test (largest corpus)")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument("--job", nargs=2, help=argparse.SUPPRESS)
    ns = parser.parse_args()
    if ns.job:
        print(json.dumps(JOBS[ns.job[0]](json.loads(ns.job[1]))))
        return

    from layermoe.data import usable_cores

    num_proc = ns.num_proc or usable_cores()
    ns.data_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = bench_tokenizer(ns.data_dir, ns.tokenizer)
    model = tiny_model(ns.data_dir, tokenizer)
    sizes = [s.strip() for s in ns.sizes.split(",")]
    results = {"machine": {"cores": usable_cores(), "num_proc": num_proc, "load_at_start": os.getloadavg()},
               "tokenizer": ns.tokenizer, "corpora": {}}
    for size in sizes:
        corpus = ns.data_dir / f"corpus-{size}.txt"
        make_corpus(corpus, parse_size(size))
        root = ns.data_dir / f"prepared-{size}-{ns.tokenizer}"
        import shutil

        shutil.rmtree(root, ignore_errors=True)
        print(f"[{size}] prepare ...", file=sys.stderr, flush=True)
        prep = run_job("prepare", {"tokenizer": str(tokenizer), "corpus": str(corpus), "root": str(root), "num_proc": num_proc})
        print(f"[{size}] {json.dumps(prep)}", file=sys.stderr, flush=True)
        step = run_job("first_step", {"model": str(model), "prepared": prep["prepared"], "out": str(ns.data_dir / f"train-{size}")})
        shutil.rmtree(ns.data_dir / f"train-{size}", ignore_errors=True)
        print(f"[{size}] first step {json.dumps(step)}", file=sys.stderr, flush=True)
        results["corpora"][size] = {"prepare": prep, "first_step": step}
        shutil.rmtree(root, ignore_errors=True)
    largest = sizes[-1]
    corpus = ns.data_dir / f"corpus-{largest}.txt"
    root = ns.data_dir / f"prepared-budget-{ns.tokenizer}"
    import shutil

    shutil.rmtree(root, ignore_errors=True)
    evict(corpus)
    cached_before = resident_bytes(corpus)
    budget = run_job("prepare", {"tokenizer": str(tokenizer), "corpus": str(corpus), "root": str(root),
                                 "num_proc": num_proc, "budget": ns.budget})
    cached_after = resident_bytes(corpus)
    if cached_after is not None:  # what the page cache says was read, readahead included
        budget["page_cache_fraction"] = (cached_after - cached_before) / corpus.stat().st_size
    shutil.rmtree(root, ignore_errors=True)
    results["budget"] = {"corpus": largest, "tokens_per_language": ns.budget, **budget}
    print(f"[budget] {json.dumps(budget)}", file=sys.stderr, flush=True)
    results["tokenizer_alone"] = run_job("tokenizer", {"tokenizer": str(tokenizer), "corpus": str(ns.data_dir / f"corpus-{sizes[0]}.txt"),
                                                       "documents": 10_000})
    results["machine"]["load_at_end"] = os.getloadavg()
    report(results)
    if ns.out:
        ns.out.write_text(json.dumps(results, indent=1))


def report(results: dict) -> None:
    reference = results["tokenizer_alone"]["tokens_per_s"] * results["machine"]["num_proc"]
    print(f"machine: {results['machine']}; tokenizer {results['tokenizer']}: alone "
          f"{results['tokenizer_alone']['tokens_per_s']:,.0f} tokens/s per process "
          f"({results['tokenizer_alone']['bytes_per_token']:.2f} bytes/token)")
    per_cpu = results["tokenizer_alone"]["tokens_per_cpu_s"]
    print("| corpus | tokens | prepare s | tokens/s | vs tokenizer × procs (wall) | tokens per CPU-s vs tokenizer "
          "| peak RSS main / worker MiB | peak PSS all processes MiB | cache bytes/token "
          "| first step s: from launch / imports / data / train_stage |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for size, r in results["corpora"].items():
        p, s = r["prepare"], r["first_step"]
        print(f"| {size} | {p['tokens']:,} | {p['wall_s']:.1f} | {p['tokens_per_s']:,.0f} | {p['tokens_per_s'] / reference:.0%} "
              f"| {p['tokens_per_cpu_s'] / per_cpu:.0%} | {p['peak_rss_main_mib']:.0f} / {p['peak_rss_worker_mib']:.0f} "
              f"| {p.get('peak_pss_all_mib', float('nan')):.0f} "
              f"| {p['cache_bytes_per_token']:.3f} | {s['from_launch_s']:.1f} / {s['import_s']:.1f} / "
              f"{s['data_open_and_first_batch_s']:.2f} / {s['from_train_stage_s']:.1f} |")
    b = results["budget"]
    cached = f", page cache {b['page_cache_fraction']:.2%}" if "page_cache_fraction" in b else ""
    print(f"budget {b['tokens_per_language']:,} tokens on {b['corpus']}: read {b['read_fraction']:.2%} of the file "
          f"({b['documents_read']:,} documents{cached}), {b['wall_s']:.1f} s, kept {b['tokens']:,} tokens")


if __name__ == "__main__":
    main()
