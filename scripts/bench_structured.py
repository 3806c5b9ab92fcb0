"""Host cost of structured outputs per constrained row per engine step (serving/structured.py): what
the runner does for each constrained row of a decode step, `Guide.fill` (the masks of its window:
the next token and, under MTP, the position after each draft, with the trial advance rolled back)
and `Guide.advance` (the tokens the step accepted), timed over simulated generations: every step
each row takes a token its grammar allows, and a draft that the grammar allows or not (half each).
Also the compile time of each grammar (a parser thread's work, cached per grammar).

Two vocabularies: the embedded model's (101 tokens), and a byte-level BPE vocabulary of DeepSeek-V3's
size (129,280 tokens) made here from the commonest words and fragments of local Python and Markdown
text (DeepSeek's own tokenizer.json is not in this repository; the mask's cost grows with the
vocabulary, so its size is what matters here).

    python scripts/bench_structured.py --json [--rows 1 16 64] [--steps 40]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from serving.sampling import SamplingParams  # noqa: E402
from serving.structured import Grammars, fill_masks  # noqa: E402

DEEPSEEK_VOCAB = 129_280
SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 24}, "age": {"type": "integer", "minimum": 0, "maximum": 150},
    "email": {"type": "string", "pattern": "^[a-z]{1,12}@[a-z]{1,12}\\.(com|org)$"},
    "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 4},
    "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 16},
                                                 "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                "required": ["city", "zip"], "additionalProperties": False}},
    "required": ["name", "age", "email", "tags", "address"], "additionalProperties": False}
GRAMMARS = {"json_schema": {"json": SCHEMA}, "json_object": {"json_object": True},
            "regex": {"regex": "(yes|no), because [a-z ]{10,60}\\."},
            "choice": {"choice": ["positive", "negative", "neutral", "mixed feelings"]}}


def synthetic_tokenizer(path: Path, size: int) -> Path:
    """A byte-level BPE tokenizer.json with `size` tokens: the 256 bytes, then the commonest words and
    fragments (with their leading space) of the Python and Markdown text under the repository and
    the Python library, as DeepSeek's tokenizer holds words of its training text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    byte_char = pre_tokenizers.ByteLevel.alphabet()  # (the 256 byte-level characters, any order)
    table = _bytes_to_unicode()
    counts: collections.Counter = collections.Counter()
    roots = [ROOT, Path(np.__file__).resolve().parents[1]]
    for root in roots:
        for f in list(root.rglob("*.py"))[:20_000] + list(root.rglob("*.md"))[:2_000]:
            try:
                text = f.read_text(errors="ignore")
            except OSError:
                continue
            counts.update(re.findall(r" ?[A-Za-z]+| ?[0-9]{1,3}| ?[^\sA-Za-z0-9]{1,3}|\s{1,8}", text))
        if len(counts) > 4 * size:
            break
    vocab = {table[b]: b for b in range(256)}
    assert set(vocab) <= set(byte_char) | set(table.values())
    for word, _ in counts.most_common():
        key = "".join(table[b] for b in word.encode())
        if key not in vocab:
            vocab[key] = len(vocab)
        if len(vocab) >= size - 1:
            break
    while len(vocab) < size - 1:  # pad with two-byte pairs if the text ran short
        key = table[len(vocab) % 256] + table[(len(vocab) // 256) % 256]
        vocab.setdefault(key, len(vocab))
    vocab["<eos>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab, []))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<eos>"])
    tok.save(str(path))
    return path


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map (the ByteLevel pre-tokenizer's)."""
    bs = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def allowed(mask_row: np.ndarray, vocab: int) -> np.ndarray:
    return np.flatnonzero(np.unpackbits(mask_row.view(np.uint8), bitorder="little")[:vocab])


def simulate(grammars: Grammars, spec: dict, rows: int, steps: int, drafts: int, rng) -> dict:
    """Timed fill + advance of `rows` constrained rows over `steps` decode steps."""
    params = SamplingParams(max_tokens=10_000, structured_outputs=spec)
    guides = [grammars.guide(params) for _ in range(rows)]
    pending = [[] for _ in range(rows)]  # each row's drafts for the next step
    fill_s = advance_s = 0.0
    for _ in range(steps):
        start = time.perf_counter()
        mask, _ = fill_masks([(b, g, d) for b, (g, d) in enumerate(zip(guides, pending))], rows, 1 + drafts,
                             grammars.words)
        fill_s += time.perf_counter() - start
        accepted = []
        for b in range(rows):  # what the device would sample: tokens the masks allow
            ok = allowed(mask[b, 0], grammars.vocab)
            run = [int(rng.choice(ok))]
            if pending[b] and pending[b][0] in set(ok.tolist()):  # an allowed draft is accepted (with the next)
                run = [pending[b][0], int(rng.choice(allowed(mask[b, 1], grammars.vocab)))]
            accepted.append(run)
        start = time.perf_counter()
        for g, run in zip(guides, accepted):
            g.advance(run)
        advance_s += time.perf_counter() - start
        for b, g in enumerate(guides):
            if g.matcher.is_stopped() or grammars.eos[0] in accepted[b]:
                guides[b] = grammars.guide(params)  # a finished row: a new request takes its place
                pending[b] = []
                continue
            one, _ = fill_masks([(0, g, [])], 1, 1, grammars.words)
            good = allowed(one[0, 0], grammars.vocab)
            pending[b] = [int(rng.choice(good)) if rng.random() < 0.5 else int(rng.integers(grammars.vocab))][:drafts]
    per = rows * steps
    return {"rows": rows, "steps": steps, "drafts": drafts, "fill_us_per_row_step": round(fill_s / per * 1e6, 1),
            "advance_us_per_row_step": round(advance_s / per * 1e6, 1),
            "us_per_row_step": round((fill_s + advance_s) / per * 1e6, 1)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--drafts", type=int, default=1, help="MTP drafts per row and step (DeepSeek serves with 1)")
    ap.add_argument("--repeats", type=int, default=3, help="runs per case (the median is reported)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    cache = ROOT / ".cache" / "bench-structured"
    cache.mkdir(parents=True, exist_ok=True)
    big = cache / f"tokenizer-{DEEPSEEK_VOCAB}.json"
    if not big.is_file():
        synthetic_tokenizer(big, DEEPSEEK_VOCAB)
    vocabularies = {"embedded (101)": Grammars(ROOT / "models/jaxseek-tiny/tokenizer.json", 101, (1,)),
                    f"byte-level BPE ({DEEPSEEK_VOCAB})": Grammars(big, DEEPSEEK_VOCAB, (DEEPSEEK_VOCAB - 1,))}
    results, compile_ms = [], {}
    for name, grammars in vocabularies.items():
        start = time.perf_counter()
        grammars.tokenizer  # noqa: B018 (built once per vocabulary)
        compile_ms[f"{name} tokenizer"] = round((time.perf_counter() - start) * 1e3, 1)
        for kind, spec in GRAMMARS.items():
            from serving.structured import StructuredOutputs
            start = time.perf_counter()
            grammars.compile(StructuredOutputs(**spec))
            compile_ms[f"{name} {kind}"] = round((time.perf_counter() - start) * 1e3, 1)
            for rows in args.rows:
                runs = [simulate(grammars, spec, rows, args.steps, args.drafts, rng) for _ in range(args.repeats)]
                best = {k: statistics.median(r[k] for r in runs) for k in runs[0] if k.endswith("_step")}
                results.append({"vocabulary": name, "grammar": kind, **runs[0], **best})
                if not args.json:
                    print(f"{name:>28} {kind:>11} rows {rows:>3}: {best['us_per_row_step']:8.1f} us per row and step "
                          f"(fill {best['fill_us_per_row_step']:.1f}, advance {best['advance_us_per_row_step']:.1f})",
                          flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    report = {"command": "python scripts/bench_structured.py " + " ".join(argv or sys.argv[1:]),
              "commit": commit.strip(), "device": f"host CPU ({os.cpu_count()} cores)",
              "load_average": round(os.getloadavg()[0], 2), "llguidance": __import__("llguidance").__version__,
              "compile_ms": compile_ms, "results": results}
    if args.json:
        print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
