"""data/fineweb.py: text -> shards -> text round trip, and the download path against a stand-in hub on 127.0.0.1."""
import gzip
import http.server
import json
import lzma
import os
import subprocess
import sys
import threading

import numpy as np
import pytest

from tests.helpers import ROOT, SHARED_DATA, fineweb

tiktoken = pytest.importorskip("tiktoken")


@pytest.fixture(scope="module")
def gpt2():
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:  # no network and no TIKTOKEN_CACHE_DIR (conftest.py sets it from ../shared/data)
        pytest.skip(f"tiktoken's GPT-2 BPE files are not available offline ({e}); see README 'Tests'")


DOCS = ["Hello world, this is the first document.", "Second one: 123 + 456 = 579\nwith a newline and ünïcödé.",
        "x", "A third, longer document " * 30, "<|endoftext|> spelled out stays plain text"]


def decode_docs(paths, enc):
    tokens = np.concatenate([np.asarray(fineweb_read(p)) for p in paths])
    cuts = np.flatnonzero(tokens == fineweb.EOT)
    return [enc.decode(tokens[a + 1:b].tolist()) for a, b in zip(cuts, list(cuts[1:]) + [len(tokens)])]


def fineweb_read(path):
    n = fineweb.check_shard(path)
    return np.fromfile(path, dtype="<u2", offset=fineweb.HEADER_INTS * 4, count=n)


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz", ".jsonl.xz"])
def test_round_trip_text_to_shards_to_text(tmp_path, gpt2, suffix):
    opener = {".jsonl": open, ".jsonl.gz": gzip.open, ".jsonl.xz": lzma.open}[suffix]
    src = tmp_path / f"docs{suffix}"
    with opener(src, "wt", encoding="utf-8") as f:
        for doc in DOCS:
            f.write(json.dumps({"text": doc}) + "\n")
    out = fineweb.tokenize_files([str(src)], str(tmp_path / "out"), "t", val_tokens=20, shard_tokens=64, workers=2)
    assert [os.path.basename(p) for p in out["val"]] == ["t_val_000000.bin"]
    assert os.path.basename(out["train"][0]) == "t_train_000001.bin"
    assert all(fineweb.check_shard(p) == 64 for p in out["train"][:-1])  # full shards, the last one shorter
    assert decode_docs(out["val"] + out["train"], gpt2) == DOCS  # documents in order, each after one EOT
    assert decode_docs(out["val"], gpt2) == DOCS[:2]  # whole documents until the val split holds >= 20 tokens


def test_txt_files_are_one_document_each_and_all_can_go_to_val(tmp_path, gpt2):
    paths = []
    for i, doc in enumerate(DOCS[:3]):
        paths.append(tmp_path / f"{i}.txt")
        paths[-1].write_text(doc, encoding="utf-8")
    out = fineweb.tokenize_files([str(p) for p in paths], str(tmp_path / "o"), "x", None, 10**6, workers=1)
    assert out["train"] == [] and decode_docs(out["val"], gpt2) == DOCS[:3]


def test_shards_are_never_overwritten_and_bad_input_is_named(tmp_path, gpt2):
    src = tmp_path / "a.txt"
    src.write_text("some text", encoding="utf-8")
    fineweb.tokenize_files([str(src)], str(tmp_path / "o"), "p", 0, 100, workers=1)
    with pytest.raises(SystemExit, match="p_train_000001.bin exists"):
        fineweb.tokenize_files([str(src)], str(tmp_path / "o"), "p", 0, 100, workers=1)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"body": "no text field"}\n', encoding="utf-8")
    with pytest.raises(SystemExit, match=r"bad\.jsonl:2: not a JSON object with a \"text\" field"):
        fineweb.tokenize_files([str(bad)], str(tmp_path / "o2"), "p", 0, 100, workers=1)
    with pytest.raises(SystemExit, match="no such file"):
        fineweb.tokenize_files([str(tmp_path / "missing.jsonl")], str(tmp_path / "o3"), "p", 0, 100, workers=1)


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data (the offline proxy data) is not present")
def test_cli_on_the_real_proxy_validation_text(tmp_path, gpt2):
    src = SHARED_DATA / "webtext_samples" / "openwebtext_sample.jsonl.xz"
    subprocess.run([sys.executable, str(ROOT / "data" / "fineweb.py"), "--from-text", str(src), "--out", str(tmp_path),
                    "--prefix", "owt", "--val-tokens", "all", "--max-tokens", "20000"], check=True, capture_output=True)
    (shard,) = tmp_path.glob("owt_val_*.bin")
    with lzma.open(src, "rt", encoding="utf-8") as f:
        first_docs = [json.loads(next(f))["text"] for _ in range(3)]
    assert decode_docs([str(shard)], gpt2)[:3] == first_docs


# ---- download, against a stand-in for the Hugging Face hub ----
class FakeHub(http.server.ThreadingHTTPServer):
    """Serves /datasets/<repo>/resolve/<rev>/<file> like the hub; the first GET of `cut_once` breaks halfway."""

    def __init__(self, files, cut_once=None):
        super().__init__(("127.0.0.1", 0), HubHandler)
        self.files, self.cut_once, self.requests = files, cut_once, []


class HubHandler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def send_file_headers(self, name, length):
        self.send_header("X-Repo-Commit", "0" * 40)
        self.send_header("ETag", f'"{abs(hash(self.server.files[name])):x}"')
        self.send_header("Content-Length", str(length))

    def target(self):
        parts = self.path.split("/")
        self.server.requests.append((self.command, parts[-1], self.headers.get("Range")))
        if parts[1] != "datasets" or "/".join(parts[2:4]) != "kjj0/fineweb10B-gpt2" or parts[-1] not in self.server.files:
            self.send_response(404)
            self.end_headers()
            return None
        return parts[-1]

    def do_HEAD(self):
        name = self.target()
        if name:
            self.send_response(200)
            self.send_file_headers(name, len(self.server.files[name]))
            self.end_headers()

    def do_GET(self):
        name = self.target()
        if not name:
            return
        data = self.server.files[name]
        start = int(self.headers["Range"].split("=")[1].split("-")[0]) if self.headers.get("Range") else 0
        self.send_response(206 if start else 200)
        self.send_file_headers(name, len(data) - start)
        self.end_headers()
        if name == self.server.cut_once:  # a broken connection: half the bytes, then hang up
            self.server.cut_once = None
            self.wfile.write(data[start:start + (len(data) - start) // 2])
            self.wfile.flush()
            self.connection.shutdown(2)
            return
        self.wfile.write(data[start:])


def shard_bytes(n_tokens, seed):
    header = np.zeros(fineweb.HEADER_INTS, dtype="<i4")
    header[:3] = fineweb.MAGIC, fineweb.VERSION, n_tokens
    return header.tobytes() + np.random.default_rng(seed).integers(0, 50257, n_tokens).astype("<u2").tobytes()


@pytest.fixture
def hub(monkeypatch, tmp_path):
    files = {"fineweb_val_000000.bin": shard_bytes(3000, 0), "fineweb_train_000001.bin": shard_bytes(200_000, 1),
             "fineweb_train_000002.bin": shard_bytes(5000, 2)}
    server = FakeHub(files)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    yield server
    server.shutdown()


def test_download_checks_headers_and_skips_complete_files(hub, tmp_path):
    out = tmp_path / "fw"
    fineweb.download("kjj0/fineweb10B-gpt2", 2, str(out))
    for name, data in hub.files.items():
        assert (out / name).read_bytes() == data
    got = [r[1] for r in hub.requests if r[0] == "GET"]
    assert sorted(got) == sorted(hub.files)
    hub.requests.clear()
    (out / "fineweb_train_000002.bin").write_bytes(hub.files["fineweb_train_000002.bin"][:-10])  # damaged
    fineweb.download("kjj0/fineweb10B-gpt2", 2, str(out))
    assert [r[1] for r in hub.requests if r[0] == "GET"] == ["fineweb_train_000002.bin"]  # only the bad one again
    assert (out / "fineweb_train_000002.bin").read_bytes() == hub.files["fineweb_train_000002.bin"]


def test_an_interrupted_download_resumes(hub, tmp_path, monkeypatch):
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "DOWNLOAD_CHUNK_SIZE", 1 << 16)  # < half the file: some is kept
    hub.cut_once = "fineweb_train_000001.bin"
    out = tmp_path / "fw"
    try:
        fineweb.download("kjj0/fineweb10B-gpt2", 1, str(out))
    except Exception:  # the broken transfer may surface as an error; running the command again resumes it
        fineweb.download("kjj0/fineweb10B-gpt2", 1, str(out))
    assert (out / "fineweb_train_000001.bin").read_bytes() == hub.files["fineweb_train_000001.bin"]
    ranges = [r[2] for r in hub.requests if r[0] == "GET" and r[1] == "fineweb_train_000001.bin"]
    assert len(ranges) == 2 and ranges[0] is None and ranges[1].startswith("bytes=") and ranges[1] != "bytes=0-"


def test_a_wrong_file_from_the_hub_is_refused(hub, tmp_path):
    hub.files["fineweb_val_000000.bin"] = b"<html>not a shard</html>" * 100
    with pytest.raises(SystemExit, match=r"fineweb_val_000000\.bin: not a token shard.*--repo"):
        fineweb.download("kjj0/fineweb10B-gpt2", 0, str(tmp_path / "fw"))
