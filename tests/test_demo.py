"""scripts/demo.py answers its questions with the embedded model (which ships in DeepSeek's FP8
format) in both quantizations, on a one-device deployment with one bucket per shape (cheap)."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("quantization", ["fp8", "none"])
def test_demo_answers_its_questions(quantization, tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("demo", ROOT / "scripts" / "demo.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    deployment = tmp_path / "one.json"
    deployment.write_text(json.dumps({"mesh": {"dp": 1}, "serving": {
        "prefill_tokens": [32], "prefill_rows": [8], "decode_batch": [8], "max_model_len": 64, "block_size": 64}}))
    code = demo.main(["--deployment", str(deployment), "--quantization", quantization, "--questions", "6", "--json"])
    summary = json.loads(capsys.readouterr().out)
    assert code == 0 and summary["all_correct"] and len(summary["results"]) == 7, summary["results"]
    assert summary["quantization"] == quantization
    print(f"{quantization}: {summary['parameter_bytes']:,} parameter bytes", file=sys.stderr)
