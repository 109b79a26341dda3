"""data/fineweb.py: text -> shards -> text round trip; bad input is one clear error that leaves no shards behind;
the download path against a stand-in hub on 127.0.0.1."""
import gzip
import http.server
import json
import lzma
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from tests.helpers import ROOT, SHARED_DATA, fineweb, without_file_permission_bypass

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


# ---- bad input: one "error: ..." line naming the file (and line), and nothing left in --out ----
def write_jsonl(path, lines, opener=open):
    with opener(path, "wb") as f:
        f.write(b"".join(line + b"\n" for line in lines))


@pytest.mark.parametrize("name", ["latin1.txt", "latin1.jsonl", "latin1.jsonl.gz"])
def test_non_utf8_bytes_are_named_with_file_and_line(tmp_path, gpt2, name):
    src = tmp_path / name
    if name.endswith(".txt"):
        src.write_bytes("first line\ncafé\n".encode("latin-1"))
        where = r"latin1\.txt:2: not UTF-8 \(byte 0xe9 at byte offset 14\)"
    else:
        write_jsonl(src, [b'{"text": "ok"}', '{"text": "café"}'.encode("latin-1")],
                    gzip.open if name.endswith(".gz") else open)
        where = rf"{name.replace('.', '[.]')}:2: not UTF-8 \(byte 0xe9 at column 14\)"
    with pytest.raises(SystemExit, match=rf"^error: .*{where}; re-encode the file as UTF-8"):
        fineweb.tokenize_files([str(src)], str(tmp_path / "o"), "p", 0, 100, workers=1)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("value,shown", [("5", "a number (5)"), ("null", "null"), ('["a"]', 'a list (["a"])'),
                                         ('{"t": 1}', 'an object ({"t": 1})'), ("true", "a boolean (true)")])
def test_a_text_that_is_not_a_string_is_named(tmp_path, gpt2, value, shown):
    src = tmp_path / "docs.jsonl"
    write_jsonl(src, [b'{"text": "fine"}', b'{"text": ' + value.encode() + b"}"])
    with pytest.raises(SystemExit) as err:
        fineweb.tokenize_files([str(src)], str(tmp_path / "o"), "p", 0, 100, workers=1)
    assert str(err.value).startswith(f'error: {src}:2: "text" is {shown}, not a string; each line must be')


def compressed_jsonl(tmp_path, suffix, n_docs=300):
    """A valid .jsonl.xz / .jsonl.gz of documents that barely compress, so half the file holds many lines."""
    rng = np.random.default_rng(0)
    lines = [json.dumps({"text": " ".join(map(str, rng.integers(0, 10**9, 20)))}).encode() for _ in range(n_docs)]
    path = tmp_path / f"docs.jsonl{suffix}"
    write_jsonl(path, lines, {".xz": lzma.open, ".gz": gzip.open}[suffix])
    return path


@pytest.mark.parametrize("suffix", [".xz", ".gz"])
@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_a_corrupt_archive_is_named_with_the_line_reached(tmp_path, gpt2, suffix, damage):
    src = compressed_jsonl(tmp_path, suffix)
    data = src.read_bytes()
    src.write_bytes(data[:len(data) // 2] if damage == "truncated" else b"not compressed at all\n" * 20)
    with pytest.raises(SystemExit) as err:
        fineweb.tokenize_files([str(src)], str(tmp_path / "o"), "p", 0, 10**6, workers=1)
    line = int(str(err.value).split(f"{src}:")[1].split(":")[0])
    assert (line > 100) if damage == "truncated" else (line == 1)  # the line it got to
    assert f"corrupt or truncated {suffix} data (" in str(err.value)
    assert f"check it with {'xz' if suffix == '.xz' else 'gzip'} -t" in str(err.value)
    assert not (tmp_path / "o").exists()


def test_no_text_at_all_is_an_error_not_an_empty_success(tmp_path, gpt2):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blank.txt").write_text(" \n\n")
    write_jsonl(tmp_path / "blank.jsonl", [b"", b"  ", b'{"text": ""}', b'{"text": "\\n"}'])
    paths = [str(tmp_path / n) for n in ("empty.txt", "blank.txt", "blank.jsonl")]
    with pytest.raises(SystemExit, match=r"^error: --from-text: no text in .*empty\.txt, .*blank\.txt, .*blank\.jsonl: "
                                         "every document is empty or blank, so nothing was written"):
        fineweb.tokenize_files(paths, str(tmp_path / "o"), "p", None, 100, workers=1)
    assert not (tmp_path / "o").exists()


def test_existing_shards_are_found_before_any_tokenizing(tmp_path, gpt2, monkeypatch):
    src = tmp_path / "a.txt"
    src.write_text("some text")
    out = tmp_path / "o"
    out.mkdir()
    fineweb.write_shard(str(out / "p_val_000000.bin"), [fineweb.EOT, 1, 2])

    def no_pool(*args, **kwargs):
        raise AssertionError("tokenizing started")
    with monkeypatch.context() as m:
        m.setattr(fineweb, "start_workers", no_pool)
        with pytest.raises(SystemExit, match=r"p_val_000000\.bin exists; shards are never overwritten"):
            fineweb.tokenize_files([str(src)], str(out), "p", 10, 100, workers=1)
    # a run that cannot write val shards (--val-tokens 0) may add train shards beside them, as before
    written = fineweb.tokenize_files([str(src)], str(out), "p", 0, 100, workers=1)
    assert written == {"val": [], "train": [str(out / "p_train_000001.bin")]}
    assert sorted(os.listdir(out)) == ["p_train_000001.bin", "p_val_000000.bin"]


def recording_write_shard(monkeypatch, interrupt_at=None):
    """Wrap fineweb.write_shard (the parent writes every shard) to record its paths; interrupt_at=n: the n-th call
    leaves a half-written .tmp and raises KeyboardInterrupt, like a Ctrl-C during the write."""
    written, real = [], fineweb.write_shard

    def write_shard(path, tokens):
        if len(written) + 1 == interrupt_at:
            with open(path + ".tmp", "wb") as f:
                f.write(b"half")
            raise KeyboardInterrupt
        real(path, tokens)
        written.append(os.path.basename(path))
    monkeypatch.setattr(fineweb, "write_shard", write_shard)
    return written


def test_a_failed_run_removes_every_shard_it_wrote(tmp_path, gpt2, monkeypatch):
    out = tmp_path / "o"
    out.mkdir()
    (out / "other_train_000001.bin").write_bytes(b"not ours")
    src = tmp_path / "docs.jsonl"
    write_jsonl(src, [json.dumps({"text": f"document number {i} of many"}).encode() for i in range(200)] + [b"{oops"])
    written = recording_write_shard(monkeypatch)
    with pytest.raises(SystemExit, match=r"docs\.jsonl:201: not a JSON object"):
        fineweb.tokenize_files([str(src)], str(out), "p", 50, 40, workers=2)
    assert "p_val_000000.bin" in written and "p_train_000001.bin" in written  # val and train shards were written...
    assert os.listdir(out) == ["other_train_000001.bin"]  # ...and removed again; other files are untouched

    written = recording_write_shard(monkeypatch, interrupt_at=3)  # Ctrl-C while writing the third shard
    with pytest.raises(KeyboardInterrupt):
        fineweb.tokenize_files([str(src)], str(out), "p", 50, 40, workers=1)
    assert written == ["p_val_000000.bin", "p_train_000001.bin"] and os.listdir(out) == ["other_train_000001.bin"]
    recording_write_shard(monkeypatch, interrupt_at=3)
    assert fineweb.main(["--from-text", str(src), "--out", str(tmp_path / "new"), "--val-tokens", "50",
                         "--shard-tokens", "40", "--workers", "1"]) == 130  # the command line: exit status 130
    assert not (tmp_path / "new").exists()  # the folder it made is gone too


@pytest.fixture
def no_bpe_files(tmp_path, monkeypatch):
    """No GPT-2 BPE files anywhere and no network: TIKTOKEN_CACHE_DIR is an empty folder, the shared cache and
    tiktoken's default cache are hidden, nothing is loaded yet, and downloads fail at once (a dead proxy)."""
    import tempfile
    empty = tmp_path / "empty_cache"
    empty.mkdir()
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(empty))
    monkeypatch.setattr(fineweb, "TIKTOKEN_CACHE", tmp_path / "no_shared_cache")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # tiktoken's default cache: <tempdir>/data-gym-cache
    monkeypatch.setattr(fineweb, "_encoding", None)
    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})
    for var in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")  # the discard port: connection refused, no waiting
    for var in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(var, raising=False)
    return empty


BPE_FIX = "set TIKTOKEN_CACHE_DIR to a folder holding the GPT-2 BPE files"


@pytest.mark.timeout(60)
def test_missing_bpe_files_are_a_clear_error(tmp_path, no_bpe_files, monkeypatch):
    import sample
    src = tmp_path / "a.txt"
    src.write_text("some text")
    with pytest.raises(SystemExit) as err:
        fineweb.tokenize_files([str(src)], str(tmp_path / "o"), "p", 0, 100, workers=1)
    assert str(err.value).startswith(f"error: tiktoken cannot load the GPT-2 BPE files: they are not in "
                                     f"TIKTOKEN_CACHE_DIR={no_bpe_files}, and downloading them failed; {BPE_FIX}")
    assert not (tmp_path / "o").exists()
    with pytest.raises(SystemExit, match=BPE_FIX):
        sample.gpt2_encoding()  # sample.py uses the same loader
    monkeypatch.delenv("TIKTOKEN_CACHE_DIR")
    with pytest.raises(SystemExit, match=f"TIKTOKEN_CACHE_DIR is unset and .*no_shared_cache does not exist.*"
                                         f"{BPE_FIX}"):
        fineweb.gpt2_encoding()


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data (the offline proxy data) is not present")
def test_the_shared_bpe_cache_beside_the_repo_is_found(monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "unset below; restored (or removed) after the test")
    monkeypatch.delenv("TIKTOKEN_CACHE_DIR")
    monkeypatch.setattr(fineweb, "_encoding", None)
    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})
    assert fineweb.TIKTOKEN_CACHE == SHARED_DATA / "tiktoken_cache"
    assert fineweb.gpt2_encoding().encode_ordinary("hello world") == [31373, 995]
    assert os.environ["TIKTOKEN_CACHE_DIR"] == str(SHARED_DATA / "tiktoken_cache")  # the workers inherit it


@pytest.mark.timeout(60)
def test_a_worker_that_cannot_load_the_encoding_is_reported_once_without_hanging(tmp_path, gpt2, no_bpe_files,
                                                                                monkeypatch, capfd):
    monkeypatch.setattr(fineweb, "_encoding", gpt2)  # the parent has it; the spawned workers find no BPE files
    src = tmp_path / "docs.jsonl"
    write_jsonl(src, [json.dumps({"text": f"document {i}"}).encode() for i in range(100)])
    with pytest.raises(SystemExit, match=f"^error: tiktoken cannot load the GPT-2 BPE files: .*{BPE_FIX}"):
        fineweb.tokenize_files([str(src)], str(tmp_path / "o"), "p", 0, 100, workers=2)
    assert not (tmp_path / "o").exists() and "Traceback" not in capfd.readouterr().err  # workers print nothing


@pytest.mark.timeout(60)
def test_cli_errors_are_one_line(tmp_path, gpt2):
    src = tmp_path / "docs.jsonl"
    write_jsonl(src, [b'{"text": "ok"}', b'{"text": 5}'])
    env = dict(os.environ)
    cmd = [sys.executable, str(ROOT / "data" / "fineweb.py"), "--from-text", str(src), "--out", str(tmp_path / "o"),
           "--workers", "1"]
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60)
    last = run.stderr.replace("\r", "\n").strip().splitlines()[-1]
    assert run.returncode == 1 and last == (f'error: {src}:2: "text" is a number (5), not a string; each line must '
                                            'be a JSON object {"text": "<the document>"}'), run.stderr
    assert "Traceback" not in run.stderr and not (tmp_path / "o").exists()
    empty = tmp_path / "empty_cache"
    empty.mkdir()
    env.update(TIKTOKEN_CACHE_DIR=str(empty), HTTPS_PROXY="http://127.0.0.1:9", https_proxy="http://127.0.0.1:9",
               NO_PROXY="", no_proxy="")
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60)
    assert run.returncode == 1 and run.stderr.count("\n") == 1 and BPE_FIX in run.stderr, run.stderr


# ---- the command line checks every path and size it is given before it writes anything ----
def fineweb_cli(*args):
    return [sys.executable, "data/fineweb.py", *map(str, args)]


def run_cli(cmd):
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60)


def assert_one_error_line(run, *words):
    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr
    assert run.stderr.startswith("error: ") and run.stderr.count("\n") == 1, run.stderr
    for word in words:
        assert str(word) in run.stderr, run.stderr


def folder_state(path):
    return sorted(os.listdir(path)) if os.path.isdir(path) else os.path.lexists(path)


@pytest.fixture
def text_file(tmp_path):
    src = tmp_path / "docs.jsonl"
    write_jsonl(src, [b'{"text": "some text"}'])
    return src


@pytest.mark.parametrize("case,problem", [("folder", "is a folder; give the files in it"),
                                          ("dangling", "a dangling symlink"), ("missing", "no such file"),
                                          ("unreadable", "cannot read it (Permission denied)"),
                                          ("twice", "is given twice; give each file once"),
                                          ("symlink", "is the same file as")])
def test_a_bad_from_text_file_is_named_before_anything_is_written(tmp_path, text_file, case, problem):
    files = {"folder": [tmp_path], "dangling": [tmp_path / "gone.jsonl"], "missing": [tmp_path / "missing.jsonl"],
             "unreadable": [text_file], "twice": [text_file, text_file],
             "symlink": [text_file, tmp_path / "link.jsonl"]}[case]
    if case == "dangling":
        os.symlink(tmp_path / "nowhere.jsonl", files[0])
    if case == "symlink":
        os.symlink(text_file, files[1])
    cmd = fineweb_cli("--from-text", *files, "--out", tmp_path / "o")
    if case == "unreadable":
        text_file.chmod(0)
        cmd = without_file_permission_bypass(cmd)
    assert_one_error_line(run_cli(cmd), "error: --from-text: ", f"{files[-1]}: {problem}")
    assert not (tmp_path / "o").exists()


def bad_folder(tmp_path, case):
    """A folder argument that cannot be used, and what the error says about it."""
    if case == "file":
        (tmp_path / "a_file").write_text("keep me")
        return tmp_path / "a_file", "exists and is not a folder"
    if case == "empty":
        return "", "is empty; name a folder"
    if case == "dangling":
        os.symlink(tmp_path / "nowhere", tmp_path / "link")
        return tmp_path / "link", "a dangling symlink"
    if case == "unwritable":
        (tmp_path / "ro").mkdir(mode=0o555)
        return tmp_path / "ro", "cannot write in it (Permission denied)"
    if case == "under_a_file":
        (tmp_path / "a_file").write_text("keep me")
        return tmp_path / "a_file" / "sub", "is not a folder"
    return "/proc/no_such_pid/shards", "cannot be made in /proc"


FOLDER_CASES = ["file", "empty", "dangling", "unwritable", "under_a_file", "proc"]


@pytest.mark.parametrize("flag", ["--out", "--local-dir"])
@pytest.mark.parametrize("case", FOLDER_CASES)
def test_a_bad_folder_is_named_before_anything_is_written(tmp_path, text_file, flag, case):
    folder, problem = bad_folder(tmp_path, case)
    before = folder_state(tmp_path)
    # --local-dir: the download's checks come before any network access (there is none here)
    cmd = fineweb_cli(*(["--from-text", text_file] if flag == "--out" else []), flag, folder)
    if case == "unwritable":
        cmd = without_file_permission_bypass(cmd)
    assert_one_error_line(run_cli(cmd), f"error: {flag}" + (f"={folder}: " if folder else " "), problem)
    assert folder_state(tmp_path) == before and folder_state(tmp_path / "ro") in (False, [])


@pytest.mark.parametrize("flag,value,problem", [
    ("--max-tokens", 0, "must be at least 1; leave it out for no limit"), ("--max-tokens", -5, "at least 1"),
    ("--shard-tokens", 0, "must be 1 to 2147483647"), ("--shard-tokens", -1, "must be 1 to"),
    ("--shard-tokens", 2**31, "must be 1 to"), ("--workers", 0, "must be at least 1"),
    ("--val-tokens", -1, "must be 0 (no val split) or more, or 'all'"), ("--shards", -1, "0 to 103")])
def test_a_size_below_one_is_an_error_not_a_default(tmp_path, text_file, flag, value, problem):
    args = (["--local-dir", tmp_path / "fw"] if flag == "--shards" else
            ["--from-text", text_file, "--out", tmp_path / "o"])
    assert_one_error_line(run_cli(fineweb_cli(*args, f"{flag}={value}")), f"error: {flag}={value}: ", problem)
    assert not (tmp_path / "o").exists() and not (tmp_path / "fw").exists()


def test_a_flag_of_the_other_command_is_an_error(tmp_path, text_file):
    assert_one_error_line(run_cli(fineweb_cli("--from-text", text_file, "--out", tmp_path / "o", "--shards", 2)),
                          "error: --shards goes with downloading FineWeb, not with --from-text")
    assert_one_error_line(run_cli(fineweb_cli("--out", tmp_path / "o")), "error: --out goes with --from-text")
    assert not (tmp_path / "o").exists()


# ---- SIGTERM and Ctrl-C: the clean-up of a failed run, exit 128 + the signal, and the command can be re-run ----
@pytest.fixture(scope="module")
def big_corpus(tmp_path_factory):
    """About 15 MB of .jsonl (a second or more of tokenizing on two cores): a run is still going when its first
    shard appears."""
    import random
    rng = random.Random(0)
    words = ("the of and a to in is was that for on with as by at from his it an were are which this be or has had "
             "not but first one their its new after who they have her she two been other when there all").split()
    block = "".join(json.dumps({"text": " ".join(rng.choices(words, k=150))}) + "\n" for _ in range(1000))
    path = tmp_path_factory.mktemp("corpus") / "big.jsonl"
    path.write_text(block * 100)  # ~15M tokens: seconds of work, so a signal lands mid-run on any machine
    return path


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data (the offline GPT-2 BPE files) is not present")
@pytest.mark.timeout(120)
@pytest.mark.parametrize("signum,to_group,out_exists", [(signal.SIGTERM, False, False), (signal.SIGINT, True, True),
                                                        (signal.SIGTERM, True, False)])
def test_a_signal_leaves_out_as_it_was_and_the_command_can_be_rerun(tmp_path, gpt2, big_corpus, signum, to_group,
                                                                   out_exists):
    # kill PID (the parent only); Ctrl-C and a scheduler's SIGTERM reach every process of the group, workers too
    out = tmp_path / "out" if out_exists else tmp_path / "new" / "out"
    if out_exists:
        out.mkdir()
        (out / "other_train_000001.bin").write_bytes(b"not ours")
    before = folder_state(tmp_path)
    cmd = fineweb_cli("--from-text", big_corpus, "--out", out, "--val-tokens", 50_000, "--shard-tokens", 20_000,
                      "--workers", 2)
    run = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not list(out.glob("text_*_*.bin")) and run.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        assert run.poll() is None, "the run ended before its first shard was seen: make big_corpus bigger"
        (os.killpg if to_group else os.kill)(run.pid, signum)
        stdout, stderr = run.communicate(timeout=60)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
    assert run.returncode == 128 + signum, stderr
    assert "Traceback" not in stderr and "BrokenPipe" not in stderr, stderr
    last = stderr.replace("\r", "\n").strip().splitlines()[-1]
    assert last.startswith(f"error: interrupted by {signal.Signals(signum).name}; the shards this run wrote are "
                           f"removed and --out={out} is as it was; run the same command again"), stderr
    assert stderr.count("error:") == 1 and folder_state(tmp_path) == before
    assert folder_state(out) == (["other_train_000001.bin"] if out_exists else False)
    # nothing left blocks the same command; --max-tokens keeps the re-run short (the whole corpus can take a
    # minute on 2 busy cores), past the val shard and a train shard
    rerun = run_cli([*cmd, "--max-tokens", "80000"])
    assert rerun.returncode == 0, rerun.stderr
    assert {"text_val_000000.bin", "text_train_000001.bin"} <= set(os.listdir(out))


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
