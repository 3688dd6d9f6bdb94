"""`longserve bench serve`: an HTTP load generator for any OpenAI-compatible server (streaming /v1/completions).

Sends --num-prompts streaming completion requests, either all at once, at a Poisson --request-rate, or keeping
--max-concurrency in flight, and reports request throughput, output tokens/s, time to first token (TTFT), time
per output token after the first (TPOT), inter-token latency between streamed chunks (ITL) and end-to-end
latency (mean, median, p90, p99), with the failures and their reasons.

Prompts (--dataset):
  random         random common English words, --input-len tokens each (default 256)
  long           long documents (numbered sentences of random words) ending in a question, --input-len tokens
                 each (default 16384)
  shared-prefix  one common prefix (--prefix-len tokens, default 3/4 of --input-len) + a distinct suffix each
  FILE           a .jsonl / .json file: each entry a prompt string or {"prompt": ..., "max_tokens": N}
Prompt lengths are counted in the server's tokens when it has /tokenize (longserve and vLLM do: one sample is
tokenized to calibrate tokens per word); otherwise approximated as one token per word (common English words
with a leading space are one token in Llama, Qwen and GPT tokenizers). The prompt token counts the server
reports in `usage` are recorded too.

Uses httpx and asyncio only (no server-side packages), so it can load any server from any machine.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import math
import os
import random
import re
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

WORDS = (
    "time year people way day man thing woman life child world school state family student group country problem "
    "hand part place case week company system program question work government number night point home water room "
    "mother area money story fact month lot right study book eye job word business issue side kind head house "
    "service friend father power hour game line end member law car city community name president team minute idea "
    "kid body information back parent face others level office door health person art war history party result "
    "change morning reason research girl guy moment air teacher force education foot boy age policy music market "
    "sense nation plan college interest death experience effect use class control care field development role "
    "effort rate heart drug show leader light voice wife police mind price report decision son view relationship "
    "town road arm difference value building action model season society tax director position player record "
    "paper space ground form event official matter center couple site project activity star table need court "
    "oil situation cost industry figure street image phone data picture practice piece land product doctor wall "
    "patient worker news test movie north love support technology step baby computer type attention film tree "
    "source organization hair window evidence population truth song camera garden river summer winter stone "
    "bridge island forest ocean mountain valley village kitchen letter window garden engine signal pattern"
).split()

DATASETS = ("random", "long", "shared-prefix")
DEFAULT_INPUT_LEN = {"random": 256, "long": 16384, "shared-prefix": 1024}


class ServeBenchError(Exception):
    pass


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-url", required=True, help="the server's root URL, e.g. http://127.0.0.1:8000")
    p.add_argument("--model", default=None, help="model name to send (default: the first of GET /v1/models)")
    p.add_argument("--dataset", default="random",
                   help="random, long, shared-prefix, or a .jsonl/.json file of prompts (default random)")
    p.add_argument("--num-prompts", type=int, default=100, help="requests to send (default 100)")
    rate = p.add_mutually_exclusive_group()
    rate.add_argument("--request-rate", type=float, default=math.inf,
                      help="Poisson arrival rate in requests/s (default inf: all at once)")
    rate.add_argument("--max-concurrency", type=int, default=None, help="keep at most this many requests in flight")
    p.add_argument("--input-len", type=int, default=None,
                   help="prompt length in tokens (default: random 256, long 16384, shared-prefix 1024)")
    p.add_argument("--prefix-len", type=int, default=None,
                   help="shared-prefix: length of the common prefix in tokens (default 3/4 of --input-len)")
    p.add_argument("--output-len", type=int, default=128, help="max_tokens per request (default 128)")
    p.add_argument("--no-ignore-eos", action="store_true",
                   help="do not send ignore_eos=true (for servers that reject the field; outputs may end early)")
    p.add_argument("--json-schema", default=None, metavar="PATH",
                   help="send response_format json_schema with the JSON schema in this file in every request "
                        "(structured outputs; compare output tokens/s with and without it)")
    p.add_argument("--api-key", default=None,
                   help="Bearer token (default: $LONGSERVE_API_KEY or $OPENAI_API_KEY when set)")
    p.add_argument("--timeout", type=float, default=1800.0,
                   help="seconds to wait for any response byte, prefill included (default 1800)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, metavar="PATH", help="write every figure (and each request) as JSON here")


# -------------------------------------------------------------------------------------------- prompts

@dataclass
class Prompt:
    text: str
    approx_tokens: int
    max_tokens: int


def _words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(max(1, n)))


def _document(rng: random.Random, n_words: int) -> str:
    sentences, count, i = [], 0, 0
    while count < n_words:
        k = min(12, n_words - count)
        i += 1
        sentences.append(f"Line {i}: {_words(rng, max(1, k - 2))}.")
        count += k
    return " ".join(sentences)


def approx_tokens(text: str) -> int:
    """Tokens without a tokenizer: words and punctuation marks count one each (BPE tokenizers give common
    English words and marks one token each)."""
    return len(re.findall(r"\w+|[^\w\s]", text))


def make_prompts(dataset: str, num: int, input_len: int | None, prefix_len: int | None, output_len: int,
                 ratios: dict[str, float], seed: int) -> list[Prompt]:
    """ratios: tokens per generated word for plain words ("words") and for documents ("document"), from
    calibrate(); a file's prompts are estimated as approx_tokens(text) * ratios["words"]."""
    rng = random.Random(seed)
    if dataset not in DATASETS:
        return _file_prompts(Path(dataset), num, output_len, ratios["words"])
    n_tokens = input_len or DEFAULT_INPUT_LEN[dataset]
    words = lambda tokens, style="words": max(1, round(tokens / ratios[style]))  # noqa: E731
    prompts = []
    if dataset == "random":
        for _ in range(num):
            prompts.append(Prompt(_words(rng, words(n_tokens)), n_tokens, output_len))
    elif dataset == "long":
        question = " Question: which line mentions the most rivers? Answer:"
        body = max(1, n_tokens - round(approx_tokens(question) * ratios["words"]))
        for _ in range(num):
            prompts.append(Prompt(_document(rng, words(body, "document")) + question, n_tokens, output_len))
    else:
        plen = prefix_len if prefix_len is not None else n_tokens * 3 // 4
        if not 0 <= plen < n_tokens:
            raise ServeBenchError(f"--prefix-len must lie in [0, --input-len) = [0, {n_tokens}), got {plen}")
        prefix = _document(rng, words(plen, "document")) if plen else ""
        for i in range(num):
            head = f" Request {i}: "
            rest = max(1, n_tokens - plen - round(approx_tokens(head) * ratios["words"]))
            prompts.append(Prompt(prefix + head + _words(rng, words(rest)), n_tokens, output_len))
    return prompts


def _file_prompts(path: Path, num: int, output_len: int, tokens_per_word: float) -> list[Prompt]:
    if not path.is_file():
        raise ServeBenchError(f"--dataset {str(path)!r} is neither {', '.join(DATASETS)} nor an existing file")
    text = path.read_text()
    try:
        if path.suffix == ".json":
            entries = json.loads(text)
            if not isinstance(entries, list):
                raise ServeBenchError(f"{path}: expected a JSON list of prompts")
        else:
            entries = [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as e:
        raise ServeBenchError(f"{path}: not valid JSON{' lines' if path.suffix != '.json' else ''}: {e.msg} "
                              f"(line {e.lineno})") from None
    prompts = []
    for i, entry in enumerate(entries):
        if isinstance(entry, dict) and isinstance(entry.get("prompt"), str):
            text_i = entry["prompt"]
            limit = entry.get("max_tokens", entry.get("output_len", output_len))
        elif isinstance(entry, str):
            text_i, limit = entry, output_len
        else:
            raise ServeBenchError(f"{path}: entry {i} is neither a string nor an object with a string 'prompt'")
        if not isinstance(limit, int) or limit < 1:
            raise ServeBenchError(f"{path}: entry {i}: max_tokens must be a positive integer")
        prompts.append(Prompt(text_i, max(1, round(approx_tokens(text_i) * tokens_per_word)), limit))
    if not prompts:
        raise ServeBenchError(f"{path} holds no prompts")
    return [prompts[i % len(prompts)] for i in range(num)]


# ------------------------------------------------------------------------------------------- requests

@dataclass
class RequestResult:
    ok: bool = False
    error: str | None = None
    prompt_tokens: int | None = None  # from the server's usage, when it reports it
    approx_prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: float | None = None  # seconds
    latency: float | None = None
    itl: list[float] = field(default_factory=list)
    start: float = 0.0


async def send_request(client, url: str, headers: dict, payload: dict, result: RequestResult) -> RequestResult:
    result.start = time.perf_counter()
    last = None
    chunks = 0
    usage_tokens = None
    try:
        async with client.stream("POST", url, json=payload, headers=headers) as response:
            if response.status_code != 200:
                body = (await response.aread()).decode(errors="replace")
                result.error = f"HTTP {response.status_code}: {_error_message(body)}"
                return result
            async for line in response.aiter_lines():
                line = line.strip()
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                event = json.loads(data)
                if "error" in event:
                    result.error = f"stream error: {_error_message(json.dumps(event))}"
                    return result
                now = time.perf_counter()
                if event.get("usage"):
                    usage_tokens = event["usage"].get("completion_tokens")
                    result.prompt_tokens = event["usage"].get("prompt_tokens")
                choices = event.get("choices") or []
                if not any(c.get("text") for c in choices):
                    continue
                if last is None:
                    result.ttft = now - result.start
                else:
                    result.itl.append(now - last)
                last = now
                chunks += 1
        result.latency = time.perf_counter() - result.start
        result.output_tokens = usage_tokens if usage_tokens is not None else chunks
        if result.ttft is None:
            result.error = "the stream ended without any text"
            return result
        result.ok = True
    except Exception as e:  # network errors, bad JSON, timeouts: the request failed, the run goes on
        result.error = f"{type(e).__name__}: {e}".strip().splitlines()[0][:300]
    return result


def _error_message(body: str) -> str:
    try:
        obj = json.loads(body)
        err = obj.get("error", obj)
        message = err.get("message", err) if isinstance(err, dict) else err
        return str(message)[:300]
    except (json.JSONDecodeError, AttributeError):
        return body.strip()[:300]


def _root(base_url: str) -> str:
    url = base_url.rstrip("/")
    return url[:-3] if url.endswith("/v1") else url


async def _discover(client, root: str, headers: dict, model: str | None) -> str:
    if model:
        return model
    try:
        r = await client.get(f"{root}/v1/models", headers=headers)
        r.raise_for_status()
        return r.json()["data"][0]["id"]
    except Exception as e:
        raise ServeBenchError(f"cannot list models at {root}/v1/models ({type(e).__name__}: {e}); pass --model") \
            from None


async def calibrate(client, root: str, headers: dict, model: str) -> tuple[dict[str, float], str]:
    """Tokens per generated word, for plain words and for documents: counted by the server's /tokenize when
    it has one, else approximated (approx_tokens)."""
    rng = random.Random(12345)
    samples = {"words": _words(rng, 400), "document": _document(rng, 400)}
    ratios = {}
    try:
        for style, text in samples.items():
            r = await client.post(f"{root}/tokenize", json={"model": model, "prompt": text,
                                                            "add_special_tokens": False}, headers=headers)
            body = r.json() if r.status_code == 200 else {}
            count = body.get("count", len(body.get("tokens", []))) if isinstance(body, dict) else 0
            if not count:
                raise ValueError("no count")
            ratios[style] = count / 400
        return ratios, "server /tokenize (calibrated on 400-word samples)"
    except Exception:
        ratios = {style: approx_tokens(text) / 400 for style, text in samples.items()}
        return ratios, "approximate: words and punctuation marks count one token each (the server has no /tokenize)"


async def run_benchmark(args) -> dict[str, Any]:
    import logging

    import httpx

    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a log line per request

    if args.num_prompts < 1:
        raise ServeBenchError(f"--num-prompts must be >= 1, got {args.num_prompts}")
    if args.output_len < 1:
        raise ServeBenchError(f"--output-len must be >= 1, got {args.output_len}")
    if args.input_len is not None and args.input_len < 1:
        raise ServeBenchError(f"--input-len must be >= 1, got {args.input_len}")
    if args.max_concurrency is not None and args.max_concurrency < 1:
        raise ServeBenchError(f"--max-concurrency must be >= 1, got {args.max_concurrency}")
    if not args.request_rate > 0:
        raise ServeBenchError(f"--request-rate must be > 0, got {args.request_rate}")
    response_format = None
    if args.json_schema is not None:
        try:
            schema = json.loads(Path(args.json_schema).read_text())
        except (OSError, ValueError) as e:
            raise ServeBenchError(f"--json-schema {args.json_schema}: cannot read a JSON schema: {e}") from None
        response_format = {"type": "json_schema", "json_schema": {"name": "bench", "schema": schema}}
    root = _root(args.base_url)
    key = args.api_key or os.environ.get("LONGSERVE_API_KEY") or os.environ.get("OPENAI_API_KEY")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    timeout = httpx.Timeout(args.timeout, connect=30.0)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        model = await _discover(client, root, headers, args.model)
        ratios, length_method = await calibrate(client, root, headers, model)
        prompts = make_prompts(args.dataset, args.num_prompts, args.input_len, args.prefix_len, args.output_len,
                               ratios, args.seed)
        server_version = None
        try:
            r = await client.get(f"{root}/version", headers=headers)
            if r.status_code == 200:
                server_version = r.json()
        except Exception:
            pass

        url = f"{root}/v1/completions"
        semaphore = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else None
        rng = random.Random(args.seed + 1)
        results = [RequestResult(approx_prompt_tokens=p.approx_tokens) for p in prompts]
        bar = _progress(len(prompts))

        async def one(i: int, prompt: Prompt) -> None:
            payload = {"model": model, "prompt": prompt.text, "max_tokens": prompt.max_tokens, "temperature": 0.0,
                       "stream": True, "stream_options": {"include_usage": True}}
            if not args.no_ignore_eos:
                payload["ignore_eos"] = True
            if response_format is not None:
                payload["response_format"] = response_format
            if semaphore is None:
                await send_request(client, url, headers, payload, results[i])
            else:
                async with semaphore:
                    await send_request(client, url, headers, payload, results[i])
            bar.update()

        t0 = time.perf_counter()
        tasks = []
        for i, prompt in enumerate(prompts):
            tasks.append(asyncio.create_task(one(i, prompt)))
            if math.isfinite(args.request_rate) and i + 1 < len(prompts):
                await asyncio.sleep(rng.expovariate(args.request_rate))
        await asyncio.gather(*tasks)
        duration = time.perf_counter() - t0
        bar.close()
    return summarize(args, model, results, duration, length_method, ratios, server_version)


def _progress(total: int):
    from tqdm import tqdm

    return tqdm(total=total, desc="requests", unit="req", file=sys.stderr, disable=None, leave=False)


def _stats(values: list[float], scale: float = 1e3) -> dict[str, float | None]:
    if not values:
        return {"mean": None, "median": None, "p90": None, "p99": None}
    xs = sorted(v * scale for v in values)

    def pct(p: float) -> float:  # linear interpolation between closest ranks (numpy's default)
        k = (len(xs) - 1) * p / 100
        lo = math.floor(k)
        hi = min(lo + 1, len(xs) - 1)
        return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)

    return {"mean": sum(xs) / len(xs), "median": pct(50), "p90": pct(90), "p99": pct(99)}


def summarize(args, model: str, results: list[RequestResult], duration: float, length_method: str,
              ratios: dict[str, float], server_version) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    failed = [r for r in results if not r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_tokens if r.prompt_tokens is not None else r.approx_prompt_tokens for r in ok)
    tpot = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    reasons: dict[str, int] = {}
    for r in failed:
        reasons[r.error or "unknown"] = reasons.get(r.error or "unknown", 0) + 1
    from importlib import metadata

    try:
        version = metadata.version("longserve")
    except metadata.PackageNotFoundError:
        version = None
    return {
        "benchmark": "longserve bench serve",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "longserve " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "versions": {"longserve": version, "python": sys.version.split()[0]},
        "server": {"base_url": _root(args.base_url), "model": model, "version": server_version},
        "config": {"dataset": args.dataset, "num_prompts": args.num_prompts, "request_rate": args.request_rate
                   if math.isfinite(args.request_rate) else "inf", "max_concurrency": args.max_concurrency,
                   "input_len": args.input_len or DEFAULT_INPUT_LEN.get(args.dataset), "prefix_len": args.prefix_len,
                   "output_len": args.output_len, "ignore_eos": not args.no_ignore_eos, "seed": args.seed,
                   "json_schema": args.json_schema},
        "prompt_length_method": length_method,
        "tokens_per_word": ratios,
        "completed": len(ok),
        "failed": len(failed),
        "failure_reasons": reasons,
        "duration_s": duration,
        "total_input_tokens": in_tokens,
        "total_output_tokens": out_tokens,
        "mean_input_tokens": in_tokens / len(ok) if ok else None,
        "request_throughput": len(ok) / duration if duration > 0 else None,
        "output_throughput": out_tokens / duration if duration > 0 else None,
        "total_token_throughput": (in_tokens + out_tokens) / duration if duration > 0 else None,
        "ttft_ms": _stats([r.ttft for r in ok]),
        "tpot_ms": _stats(tpot),
        "itl_ms": _stats([x for r in ok for x in r.itl]),
        "e2e_latency_ms": _stats([r.latency for r in ok]),
        "requests": [{**{k: v for k, v in asdict(r).items() if k not in ("itl", "start")},
                      "num_chunks": len(r.itl) + (1 if r.ttft is not None else 0)} for r in results],
    }


def format_report(rep: dict) -> str:
    def f(x, fmt="{:.2f}"):
        return "-" if x is None else fmt.format(x)

    lines = [f"# {rep['server']['base_url']} model {rep['server']['model']}: {rep['config']['dataset']}, "
             f"{rep['config']['num_prompts']} prompts, rate {rep['config']['request_rate']}, "
             f"max concurrency {rep['config']['max_concurrency'] or '-'}",
             f"{'completed':<28}{rep['completed']}",
             f"{'failed':<28}{rep['failed']}",
             f"{'duration (s)':<28}{f(rep['duration_s'])}",
             f"{'input tokens (total)':<28}{rep['total_input_tokens']}",
             f"{'output tokens (total)':<28}{rep['total_output_tokens']}",
             f"{'request throughput (req/s)':<28}{f(rep['request_throughput'], '{:.3f}')}",
             f"{'output tokens/s':<28}{f(rep['output_throughput'])}",
             f"{'total tokens/s':<28}{f(rep['total_token_throughput'])}",
             f"{'(ms)':<14}{'mean':>10}{'median':>10}{'p90':>10}{'p99':>10}"]
    for name, key in (("TTFT", "ttft_ms"), ("TPOT", "tpot_ms"), ("ITL", "itl_ms"), ("E2E latency", "e2e_latency_ms")):
        s = rep[key]
        lines.append(f"{name:<14}" + "".join(f"{f(s[k]):>10}" for k in ("mean", "median", "p90", "p99")))
    for reason, count in rep["failure_reasons"].items():
        lines.append(f"failed x{count}: {reason}")
    lines.append(f"prompt lengths: {rep['prompt_length_method']}")
    return "\n".join(lines)


def run(args) -> int:
    from .common import BenchError

    try:
        report = asyncio.run(run_benchmark(args))
    except ServeBenchError as e:
        raise BenchError(str(e)) from None
    print(format_report(report))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {args.json}", file=sys.stderr)
    return 0 if report["completed"] else 1
