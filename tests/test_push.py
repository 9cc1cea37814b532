"""`mlakit push`: the model card, the dry run, and the upload calls, all without the network."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from huggingface_hub import HfApi, ModelCard
from test_validate import pair, prompts, validated  # noqa: F401  (module fixtures: a converted, validated pair)

from mlakit.cli import main
from mlakit.validate import push as push_module
from mlakit.validate.card import base_model, model_card, public, public_name

REPO = "someone/pico-mla"


@pytest.fixture
def folder(validated: tuple[dict, Path], tmp_path: Path) -> Path:  # noqa: F811
    """A private copy of the validated converted folder, with a leftover temporary folder to ignore."""
    _, report_dir = validated
    out = tmp_path / "mla"
    shutil.copytree(report_dir.parent, out)
    (out / ".report.tmp-x").mkdir()
    (out / ".report.tmp-x" / "junk").write_text("half")
    return out


def front_matter(card: str) -> dict:
    head, sep, _ = card.removeprefix("---\n").partition("\n---\n")
    assert card.startswith("---\n") and sep
    return yaml.safe_load(head)


def test_card_front_matter_and_body(validated: tuple[dict, Path]) -> None:  # noqa: F811
    report, _ = validated
    card = model_card(REPO, report)
    meta = front_matter(card)
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    assert meta["tags"] == ["mla", "deepseek_v3", "mlakit"]
    assert "base_model" not in meta  # converted from a local folder: no hub id to point at
    results = meta["model-index"][0]["results"]
    values = {m["name"]: m["value"] for r in results for m in r["metrics"]}
    assert values["Perplexity"] == pytest.approx(report["perplexity"]["converted"], rel=1e-5)
    assert values["Top-1 agreement with the source"] == pytest.approx(report["top1_agreement"], rel=1e-5)
    assert values["KL(source || converted), 99th percentile"] == pytest.approx(report["kl"]["p99"], rel=1e-5)
    parsed = ModelCard(card)
    assert parsed.data.eval_results[0].metric_type == "perplexity"
    # kv_lora_rank 48 + rope 64: llama.cpp and MLX serve it, vLLM refuses the width, SGLang was never run
    assert f"mlx_lm.generate --model {REPO}" in card and "convert_hf_to_gguf.py pico-mla" in card
    assert "vllm serve" not in card and "sglang.launch_server" not in card
    assert "vLLM (CPU): fails (vLLM MLA width; vLLM CPU MLA width)" in card
    assert "](report/memory.png)" in card and "](report/layer_error.png)" in card
    assert "## Validation of" in card and "### Per-layer attention error" in card
    # the validated conversion is in the exact latent format (the default): the card says, per scheme,
    # that f16, q8_0 and fp8 destroy it and int8 per channel does not
    assert "- latent format: exact" in card and "- int8: survives it" in card
    for scheme in ("f16", "q8_0", "fp8"):
        assert f"- {scheme}: does NOT survive it" in card


def test_base_model_only_for_hub_ids(tmp_path: Path) -> None:
    assert base_model("meta-llama/Llama-3.2-1B") == "meta-llama/Llama-3.2-1B"
    assert base_model(str(tmp_path)) is None and base_model("demo") is None and base_model("./a/b") is None


def tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_dry_run_lists_files_shows_the_card_and_writes_nothing(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (folder / "README.md").write_text("my own notes")
    before = tree(folder)
    monkeypatch.setattr(push_module, "get_token", lambda: None)
    result = CliRunner().invoke(main, ["push", str(folder), REPO, "--dry-run"])
    assert result.exit_code == 0, result.output
    listed = [m[1] for m in re.finditer(r"^  (\S+) +[\d.]+ (?:B|KiB|MiB|GiB)", result.output, re.MULTILINE)]
    assert listed[0] == "README.md"
    assert {"config.json", "model.safetensors", "mlakit.json", "report/report.json", "report/memory.png"} <= set(listed)
    assert not any(name.startswith(".") for name in listed)
    card = model_card(REPO, public(json.loads((folder / "report" / "report.json").read_text())))
    assert card in result.output, "the dry run shows the card it would upload"
    assert "no Hugging Face token is set" in result.output
    assert "nothing written or uploaded" in result.output and "uploaded:" not in result.output
    assert tree(folder) == before


def test_dry_run_card_names_the_hub_source(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A source read from the hub cache is named by its hub id: base_model in the front matter."""
    cached = "/home/someone/.cache/huggingface/hub/models--owner--pico/snapshots/0123abc"
    for name in ("mlakit.json", "report/report.json"):
        record = json.loads((folder / name).read_text())
        (record.get("conversion") or record)["source"]["id"] = cached
        (folder / name).write_text(json.dumps(record))
    monkeypatch.setattr(push_module, "get_token", lambda: "hf_test")
    result = CliRunner().invoke(main, ["push", str(folder), REPO, "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "base_model: owner/pico" in result.output and "/home/someone" not in result.output
    assert "no Hugging Face token" not in result.output


def test_no_token_is_one_line_and_writes_nothing(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(push_module, "get_token", lambda: None)
    result = CliRunner().invoke(main, ["push", str(folder), REPO])
    assert result.exit_code == 1
    assert [line for line in result.output.splitlines() if line.startswith("error: ")] == [
        "error: no Hugging Face token: run `hf auth login` or set HF_TOKEN, then push again"]
    assert not (folder / "README.md").exists()


def test_upload_is_one_commit_with_the_card_and_leaves_the_folder_alone(
        folder: Path, validated: tuple[dict, Path], monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    (folder / "README.md").write_text("my own notes")
    before = tree(folder)
    calls = []

    class Commit:
        commit_url = f"https://hub.example/{REPO}/commit/abc"

    def record(name):
        def method(self, *args, **kwargs):
            calls.append((name, args, kwargs))
            return Commit() if name == "create_commit" else None
        return method

    for name in ("create_repo", "create_branch", "create_commit"):
        monkeypatch.setattr(HfApi, name, record(name))
    monkeypatch.setattr(push_module, "get_token", lambda: "hf_test")
    result = CliRunner().invoke(main, ["push", str(folder), REPO, "--private", "--revision", "v1"])
    assert result.exit_code == 0, result.output
    assert [c[0] for c in calls] == ["create_repo", "create_branch", "create_commit"]
    assert calls[0][1] == (REPO,) and calls[0][2] == {"private": True, "exist_ok": True}
    assert calls[1][2] == {"branch": "v1", "exist_ok": True}
    (repo, operations), options = calls[2][1], calls[2][2]
    assert repo == REPO and options["revision"] == "v1"
    uploaded = {op.path_in_repo: op.path_or_fileobj for op in operations}
    assert not any(name.startswith(".") or "/." in name for name in uploaded)
    assert set(uploaded) == set(before) - {".report.tmp-x/junk"}
    assert front_matter(uploaded["README.md"].decode())["library_name"] == "transformers"
    assert result.output.strip().endswith(f"uploaded: {Commit.commit_url}")
    assert tree(folder) == before, "push must not write into the user's folder"
    # no local path goes public: the records name the local source by its folder name only
    _, report_dir = validated
    local = str(report_dir.parent.parent)
    for name in ("README.md", "mlakit.json", "report/report.json", "report/report.md"):
        text = uploaded[name].decode()
        assert local not in text and "/tmp/" not in text, name
    assert json.loads(uploaded["mlakit.json"])["source"]["id"] == "src"
    assert json.loads(uploaded["report/report.json"])["converted"]["folder"] == "mla"


def test_public_names() -> None:
    assert public_name("/home/me/models/llama-mla") == "llama-mla"
    assert public_name("/home/me/.cache/huggingface/hub/models--meta-llama--Llama-3.2-1B/snapshots/c0ffee") == \
        "meta-llama/Llama-3.2-1B"
    assert public({"id": "/a/b/src", "text": "bundled docstrings, /home/me/x.txt", "n": 3, "repo": "owner/name",
                   "rows": ["~/data/train.jsonl", "hub:wikitext"]}) == {
        "id": "src", "text": "bundled docstrings, x.txt", "n": 3, "repo": "owner/name",
        "rows": ["train.jsonl", "hub:wikitext"]}


class StubHub(BaseHTTPRequestHandler):
    """Accepts repo creation, refuses everything else, records what it saw."""

    seen: list[tuple[str, str, str, dict]] = []

    def _answer(self, code: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _handle(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        body = json.loads(raw) if raw.startswith(b"{") else {}
        self.seen.append((self.command, self.path, self.headers.get("Authorization", ""), body))
        if self.command == "POST" and self.path == "/api/repos/create":
            self._answer(200, {"url": f"http://{self.headers['Host']}/{REPO}"})
        else:
            self._answer(403, {"error": "this stub accepts no uploads"})

    do_GET = do_POST = do_PUT = do_HEAD = _handle

    def log_message(self, *args) -> None:
        pass


def test_hf_endpoint_is_honored_and_a_refused_upload_is_reported(folder: Path) -> None:
    (folder / "README.md").write_text("my own notes")
    before = tree(folder)
    StubHub.seen = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), StubHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    env = {**os.environ, "HF_ENDPOINT": endpoint, "HF_TOKEN": "hf_stub_token", "HF_HUB_OFFLINE": "0",
           "HF_HUB_DISABLE_TELEMETRY": "1"}
    try:
        proc = subprocess.run([sys.executable, "-m", "mlakit", "push", str(folder), REPO, "--private"], env=env,
                              capture_output=True, text=True, timeout=120)
    finally:
        server.shutdown()
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1, output
    assert "Traceback" not in output and "uploaded:" not in output
    errors = [line for line in output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith(f"error: upload to {endpoint}/{REPO} failed"), output
    paths = [(method, path) for method, path, _, _ in StubHub.seen]
    create = paths.index(("POST", "/api/repos/create"))
    _, _, auth, body = StubHub.seen[create]
    assert auth == "Bearer hf_stub_token"
    assert body["name"] == "pico-mla" and body["organization"] == "someone" and body["visibility"] == "private"
    assert len(paths) > create + 1, "the upload itself must have been attempted against the stub"
    assert tree(folder) == before, "a failed upload leaves the user's folder as it was"


def test_refuses_a_folder_without_a_report(folder: Path) -> None:
    shutil.rmtree(folder / "report")
    result = CliRunner().invoke(main, ["push", str(folder), REPO, "--dry-run"])
    assert result.exit_code == 1 and "no validation report" in result.output


def test_refuses_a_report_older_than_the_model(folder: Path) -> None:
    record = json.loads((folder / "mlakit.json").read_text())
    record["dtype"] = "bf16"
    (folder / "mlakit.json").write_text(json.dumps(record))
    result = CliRunner().invoke(main, ["push", str(folder), REPO, "--dry-run"])
    assert result.exit_code == 1 and "older than the model" in result.output


def test_refuses_a_bad_repo_id(folder: Path) -> None:
    result = CliRunner().invoke(main, ["push", str(folder), "no-owner", "--dry-run"])
    assert result.exit_code == 1 and "owner/name" in result.output
